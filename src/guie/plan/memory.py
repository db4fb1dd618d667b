"""GPU memory of one training stage per device, term by term, and the largest batch that fits.

Terms are added as if all were live at once at the start of backward (gradients of the previous
micro-batch included, as under grad_accum), except the optimizer step's temporary, which lives
only while the activations are gone: the peak takes the larger of the two. Each term says what
it is: `counted` (from parameter counts and dtypes), `measured` (on this CPU with the real
model, `guie.plan.measurements`) or `estimate` (what a CPU cannot see, with its basis).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from guie.plan import gpus, probe
from guie.plan.gpus import GIB, GpuFacts
from guie.plan.measurements import BATCHES, Measurement

FP32 = 4


@dataclass(frozen=True)
class MemoryTerm:
    name: str
    gib: float
    kind: str  # "counted", "measured" or "estimate"
    basis: str


@dataclass(frozen=True)
class StageSetup:
    """What a stage puts on each GPU, from the config and the meta-built model."""

    name: str
    batch: int  # per device
    world: int  # ranks running this stage's training step (1 for head-only stages)
    from_cache: bool
    backbone_trains: bool
    checkpointing: bool
    amp: str  # "fp16", "bf16" or "off", as resolved for the GPU
    params_total: int  # model (backbone + head) and loss, all on the GPU
    params_trained: int
    ema: bool
    block_share: float  # of the backbone's blocks that keep activations (partial unfreezing)
    backbone: Measurement | None  # the training-step measurement (None: head-only stage)
    cache_pass: Measurement | None  # the no-grad measurement for the feature-cache pass
    head_peak_bytes: tuple[int, int]  # head + loss step at BATCHES, measured
    head_copy_bytes: int
    grad_clip_norm: float = 0.0  # > 0: clip_grad_norm_ after the scaler unscales
    # What FSDP's terms need (guie.plan.parallel): the largest transformer block's parameters
    # (one FSDP unit), the root unit's (stem, final norm, projection, head), the class centres'
    # (their own fp32 unit), the accumulation window and whether it reduce-scatters each step.
    block_params: int = 0
    root_params: int = 0
    centres_params: int = 0
    grad_accum: int = 1
    fsdp_reduce_every_micro_step: bool = True


def _line(points: tuple[int, ...], batch: float) -> float:
    (b1, b2), (p1, p2) = BATCHES, points
    return max(0.0, p1 + (p2 - p1) / (b2 - b1) * (batch - b1))


def training_terms(s: StageSetup, gpu: GpuFacts, batch: int | None = None) -> list[MemoryTerm]:
    batch = s.batch if batch is None else batch
    trained = s.params_trained * FP32
    terms = [
        MemoryTerm("weights", s.params_total * FP32 / GIB, "counted",
                   f"{s.params_total / 1e6:.1f}M fp32 parameters (backbone, head, class centres)"),
        MemoryTerm("gradients", trained / GIB, "counted",
                   f"{s.params_trained / 1e6:.1f}M trained parameters, fp32"
                   + (f"; unscaled and clipped to norm {s.grad_clip_norm:g} in place (foreach "
                      "kernels: one fp32 norm per tensor, no gradient copy)"
                      if s.grad_clip_norm else "")),
        MemoryTerm("optimizer state", (2 + s.ema) * trained / GIB, "counted",
                   "AdamW exp_avg + exp_avg_sq, fp32" + (" + EMA copy" if s.ema else "")),
    ]
    if s.world > 1:
        terms.append(MemoryTerm("NCCL buffers", gpus.NCCL_GIB, "estimate", gpus.DDP_NOTE))
    if s.backbone is not None:
        act, copies = s.backbone.train_peak(batch, s.block_share)
        terms.append(MemoryTerm(
            "activations", act / GIB, "measured",
            f"batch {batch}, {s.amp} autocast, checkpointing {'on' if s.checkpointing else 'off'}"
            f", {s.block_share:.0%} of blocks keeping activations: line through batches "
            f"{BATCHES} on the CPU ({s.backbone.measured_on}; "
            f"{', '.join(s.backbone.attention_ops)})"))
        if copies:
            terms.append(MemoryTerm(
                "autocast weight copies", copies / GIB, "measured",
                f"{s.amp} copies of the weights autocast casts, cached until backward "
                "(measured under CPU autocast; CUDA autocast caches the same casts)"))
    head = _line(s.head_peak_bytes, batch)
    terms.append(MemoryTerm("head + loss activations", head / GIB, "measured",
                            f"head, class-centre logits and loss at batch {batch} (CPU, "
                            f"{s.amp} autocast)"))
    return terms


def cache_pass_terms(s: StageSetup, gpu: GpuFacts, batch: int | None = None
                     ) -> list[MemoryTerm]:
    """The feature-cache pass of a head-only stage: frozen backbone, no grad."""
    batch = s.batch if batch is None else batch
    m = s.cache_pass
    return [MemoryTerm("weights", s.params_total * FP32 / GIB, "counted",
                       f"{s.params_total / 1e6:.1f}M fp32 parameters"),
            MemoryTerm("inference activations", m.inference_bytes(batch) / GIB, "measured",
                       f"no-grad forward at batch {batch}, {s.amp} autocast (CPU, "
                       f"{m.measured_on})")]


# The terms that live only during forward and backward: gone when the optimizer steps.
TRANSIENT = ("activations", "autocast weight copies", "head + loss activations",
             "unsharded blocks in flight", "root + class centres unsharded")


def peak_gib(terms: list[MemoryTerm], s: StageSetup, gpu: GpuFacts, training: bool = True,
             shards: int = 1) -> tuple[float, list[MemoryTerm]]:
    """(peak GiB per device, the estimated overheads added to `terms`). `shards`: the ranks
    the optimizer state is split over (FSDP), 1 where each holds all of it."""
    allocated = sum(t.gib for t in terms)
    if training:
        # foreach AdamW materialises sqrt(exp_avg_sq) for every trained tensor (or shard) at
        # once; the activations are freed by then.
        live = sum(t.gib for t in terms if t.name in TRANSIENT)
        step_temp = s.params_trained * FP32 / shards / GIB
        allocated += max(0.0, step_temp - live)
    extra = [MemoryTerm("allocator rounding", allocated * gpus.ALLOCATOR_OVERHEAD, "estimate",
                        gpus.ALLOCATOR_NOTE),
             MemoryTerm("CUDA context + cuBLAS workspace", gpu.context_gib, "estimate",
                        gpu.context_note)]
    return allocated + sum(t.gib for t in extra), extra


def stage_peak_gib(s: StageSetup, gpu: GpuFacts, batch: int | None = None) -> float:
    peak, _ = peak_gib(training_terms(s, gpu, batch), s, gpu)
    if s.from_cache and s.cache_pass is not None:
        peak = max(peak, peak_gib(cache_pass_terms(s, gpu, batch), s, gpu, training=False)[0])
    return peak


def max_batch(s: StageSetup, gpu: GpuFacts, limit_gib: float, cap: int = 1 << 16,
              peak=stage_peak_gib) -> int:
    """The largest per-device batch whose `peak(s, gpu, batch)` fits `limit_gib` (0: not even
    one image)."""
    if peak(s, gpu, 1) > limit_gib:
        return 0
    lo, hi = 1, cap
    if peak(s, gpu, hi) <= limit_gib:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if peak(s, gpu, mid) <= limit_gib else (lo, mid)
    return lo


class _HeadStep(torch.nn.Module):
    """Head + loss on backbone features: a head-only stage's step, or the top of stage 2's."""

    def __init__(self, head, loss_fn, labels: torch.Tensor, margin: float):
        super().__init__()
        self.head, self.loss_fn, self.labels, self.margin = head, loss_fn, labels, margin

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        embeddings = torch.nn.functional.normalize(self.head(features), dim=-1)
        labels = self.labels.repeat(embeddings.shape[0] // self.labels.shape[0])
        return self.loss_fn(embeddings, labels, self.margin)


@dataclass(frozen=True)
class HeadMeasurement:
    peak_bytes: tuple[int, int]  # head + loss step at BATCHES
    weight_copy_bytes: int
    forward_flops_per_image: int


def measure_head(cfg, feature_dim: int, num_classes: int, amp: str, features_need_grad: bool
                 ) -> HeadMeasurement:
    """Peak bytes of a head + loss step at BATCHES, and its forward FLOPs per image."""
    from torch.utils.flop_counter import FlopCounterMode

    from guie.losses import build_loss
    from guie.model import build_head, head_output_dim

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = build_head(cfg.model, feature_dim)
        loss_fn = build_loss(cfg.loss, head_output_dim(cfg.model, feature_dim), num_classes)
    peaks, copies = [], 0
    gen = torch.Generator().manual_seed(0)
    for b in BATCHES:
        labels = torch.randint(0, num_classes, (b,), generator=gen)
        step = _HeadStep(head, loss_fn, labels, cfg.loss.margin_rad).train()
        features = torch.randn(b, feature_dim, generator=gen).requires_grad_(features_need_grad)
        m = probe.measure_step(step, features, amp)
        peaks.append(m.peak_bytes)
        copies = copies or m.weight_copy_bytes
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        step(torch.randn(BATCHES[-1], feature_dim, generator=gen))
    flops = counter.get_total_flops() // BATCHES[-1]
    return HeadMeasurement((peaks[0], peaks[1]), copies, int(flops))
