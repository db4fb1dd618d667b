"""One training step of a stage: what the loop runs per micro-batch, and what the benchmarks time.

`StageStep` owns the stage's optimisation: AdamW over the groups the stage trains, the grad
scaler and autocast of its `amp` mode, the EMA, and the warmup + cosine schedule. Calling it on
micro-batch `b` runs forward and backward, and every `grad_accum` micro-batches the optimizer.
"""
from __future__ import annotations

import torch
from torch import nn

from guie.config import StageConfig
from guie.losses import ArcFace
from guie.model import EmbeddingModel
from guie.train.amp import amp_settings
from guie.train.averaging import EMA
from guie.train.optim import lr_multiplier, param_groups


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
        return self.loss_fn(embeddings, labels, margin_rad)


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
        self.optimizer = torch.optim.AdamW(self.groups, weight_decay=stage.weight_decay)
        self.ema = EMA([p for g in self.groups for p in g["params"]], stage.ema_decay) \
            if stage.ema_decay else None
        use_scaler, self.amp_dtype = amp_settings(stage.amp, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.runner: nn.Module = TrainStep(model, loss_fn, from_features)
        if world > 1:
            self.runner = nn.parallel.DistributedDataParallel(
                self.runner, device_ids=[device] if device.type == "cuda" else None)

    def __call__(self, b: int, inputs: torch.Tensor, sizes_hw: torch.Tensor | None,
                 labels: torch.Tensor, margin_rad: float, weight: float = 1.0) -> float:
        """Micro-batch `b`; returns its loss (NaN for an empty batch, or with `weight` 0: a
        stand-in batch that only keeps the DDP ranks in step)."""
        loss_value = float("nan")
        grad_accum = self.stage.grad_accum
        if len(labels):
            with torch.autocast(self.device.type, dtype=self.amp_dtype,
                                enabled=self.amp_dtype is not None):
                loss = self.runner(inputs.to(self.device, non_blocking=True),
                                   labels.to(self.device), margin_rad, sizes_hw)
            self.scaler.scale(loss * weight / grad_accum).backward()
            loss_value = loss.item() if weight else loss_value
        if (b + 1) % grad_accum == 0:
            mult = lr_multiplier(b // grad_accum, self.total_steps, self.warmup_steps)
            for g in self.optimizer.param_groups:
                g["lr"] = g["initial_lr"] * mult
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update()
        return loss_value

    def state_dict(self) -> dict:
        """What a resumed stage needs of the optimisation (its RNG is the checkpoint's own)."""
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
