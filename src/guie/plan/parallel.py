"""Which data parallelism a stage runs on several GPUs, and what each costs per GPU.

DDP (`guie.plan.memory.training_terms`): every rank holds the full fp32 weights, gradients (the
buckets, as views) and AdamW moments. FSDP2 (`torch.distributed.fsdp.fully_shard`, as
`guie.train.fsdp.shard_replica` builds it: each transformer block a unit, the class centres an
fp32 unit, the train step the root) splits that state over the ranks and pays for it in flight:
each block is all-gathered in the AMP dtype before its forward and again for its backward (the
next one prefetched), and its gradient is reduce-scattered in fp32. `fsdp_terms` counts that
term by term; `fsdp_traffic_bytes` and `extra_comm_hours` price it in time.

`parallel="auto"` (`decide`; `guie.plan.auto.choose_parallel` applies it to a config): DDP
where it fits with HEADROOM_FRACTION of the limit to spare, since it is never slower here (the
same or less traffic, and no all-gather waiting before a block); else FSDP where it fits; else
DDP, whose failure the plan reports.
"""
from __future__ import annotations

from dataclasses import dataclass

from guie.plan import gpus
from guie.plan.gpus import GIB, GpuFacts
from guie.plan.memory import FP32, MemoryTerm, StageSetup, peak_gib

DDP, FSDP = "ddp", "fsdp"
# The plan's GPU-side terms (allocator rounding, CUDA context) are estimates good to a few per
# cent: DDP is kept only while it leaves this share of the limit unused.
HEADROOM_FRACTION = 0.05
# Blocks' worth of AMP-dtype tensors FSDP2 holds beside the activations at a block's backward:
# the block's unsharded parameters, the next block's prefetched all-gather, and the block's
# unsharded gradient before its reduce-scatter (the fp32 reduce-scatter buffer comes after the
# parameters are resharded). Checked against the CPU allocator (tests/plan/test_parallel.py).
IN_FLIGHT_BLOCKS = 3


def amp_bytes(amp: str) -> int:
    return 2 if amp in ("fp16", "bf16") else FP32


def unsynced_accumulation(s: StageSetup) -> bool:
    """A grad_accum window that reduce-scatters only at its end keeps a full unsharded fp32
    gradient per rank through the window (FSDP2 accumulates it in the reduce dtype)."""
    return s.grad_accum > 1 and not s.fsdp_reduce_every_micro_step


def fsdp_terms(s: StageSetup, gpu: GpuFacts, batch: int | None = None) -> list[MemoryTerm]:
    """One rank's memory under FSDP2 with `s.world` ranks, term by term."""
    batch = s.batch if batch is None else batch
    w, low = s.world, amp_bytes(s.amp)
    trained = s.params_trained * FP32
    terms = [
        MemoryTerm("weights", s.params_total * FP32 / w / GIB, "counted",
                   f"fp32 master shards: 1/{w} of {s.params_total / 1e6:.1f}M parameters"),
        MemoryTerm("gradients", trained / w / GIB, "counted",
                   f"fp32 shards: 1/{w} of {s.params_trained / 1e6:.1f}M trained parameters"),
        MemoryTerm("optimizer state", 2 * trained / w / GIB, "counted",
                   f"AdamW exp_avg + exp_avg_sq, fp32 shards (1/{w})"),
    ]
    if unsynced_accumulation(s):
        terms.append(MemoryTerm(
            "unsynced accumulation gradient", trained / GIB, "counted",
            f"fsdp_reduce_every_micro_step=false with grad_accum={s.grad_accum}: a full "
            "unsharded fp32 gradient per rank through the window"))
    terms += [
        MemoryTerm("unsharded blocks in flight", IN_FLIGHT_BLOCKS * s.block_params * low / GIB,
                   "counted", f"{IN_FLIGHT_BLOCKS} x the largest block "
                   f"({s.block_params / 1e6:.1f}M parameters) in {s.amp}: its all-gathered "
                   "parameters, the next block's prefetch, its gradient before the "
                   "reduce-scatter"),
        MemoryTerm("root + class centres unsharded",
                   (s.root_params * low + s.centres_params * FP32) / GIB, "counted",
                   f"stem, final norm, projection and head ({s.root_params / 1e6:.1f}M) in "
                   f"{s.amp} for the whole step; the centres ({s.centres_params / 1e6:.1f}M) "
                   "in fp32 around the loss"),
    ]
    if s.backbone is not None:
        terms.append(MemoryTerm(
            "activations", s.backbone.activations_without_copies(batch, s.block_share) / GIB,
            "measured", f"batch {batch}, as the DDP column's without autocast's weight copies "
            "(the parameters already are in the AMP dtype)"))
    head = _head_line(s, batch)
    terms.append(MemoryTerm("head + loss activations", head / GIB, "measured",
                            f"as the DDP column's, batch {batch}"))
    terms.append(MemoryTerm("NCCL buffers", gpus.NCCL_GIB, "estimate", gpus.NCCL_NOTE))
    return terms


def _head_line(s: StageSetup, batch: float) -> float:
    from guie.plan.memory import _line
    return _line(s.head_peak_bytes, batch)


