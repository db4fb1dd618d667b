"""One training step of a stage: what the loop runs per micro-batch, and what the benchmarks time.

`StageStep` owns the stage's optimisation: AdamW over the groups the stage trains, the grad
scaler and autocast of its `amp` mode, the EMA, and the warmup + cosine schedule. Calling it on
micro-batch `b` runs forward and backward, and every `grad_accum` micro-batches the optimizer.

Under DDP the gradients are all-reduced once per accumulation window (the micro-steps before
the window's last run under `no_sync`), into DDP's own buckets (`gradient_as_bucket_view`: no
second copy of every gradient). Each micro-batch's loss is divided by `grad_accum`, so a window
on W ranks equals one batch of W * grad_accum micro-batches in one process. Under FSDP
(`guie.train.fsdp`) a sharded replica trains and `sync_weights` brings its full weights back.

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
from guie.errors import UserValueError
from guie.losses import ArcFace
from guie.model import EmbeddingModel
from guie.train.amp import amp_settings
from guie.train.averaging import EMA
from guie.train.fsdp import (PARALLEL_DDP, PARALLEL_FSDP, PARALLEL_SINGLE, copy_full_weights,
                             full_optimizer_state, load_full_optimizer_state, load_full_weights,
                             shard_replica, sharded_grad_scaler)
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
    (a frozen-backbone stage), else images. `world` > 1 runs `parallel` ("ddp" or "fsdp",
    `guie.train.fsdp.resolve_parallel`) over the ranks."""

    def __init__(self, model: EmbeddingModel, loss_fn: ArcFace, stage: StageConfig,
                 device: torch.device, from_features: bool, world: int = 1,
                 total_steps: int = 1, warmup_steps: int = 0, parallel: str = PARALLEL_DDP):
        self.stage, self.device = stage, device
        self.parallel = parallel if world > 1 else PARALLEL_SINGLE
        # The LR schedule over the stage's optimizer steps (guie.train.optim.lr_multiplier).
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        use_scaler, self.amp_dtype = amp_settings(stage.amp, device)
        # The full-weight model + loss the rest of the pipeline reads (`sync_weights`).
        self.plain = TrainStep(model, loss_fn, from_features)
        self.groups = param_groups(model, loss_fn, stage)  # also sets what requires grad
        self.runner: nn.Module = self.plain
        if self.parallel == PARALLEL_FSDP:
            if stage.ema_decay:
                raise UserValueError(f"{stage.name}: ema_decay with parallel='fsdp' is not "
                                     f"supported (the average would be sharded); set "
                                     f"{stage.name}.parallel=ddp")
            # On a GPU only the shards live there while the stage trains; the plain model
            # waits on the CPU (ViT-H fp32: 2.5 GB) for evaluation points and checkpoints.
            self.plain.to("cpu")
            self.runner = shard_replica(self.plain, self.amp_dtype, device)
            # the same groups over the replica's (sharded) parameters
            self.groups = param_groups(self.runner.model, self.runner.loss_fn, stage)
            self.scaler = sharded_grad_scaler(device, use_scaler)
        else:
            self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.trained = [p for g in self.groups for p in g["params"] if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.groups, weight_decay=stage.weight_decay)
        self.ema = EMA([p for g in self.groups for p in g["params"]], stage.ema_decay) \
            if stage.ema_decay else None
        if self.parallel == PARALLEL_DDP:
            # Bucket views: the gradients live in DDP's all-reduce buckets instead of beside
            # them (ViT-H: 2.4 GB less per GPU).
            self.runner = nn.parallel.DistributedDataParallel(
                self.plain, device_ids=[device] if device.type == "cuda" else None,
                gradient_as_bucket_view=True)
        self.grad_norm = float("nan")  # the last optimizer step's global norm, before clipping
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite gradient, this stage
        self.consecutive_skipped_steps = 0

    @property
    def train_model(self) -> EmbeddingModel:
        """The model whose forward trains (under FSDP the sharded replica's)."""
        return self.module.model

    @property
    def module(self) -> nn.Module:
        """The train step the optimizer's parameters belong to, unwrapped from DDP."""
        return self.runner.module if self.parallel == PARALLEL_DDP else self.runner

    def sync_weights(self) -> None:
        """Every rank: the plain model holds the trained weights after this (a collective under
        FSDP; nothing to do otherwise, where the plain model is the one trained)."""
        if self.parallel == PARALLEL_FSDP:
            copy_full_weights(self.runner, self.plain)

    def park_plain(self) -> None:
        """Under FSDP the plain model goes back to the CPU after an evaluation point moved
        its backbone onto the device."""
        if self.parallel == PARALLEL_FSDP:
            self.plain.to("cpu")

    def reload_weights(self) -> None:
        """Every rank: train on from the plain model's weights (a resumed checkpoint's)."""
        if self.parallel == PARALLEL_FSDP:
            load_full_weights(self.runner, self.plain)

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
        gradients accumulate locally. FSDP reduce-scatters every micro-step unless
        `fsdp_reduce_every_micro_step` is off (then each rank holds a full unsharded gradient
        through the window: less traffic, more memory)."""
        if self.parallel == PARALLEL_FSDP:
            self.runner.set_requires_gradient_sync(
                window_ends or self.stage.fsdp_reduce_every_micro_step)
            return contextlib.nullcontext()
        if window_ends or self.parallel != PARALLEL_DDP:
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
        """What a resumed stage needs of the optimisation (its RNG is the checkpoint's own).
        The optimizer state is keyed by parameter name and unsharded (`full_optimizer_state`:
        a collective under FSDP, complete on rank 0), so any world size and parallelism
        resumes it."""
        return {"optimizer_full": full_optimizer_state(self.module, self.optimizer),
                "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None,
                "skipped_steps": self.skipped_steps,
                "consecutive_skipped_steps": self.consecutive_skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        if "optimizer_full" in state:
            load_full_optimizer_state(self.module, self.optimizer, state["optimizer_full"])
        else:  # a checkpoint from before the full form: the optimizer's own, index-keyed
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.skipped_steps = state.get("skipped_steps", 0)
        self.consecutive_skipped_steps = state.get("consecutive_skipped_steps", 0)
