"""Measure a training step's activation memory and FLOPs with the real model on the CPU.

`ActivationTracker` is a TorchDispatchMode that sees every tensor an op creates and follows its
storage until the storage is freed (a weakref callback), so it knows the live bytes after every
op and their peak. A training step is run under it with the same autocast dtype and gradient
checkpointing the GPU would use; each parameter's gradient is dropped the moment it is
accumulated (a post-accumulate hook), so the peak is the activations alone: saved tensors,
their recomputation under checkpointing, backward's temporaries, and autocast's low-precision
copies of the weights (counted apart: the planner reports them as their own term).

Activation bytes are linear in the batch for these towers (every op is per sample; the weight
copies are the constant), so two small batches give the line, and the planner extrapolates it
to the configured batch. FLOPs come from torch's FlopCounterMode on the meta device (no memory,
no compute: ViT-H counts in a second).
"""
from __future__ import annotations

import weakref
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}


class ActivationTracker(TorchDispatchMode):
    """Live bytes of the storages created while active (pre-existing ones never count)."""

    def __init__(self, preexisting: set[int], weights: set[int]):
        super().__init__()
        self._pre = preexisting  # data_ptr of parameters, buffers, inputs
        self._weights = weights  # data_ptr of parameters: their casts are weight copies
        self._live: dict[int, tuple[int, bool]] = {}  # data_ptr -> (bytes, is a weight copy)
        self._refs: list[weakref.ref] = []
        self.live_bytes = self.copy_bytes = 0
        self.peak_bytes = self.copy_bytes_at_peak = 0
        self.ops: set[str] = set()
        self.timeline: list[tuple[int, int]] = []  # (live, of which weight copies) after each op

    def _freed(self, ptr: int, _ref) -> None:
        nbytes, is_copy = self._live.pop(ptr, (0, False))
        self.live_bytes -= nbytes
        self.copy_bytes -= nbytes if is_copy else 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__
        self.ops.add(name.split(".")[0])
        is_copy = name.startswith("_to_copy") and any(
            isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self._weights
            for a in tree_flatten(args)[0])
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0 or ptr in self._pre or ptr in self._live:
                continue
            nbytes = storage.nbytes()
            self._live[ptr] = (nbytes, is_copy)
            self._refs.append(weakref.ref(storage, lambda ref, ptr=ptr: self._freed(ptr, ref)))
            self.live_bytes += nbytes
            self.copy_bytes += nbytes if is_copy else 0
        self.timeline.append((self.live_bytes, self.copy_bytes))
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes, self.copy_bytes_at_peak = self.live_bytes, self.copy_bytes
        return out


def drop_grads_as_they_arrive(params: list[torch.nn.Parameter]) -> list:
    """Hooks that free each gradient once accumulated: the step then holds activations only
    (gradients are a term of their own, known from the parameter count)."""
    def drop(p: torch.Tensor) -> None:
        p.grad = None
    return [p.register_post_accumulate_grad_hook(drop) for p in params if p.requires_grad]


def attention_context(attention: str):
    """'fused': let SDPA choose (on this CPU its flash kernel, which like CUDA's flash and
    memory-efficient kernels saves no attention matrix); 'math': the explicit softmax(QK^T)V
    a GPU without a fused kernel runs."""
    if attention == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([SDPBackend.MATH])
    return nullcontext()


def train_step(module: torch.nn.Module, images: torch.Tensor, amp: str, attention: str) -> None:
    """Forward under autocast + backward of a scalar: what one micro-batch does to memory."""
    dtype = AMP_DTYPES[amp]
    with attention_context(attention):
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = module(images)
        out.float().square().mean().backward()


@dataclass(frozen=True)
class StepMemory:
    peak_bytes: int  # live bytes at the step's peak, weight copies included
    weight_copy_bytes: int  # of which autocast's low-precision weight copies
    attention_ops: tuple[str, ...]  # which SDPA kernel ran (what "fused" meant here)
    timeline: tuple[tuple[int, int], ...]  # (live, weight copies) after every op


def measure_step(module: torch.nn.Module, images: torch.Tensor, amp: str,
                 attention: str = "fused") -> StepMemory:
    """Peak activation bytes of one training step of `module` on `images` (CPU)."""
    params = [p for p in module.parameters() if p.requires_grad]
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    pre = weights | {b.untyped_storage().data_ptr() for b in module.buffers()} | {
        images.untyped_storage().data_ptr()}
    hooks = drop_grads_as_they_arrive(params)
    try:
        tracker = ActivationTracker(pre, weights)
        with tracker:
            train_step(module, images, amp, attention)
    finally:
        for h in hooks:
            h.remove()
    attn = tuple(sorted(op for op in tracker.ops if "attention" in op))
    return StepMemory(tracker.peak_bytes, tracker.copy_bytes_at_peak, attn,
                      tuple(tracker.timeline))


def envelope(low: StepMemory, high: StepMemory, batches: tuple[int, int]
             ) -> tuple[tuple[int, int, int], ...]:
    """The ops that can hold a step's peak at some batch, as (live at the smaller batch,
    live at the larger, weight copies) lines.

    The same ops run at every batch, so after op t the live bytes are a line in the batch,
    C_t + b * A_t, and the step's peak at batch b is the largest of these lines. The largest
    line at small batches is not the largest at large ones: under checkpointing the end of the
    forward (every weight copy, only block inputs) peaks at small batches, one block's recomputed
    backward (its full activations) at batch 32. Extrapolating the two peaks would miss that."""
    (b1, b2) = batches
    if len(low.timeline) != len(high.timeline):  # not the same op sequence: the peaks' line
        points = [(low.peak_bytes, high.peak_bytes, low.weight_copy_bytes)]
    else:
        points = [(l1, l2, c1) for (l1, c1), (l2, _)
                  in zip(low.timeline, high.timeline, strict=True)]

    def at(p, b):
        return p[0] + (p[1] - p[0]) * (b - b1) / (b2 - b1)
    keep = {max(points, key=lambda p: at(p, 2.0 ** e)) for e in range(0, 17)}
    return tuple(sorted(keep))


def forward_flops(module: torch.nn.Module, image_shape: tuple[int, ...]) -> int:
    """FLOPs (2 x multiply-adds) of one forward of a batch of `image_shape` (meta tensors)."""
    from torch.utils.flop_counter import FlopCounterMode

    images = torch.empty(image_shape, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(images)
    return int(counter.get_total_flops())