def evaluation_terms(s: StageSetup, gpu: GpuFacts, batch: int | None = None
                     ) -> list[MemoryTerm]:
    """An evaluation point under FSDP: guie.train.step parks the plain full-weight model on the
    CPU while the stage trains and moves it onto the device to embed, beside the shards and
    the optimizer state; no training activations then."""
    batch = s.batch if batch is None else batch
    state = [t for t in fsdp_terms(s, gpu, batch)
             if t.name in ("weights", "gradients", "optimizer state", "NCCL buffers")]
    plain = MemoryTerm("plain model on the device", s.params_total * FP32 / GIB, "counted",
                       "the full fp32 model + centres, moved from the CPU for an evaluation "
                       "point (guie.train.step.park_plain returns it)")
    embed = [] if s.backbone is None else [MemoryTerm(
        "inference activations", s.backbone.inference_bytes(batch) / GIB, "measured",
        f"no-grad forward at batch {batch}")]
    return state + [plain] + embed


def evaluation_peak_gib(s: StageSetup, gpu: GpuFacts, batch: int | None = None) -> float:
    return peak_gib(evaluation_terms(s, gpu, batch), s, gpu, training=False)[0]


def fsdp_peak_gib(s: StageSetup, gpu: GpuFacts, batch: int | None = None) -> float:
    """The larger of a training step's peak and an evaluation point's."""
    return max(peak_gib(fsdp_terms(s, gpu, batch), s, gpu, shards=s.world)[0],
               evaluation_peak_gib(s, gpu, batch))


def fsdp_transient_bytes(s: StageSetup, batch: int) -> float:
    """Peak minus the state (shards, NCCL): what one rank's forward and backward add, as the
    CPU allocator sees it (no GPU-side rounding or context)."""
    state = ("weights", "gradients", "optimizer state", "NCCL buffers")
    return sum(t.gib for t in fsdp_terms(s, gpus.GPUS["T4"], batch) if t.name not in state) * GIB


# ----------------------------------------------------------------------------- time


def ddp_traffic_bytes(s: StageSetup) -> float:
    """Bytes each rank sends per accumulation window under DDP: one ring all-reduce of the fp32
    gradients (no_sync on the window's other micro-steps)."""
    return 2 * (s.world - 1) / s.world * s.params_trained * FP32


def fsdp_traffic_bytes(s: StageSetup) -> float:
    """Bytes each rank sends per window under FSDP2: every micro-step all-gathers the weights in
    the AMP dtype twice (forward, then backward: reshard_after_forward), and reduce-scatters the
    fp32 gradients every micro-step or once per window."""
    share = (s.world - 1) / s.world
    gathers = 2 * share * s.params_total * amp_bytes(s.amp) * s.grad_accum
    reduces = share * s.params_trained * FP32 * (1 if unsynced_accumulation(s) else s.grad_accum)
    return gathers + reduces


def extra_comm_hours(s: StageSetup, images: float, epochs: float, gpu: GpuFacts
                     ) -> tuple[float, str]:
    """FSDP's hours beyond DDP's: DDP's all-reduce is inside the multi-GPU scaling anchor
    (guie.plan.estimates.TWO_GPU_SCALING), so only FSDP's traffic beyond it is added, as if
    never overlapped with compute (an upper bound)."""
    windows = images * epochs / max(1, s.batch * s.grad_accum * s.world)
    extra = max(0.0, fsdp_traffic_bytes(s) - ddp_traffic_bytes(s))
    hours = extra * windows / (gpus.COLLECTIVE_GB_S * 1e9) / 3600
    return hours, (f"per window of {s.grad_accum} micro-step(s): DDP all-reduces "
                   f"{ddp_traffic_bytes(s) / 1e9:.2f} GB, FSDP sends "
                   f"{fsdp_traffic_bytes(s) / 1e9:.2f} GB; the difference at "
                   f"{gpus.COLLECTIVE_GB_S:g} GB/s ({gpus.COLLECTIVE_NOTE}), not overlapped")


# ----------------------------------------------------------------------------- the rule


@dataclass(frozen=True)
class Choice:
    parallel: str  # "ddp" or "fsdp"
    reason: str


def decide(wanted: str, world: int, from_cache: bool, ddp_gib: float, fsdp_gib: float | None,
           limit_gib: float) -> Choice:
    """The parallelism a stage runs: `wanted` where it is "ddp" or "fsdp", else auto's rule."""
    if world <= 1:
        return Choice(DDP, "one GPU: trains plainly, nothing to shard")
    if from_cache:
        return Choice(DDP, "a cached head stage: megabytes of state, nothing worth sharding")
    if wanted in (DDP, FSDP):
        return Choice(wanted, f"parallel={wanted} in the config")
    spare = limit_gib - ddp_gib
    need = HEADROOM_FRACTION * limit_gib
    if spare >= need:
        return Choice(DDP, f"auto: DDP fits with {spare:.2f} GiB to spare (>= "
                           f"{HEADROOM_FRACTION:.0%} of {limit_gib:g}) and is never slower")
    if fsdp_gib is not None and fsdp_gib <= limit_gib:
        return Choice(FSDP, f"auto: DDP needs {ddp_gib:.2f} GiB, above {limit_gib - need:.2f} "
                            f"(the limit less {HEADROOM_FRACTION:.0%}); FSDP fits at "
                            f"{fsdp_gib:.2f} GiB")
    return Choice(DDP, "auto: neither fits; DDP's shortfall is reported")
