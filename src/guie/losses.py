"""Margin losses. The class centres live here, never in the exported model."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from guie.config import LossConfig, StageConfig
from guie.errors import UserValueError


def fp32_region(device: torch.device):
    """Autocast off on `device`: inside, ops run in the dtype of their inputs. Under autocast
    F.linear would cast fp32 inputs back down to fp16/bf16; ArcFace's margin acts near
    cos = 1, where that rounding is largest (bf16: errors up to 0.0025 in the cosine)."""
    available = getattr(torch.amp, "is_autocast_available", lambda t: t in ("cuda", "cpu"))
    if not available(device.type):  # meta: nothing runs
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


class ArcFace(nn.Module):
    """Additive angular margin (ArcFace) with optional sub-centers.

    logits = s * cos(theta_y + m) for the target class and s * cos(theta_j) for the others. With
    k sub-centers per class the class cosine is the max over its k centres (sub-center ArcFace,
    3rd/4th place). Past theta = pi - m, cos(theta + m) would turn back up and reward pushing the
    sample further away, so there the target logit continues as cos(theta) - m * sin(m)
    (monotonic, the usual ArcFace fallback); cos is clamped so acos/sqrt never see |x| > 1.

    Cosines, logits and the cross-entropy are fp32 whatever autocast is active (`fp32_region`);
    the gradient flows back to the embeddings in their own dtype.
    """

    def __init__(self, embed_dim: int, num_classes: int, scale: float = 30.0,
                 margin_rad: float = 0.3, subcenters: int = 1):
        super().__init__()
        self.num_classes = num_classes
        self.subcenters = subcenters
        self.scale = scale
        self.margin_rad = margin_rad
        self.weight = nn.Parameter(torch.empty(num_classes * subcenters, embed_dim))
        nn.init.xavier_uniform_(self.weight)
        # Per-class margins [C] (empty: the scalar margin); a buffer, so checkpoints carry them.
        self.register_buffer("class_margin_rad", torch.zeros(0))

    def set_class_margins(self, margins_rad: torch.Tensor) -> None:
        if margins_rad.shape != (self.num_classes,):
            raise ValueError(f"class margins: expected {self.num_classes} values, "
                             f"got {tuple(margins_rad.shape)}")
        self.class_margin_rad = margins_rad.float().to(self.weight.device)

    def target_logit(self, target_cos: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        sin = torch.sqrt(1.0 - target_cos * target_cos)
        with_margin = target_cos * torch.cos(m) - sin * torch.sin(m)
        fallback = target_cos - m * torch.sin(m)
        return torch.where(target_cos > torch.cos(math.pi - m), with_margin, fallback)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B, C] fp32 cosines to the class centres (the best sub-centre of each class)."""
        with fp32_region(embeddings.device):
            cos = F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float()))
            if self.subcenters > 1:
                # [B, C*k] -> [B, C, k]: best-matching sub-centre per class
                cos = cos.view(-1, self.num_classes, self.subcenters).amax(dim=2)
            return cos.clamp(-1.0 + 1e-7, 1.0 - 1e-7)

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor,
               margin_rad: float | torch.Tensor | None = None) -> torch.Tensor:
        """Scaled logits; `margin_rad` is a float or a per-sample tensor [B]. Per-class margins,
        when set, take precedence over both. fp32 under any autocast."""
        m = self.margin_rad if margin_rad is None else margin_rad
        if self.class_margin_rad.numel():
            m = self.class_margin_rad[labels]
        m = torch.as_tensor(m, dtype=torch.float32, device=embeddings.device)
        with fp32_region(embeddings.device):
            cos = self.cosine(embeddings)
            target_cos = cos.gather(1, labels.view(-1, 1)).squeeze(1)
            target_logit = self.target_logit(target_cos, m)
            logits = cos.scatter(1, labels.view(-1, 1), target_logit.view(-1, 1))
            return logits * self.scale

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                margin_rad: float | torch.Tensor | None = None) -> torch.Tensor:
        with fp32_region(embeddings.device):
            return F.cross_entropy(self.logits(embeddings, labels, margin_rad), labels)


class CosFace(ArcFace):
    """Additive cosine margin: s * (cos(theta_y) - m) (1st place's head, s=30, m=0.55..0.65).

    Monotonic in theta everywhere, so it needs no fallback near pi.
    """

    def target_logit(self, target_cos: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return target_cos - m


def build_loss(cfg: LossConfig, embed_dim: int, num_classes: int) -> ArcFace:
    kinds = {"arcface": ArcFace, "cosface": CosFace}
    if cfg.name not in kinds:
        raise UserValueError(f"loss.name: unknown loss {cfg.name!r} (known: {sorted(kinds)})")
    return kinds[cfg.name](embed_dim, num_classes, cfg.scale, cfg.margin_rad, cfg.subcenters)


def class_margins_from_counts(counts: np.ndarray, min_rad: float, max_rad: float) -> torch.Tensor:
    """4th place's adaptive margin: n^-1/4 mapped linearly onto [min_rad, max_rad], so the
    rarest class gets max_rad and the most frequent min_rad. Classes without images (count 0)
    never appear as targets; they get max_rad."""
    x = np.power(np.maximum(counts, 1).astype(np.float64), -0.25)
    span = x.max() - x.min()
    unit = (x - x.min()) / span if span > 0 else np.ones_like(x)
    return torch.from_numpy(min_rad + (max_rad - min_rad) * unit).float()


def margin_at(stage: StageConfig, loss: LossConfig, epoch: float) -> float:
    """The stage's margin after `epoch` epochs: its base (or the loss's) plus one step per
    finished epoch, capped (2nd place: 0.3 + 0.1/epoch, cap 0.8)."""
    base = loss.margin_rad if stage.margin_rad is None else stage.margin_rad
    if not stage.margin_step_rad_per_epoch:
        return base
    return min(stage.margin_max_rad, base + stage.margin_step_rad_per_epoch * math.floor(epoch))
