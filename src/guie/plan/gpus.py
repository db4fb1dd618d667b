"""What the planner assumes of each Kaggle GPU beyond `guie.kaggle.platform`'s machine shapes.

Every number here is an ESTIMATE with its basis in `source`; nothing here was measured on the GPU
it describes (no GPU was lent to this work). Throughput is an effective TFLOP/s for a ViT-H-14
-like workload, derived from the published anchors in `guie.plan.estimates` (and field guide
section 7), so that a model of F FLOPs per image runs at effective / F images per second. A
committed GPU measurement (`bench/*.json` from `python -m bench --gpu`) replaces these for
the device it was taken on (`guie.plan.timing.bench_measurement`).
"""
from __future__ import annotations

from dataclasses import dataclass

from guie.plan import estimates
from guie.kaggle.platform import MachineShape

GIB = 2**30
# ViT-H-14 forward at 224 px (field guide section 7): the anchors' images/s become TFLOP/s.
_VIT_H_FLOP = estimates.VIT_H_FORWARD_GFLOP * 1e9
_T4_INFER_TFLOPS = estimates.T4_INFERENCE_IMG_S * _VIT_H_FLOP / 1e12
# Training a ViT costs ~3x its forward FLOPs but the anchors run at inference / 4.5 images/s:
# the effective training rate counts the 3x FLOPs at that image rate.
_T4_TRAIN_TFLOPS = _T4_INFER_TFLOPS * 3 * estimates.TRAIN_VS_INFERENCE
# Datasheet dense fp16 tensor-core peaks (NVIDIA T4 / L4 datasheets: 65 and 121 TFLOP/s).
_L4_VS_T4 = 121 / 65


@dataclass(frozen=True)
class GpuFacts:
    name: str
    infer_tflops: float  # effective, ViT-like forward under autocast
    train_tflops: float  # effective, per training FLOP (3x forward for a full backbone)
    source: str
    attention_backend: str  # what SDPA picks there for a ViT under the stage's AMP dtype
    attention_note: str
    context_gib: float  # CUDA context + cuBLAS workspace, outside PyTorch's allocator
    context_note: str


_CONTEXT_NOTE = ("CUDA 12 context with lazy module loading ~0.3-0.5 GiB as seen by "
                 "nvidia-smi on Turing/Ada cards, plus cuBLAS's default workspace (4 MiB x 2 "
                 "handles' streams; 32 MiB on Hopper)")
_FUSED = ("memory-efficient SDPA (no attention matrix saved: output + logsumexp per head), the "
          "same footprint as the fused CPU kernel the activations were measured with")

GPUS = {
    "T4": GpuFacts(
        "T4", _T4_INFER_TFLOPS, _T4_TRAIN_TFLOPS,
        f"estimate: one ViT-H-14 pass over {estimates.TEST_IMAGES:,} images in ~1.4 h on a T4 "
        f"({estimates.T4_INFERENCE_IMG_S:.1f} img/s), training at 1/4.5 of it "
        "(guie.plan.estimates)",
        "memory-efficient",
        "T4 (sm75) has no flash attention (PyTorch's flash kernel needs sm80+): " + _FUSED,
        0.4, _CONTEXT_NOTE),
    "P100": GpuFacts(
        "P100", _T4_INFER_TFLOPS * estimates.P100_VS_T4, _T4_TRAIN_TFLOPS * estimates.P100_VS_T4,
        f"estimate: {estimates.P100_VS_T4} x a T4 (guie.plan.estimates)", "memory-efficient",
        "P100 (sm60) has no flash attention: " + _FUSED, 0.4, _CONTEXT_NOTE),
    "L4": GpuFacts(
        "L4", _T4_INFER_TFLOPS * _L4_VS_T4, _T4_TRAIN_TFLOPS * _L4_VS_T4,
        "estimate: a T4's rate x 121/65 (datasheet dense fp16 tensor peaks; both are ~70 W "
        "cards, so the T4's utilisation is assumed)", "flash",
        "L4 (sm89): flash attention (no attention matrix saved), as measured on the CPU", 0.4,
        _CONTEXT_NOTE),
    "H100": GpuFacts(
        "H100", 1100 * _VIT_H_FLOP / 1e12, 275 * 3 * _VIT_H_FLOP / 1e12,
        "estimate: ~1,100 img/s ViT-H-14 inference and ~275 img/s full fine-tune on an H100 "
        "(field guide section 7)", "flash",
        "H100 (sm90): flash attention (no attention matrix saved), as measured on the CPU", 0.5,
        _CONTEXT_NOTE),
    # Measured fp16 matmul peaks (field guide section 7): A100 248-259 TFLOP/s, H100 ~760: an
    # A100 taken as an H100 x 250/760 (both data-centre cards, utilisation assumed alike).
    "A100": GpuFacts(
        "A100", 1100 * 250 / 760 * _VIT_H_FLOP / 1e12, 275 * 250 / 760 * 3 * _VIT_H_FLOP / 1e12,
        "estimate: an H100's ~1,100 img/s inference and ~275 img/s fine-tune x 250/760 (measured "
        "fp16 matmul peaks, field guide section 7)", "flash",
        "A100 (sm80): flash attention (no attention matrix saved), as measured on the CPU", 0.5,
        _CONTEXT_NOTE),
    "RTX PRO 6000": GpuFacts(
        "RTX PRO 6000", 598 * _VIT_H_FLOP / 1e12,
        598 * estimates.TRAIN_VS_INFERENCE * 3 * _VIT_H_FLOP / 1e12,
        "estimate: the published 598 img/s ViT-H-14 inference (timm, bf16, compiled; field guide "
        "section 7), training at 1/4.5 of it (guie.plan.estimates)", "flash",
        "RTX PRO 6000 (sm120): a fused attention kernel (no attention matrix saved), as measured "
        "on the CPU", 0.5, _CONTEXT_NOTE),
}

