"""One training step of a stage: what the loop runs per micro-batch, and what the benchmarks time.

`StageStep` owns the stage's optimisation: AdamW over the groups the stage trains, the grad
scaler and autocast of its `amp` mode, the EMA, and the warmup + cosine schedule. Calling it on
micro-batch `b` runs forward and backward, and every `grad_accum` micro-batches the optimizer.

Under DDP the gradients are all-reduced once per accumulation window (the micro-steps before
the window's last run under `no_sync`), into DDP's own buckets (`gradient_as_bucket_view`: no
second copy of every gradient). Each micro-batch's loss is divided by `grad_accum`, so a window
on W ranks equals one batch of W * grad_accum micro-batches in one process.

At the optimizer step the gradients are unscaled, their global L2 norm taken (and clipped to
`grad_clip_norm`), and a step whose norm is not finite is skipped: the grad scaler halves its
scale, the skip is counted (`skipped_steps`), and a stage that skips
`MAX_CONSECUTIVE_SKIPPED_STEPS` steps in a row stops with `NonFiniteTrainingError`.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from guie.config import StageConfig
from guie.losses import ArcFace
from guie.model import EmbeddingModel
from guie.train.amp import amp_settings
from guie.train.averaging import EMA
from guie.train.optim import lr_multiplier, param_groups

# A stage stops after this many optimizer steps in a row were skipped as non-finite. With fp16
# the grad scaler halves its scale on every skip: 20 halvings take 65536 (its start) to 1/16, so
# gradients that still overflow are not an overflow of the scale but NaN/inf from the model, the
# data or the learning rate, and every further step would train nothing.
MAX_CONSECUTIVE_SKIPPED_STEPS = 20


class NonFiniteTrainingError(RuntimeError):
    """A stage whose gradients stay non-finite: it would train nothing."""


class TrainStep(nn.Module):
    """Model + loss as one module, so DDP synchronises the class centres' gradients too."""

    def __init__(self, model: EmbeddingModel, loss_fn: ArcFace, from_features: bool):
        super().__init__()
        self.model, self.loss_fn, self.from_features = model, loss_fn, from_features

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor, margin_rad: float,
                sizes_hw: torch.Tensor | None = None):
        if self.from_features:
            embeddings = self.model.embed_features(inputs)
        else:
            embeddings = self.model(inputs, sizes_hw)
        # A multisample-dropout head returns K stacked outputs per input: one loss over all K.
        labels = labels.repeat(embeddings.shape[0] // labels.shape[0])
        # The loss computes its cosines, logits and cross-entropy in fp32 itself (ArcFace).
        return self.loss_fn(embeddings, labels, margin_rad)


def grad_total_norm(params: list[nn.Parameter], clip_norm: float) -> torch.Tensor:
    """The global L2 norm of the gradients of `params` (before clipping); with `clip_norm` > 0
    the gradients are scaled down to that norm where it is exceeded. Non-finite norms pass
    through (the caller skips that step)."""
    if clip_norm > 0:
        norm = nn.utils.clip_grad_norm_(params, clip_norm)
    elif hasattr(nn.utils, "get_total_norm"):  # torch >= 2.6: the norm without a rescale pass
        norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    else:
        norm = nn.utils.clip_grad_norm_(params, float("inf"))
    # Under FSDP the gradients are DTensors and so is their norm (already reduced over ranks).
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class StageStep:
    """The optimisation of one stage. `from_features`: the inputs are cached backbone features
    (a frozen-backbone stage), else images. `world` > 1 wraps the step in DDP."""

    def __init__(self, model: EmbeddingModel, loss_fn: ArcFace, stage: StageConfig,
                 device: torch.device, from_features: bool, world: int = 1,
                 total_steps: int = 1, warmup_steps: int = 0):
        self.stage, self.device = stage, device
        # The LR schedule over the stage's optimizer steps (guie.train.optim.lr_multiplier).
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.groups = param_groups(model, loss_fn, stage)
        self.trained = [p for g in self.groups for p in g["params"] if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.groups, weight_decay=stage.weight_decay)
        self.ema = EMA([p for g in self.groups for p in g["params"]], stage.ema_decay) \
            if stage.ema_decay else None
        use_scaler, self.amp_dtype = amp_settings(stage.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.runner: nn.Module = TrainStep(model, loss_fn, from_features)
        if world > 1:
            # Bucket views: the gradients live in DDP's all-reduce buckets instead of beside
            # them (ViT-H: 2.4 GB less per GPU).
            self.runner = nn.parallel.DistributedDataParallel(
                self.runner, device_ids=[device] if device.type == "cuda" else None,
                gradient_as_bucket_view=True)
        self.grad_norm = float("nan")  # the last optimizer step's global norm, before clipping
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite gradient, this stage
        self.consecutive_skipped_steps = 0

    def __call__(self, b: int, inputs: torch.Tensor, sizes_hw: torch.Tensor | None,
                 labels: torch.Tensor, margin_rad: float, weight: float = 1.0) -> float:
        """Micro-batch `b`; returns its loss (NaN for an empty batch, or with `weight` 0: a
        stand-in batch that only keeps the DDP ranks in step)."""
        loss_value = float("nan")
        grad_accum = self.stage.grad_accum
        window_ends = (b + 1) % grad_accum == 0
        with self._sync_context(window_ends):
            if len(labels):
                with torch.autocast(self.device.type, dtype=self.amp_dtype,
                                    enabled=self.amp_dtype is not None):
                    loss = self.runner(inputs.to(self.device, non_blocking=True),
                                       labels.to(self.device), margin_rad, sizes_hw)
                self.scaler.scale(loss * weight / grad_accum).backward()
                loss_value = loss.item() if weight else loss_value
        if window_ends:
            self.optimizer_step(b // grad_accum)
        return loss_value

    def _sync_context(self, window_ends: bool):
        """DDP all-reduces only in the backward of a window's last micro-batch; before it the
        gradients accumulate locally."""
        if window_ends or not isinstance(self.runner, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.runner.no_sync()

    def optimizer_step(self, step: int) -> bool:
        """Optimizer step `step` of the stage over the accumulated gradients; False where it was
        skipped (a non-finite gradient)."""
        if not any(p.grad is not None for p in self.trained):
            self.grad_norm = float("nan")
            return True  # every micro-batch of the window was empty: nothing to step
        mult = lr_multiplier(step, self.total_steps, self.warmup_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * mult
        self.scaler.unscale_(self.optimizer)  # the norm and the clip see true gradients
        norm = float(grad_total_norm(self.trained, self.stage.grad_clip_norm))
        self.grad_norm = norm
        finite = math.isfinite(norm)
        if finite:
            self.scaler.step(self.optimizer)  # optimizer.step() when the scaler is off
            self.scaler.update()
        elif self.scaler.is_enabled():
            # unscale_ recorded the inf: update() halves the scale. The step itself is ours to
            # skip, also without a scaler (bf16, fp32), where nothing else would.
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if finite and self.ema is not None:
            self.ema.update()
        self._count(finite)
        return finite

    def _count(self, finite: bool) -> None:
        if finite:
            self.consecutive_skipped_steps = 0
            return
        self.skipped_steps += 1
        self.consecutive_skipped_steps += 1
        if self.consecutive_skipped_steps >= MAX_CONSECUTIVE_SKIPPED_STEPS:
            raise NonFiniteTrainingError(
                f"{self.stage.name}: {self.consecutive_skipped_steps} optimizer steps in a row "
                f"had a non-finite gradient norm and were skipped ({self.skipped_steps} in this "
                f"stage; amp={self.stage.amp!r}, grad_clip_norm={self.stage.grad_clip_norm}): "
                f"the stage would train nothing. Try a lower {self.stage.name}.lr_backbone / "
                f"lr_head, {self.stage.name}.grad_clip_norm=1.0, {self.stage.name}.amp=bf16 "
                "(on A100/H100) or amp=off, and check the data for corrupt images")

    def state_dict(self) -> dict:
        """What a resumed stage needs of the optimisation (its RNG is the checkpoint's own)."""
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None,
                "skipped_steps": self.skipped_steps,
                "consecutive_skipped_steps": self.consecutive_skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.skipped_steps = state.get("skipped_steps", 0)
        self.consecutive_skipped_steps = state.get("consecutive_skipped_steps", 0)