# DDP (the kit's torchrun path on 2xT4): guie.train.step builds DistributedDataParallel with
# gradient_as_bucket_view=True, so its buckets ARE the .grad tensors (counted once, under
# "gradients"), and runs the micro-steps of a grad_accum window under no_sync (they accumulate
# into those same tensors, one all-reduce per optimizer step): DDP adds NCCL's buffers only.
DDP_NOTE = ("gradient_as_bucket_view=True: DDP's buckets are the .grad tensors (counted under "
            "gradients), and no_sync on accumulation micro-steps accumulates into them; what DDP "
            "adds is NCCL's buffers (~0.25 GiB: 4 MiB NCCL_BUFFSIZE x channels x peers)")
NCCL_GIB = 0.25
NCCL_NOTE = "NCCL's buffers (~0.25 GiB: 4 MiB NCCL_BUFFSIZE x channels x peers)"
# What one rank's collectives move per second between Kaggle's two T4s: PCIe 3 x16 (~12 GB/s
# each way in theory), and NCCL's peer-to-peer is often disabled there (NCCL_P2P_DISABLE=1, the
# usual remedy for its hangs), which stages through host memory. Assumed, not measured.
COLLECTIVE_GB_S = 5.0
COLLECTIVE_NOTE = ("assumed for 2xT4 over PCIe 3 with NCCL peer-to-peer possibly disabled "
                   "(staged through host memory); not measured")
# The caching allocator rounds every block up (512 B; 2 MiB segments, 20 MiB for large ones)
# and fragments: PyTorch's reserved memory exceeds the allocated peak.
ALLOCATOR_OVERHEAD = 0.08
ALLOCATOR_NOTE = ("+8% of the allocated peak for the caching allocator's rounding "
                  "(512 B blocks, 2/20 MiB segments) and fragmentation; reserved runs 5-15% over "
                  "allocated in transformer training")
# Time assumptions.
STEP_FLOOR_S = estimates.STAGE1_STEP_S["T4"]  # launch-bound small steps (head stages)
STEP_FLOOR_NOTE = (f"assumed: at least {STEP_FLOOR_S * 1e3:.0f} ms per step of a head-only "
                   "stage (kernel launches and an AdamW update; guie.plan.estimates)")
TWO_GPU_SCALING = estimates.TWO_GPU_SCALING


@dataclass(frozen=True)
class MemoryLimit:
    gib: float  # per device: what a stage's peak must stay below
    source: str  # which figure it is, said in the plan's output
    kind: str  # "measured" (a probe of the card), "reported" (users' figures), "datasheet"


def memory_limit(shape: MachineShape, probed: MachineShape | None = None) -> MemoryLimit:
    """What PyTorch can allocate per device, which is what an out-of-memory error is judged
    against (its "total capacity"), not the datasheet's figure: a probe's record of this shape
    (`guie.kaggle.platform.machine_shape` with a workdir) where there is one, else the kit's
    table (`MachineShape.allocatable_gib`), else the datasheet."""
    if probed is not None and probed.allocatable_gib and probed is not shape:
        return MemoryLimit(probed.allocatable_gib,
                           "what PyTorch can allocate, recorded by `submit.py probe` on "
                           f"{shape.name} (total_memory)", "measured")
    if shape.allocatable_gib:
        return MemoryLimit(shape.allocatable_gib,
                           f"what PyTorch can allocate on {shape.accelerator.split(' ', 1)[-1]} "
                           f"(guie.kaggle.platform; the datasheet says {shape.gpu_memory_gib:g})",
                           "reported")
    return MemoryLimit(shape.gpu_memory_gib,
                       "the datasheet figure (what PyTorch can allocate there is unknown: a bit "
                       "less; `submit.py probe` records it)", "datasheet")


def gpu_of(shape: MachineShape) -> GpuFacts | None:
    """The facts for a machine shape's GPU (None for a TPU or a GPU the planner lacks)."""
    for name, facts in GPUS.items():
        if name in shape.accelerator.replace("Tesla ", ""):
            return facts
    return None


def multi_gpu_speedup(gpus: int) -> float:
    """Throughput of `gpus` GPUs under DDP against one (2xT4: 1.8, guie.plan.estimates)."""
    return 1.0 if gpus <= 1 else TWO_GPU_SCALING * gpus / 2
