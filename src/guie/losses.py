"""Margin losses. The class centres live here, never in the exported model."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ArcFace(nn.Module):
    """Additive angular margin (ArcFace) with optional sub-centers.

    logits = s * cos(theta_y + m) for the target class and s * cos(theta_j) for the others. With
    k sub-centers per class the class cosine is the max over its k centres (sub-center ArcFace,
    3rd/4th place). Past theta = pi - m, cos(theta + m) would turn back up and reward pushing the
    sample further away, so there the target logit continues as cos(theta) - m * sin(m)
    (monotonic, the usual ArcFace fallback); cos is clamped so acos/sqrt never see |x| > 1.
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

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float()))
        if self.subcenters > 1:
            # [B, C*k] -> [B, C, k]: best-matching sub-centre per class
            cos = cos.view(-1, self.num_classes, self.subcenters).amax(dim=2)
        return cos.clamp(-1.0 + 1e-7, 1.0 - 1e-7)

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor,
               margin_rad: float | torch.Tensor | None = None) -> torch.Tensor:
        """Scaled logits; `margin_rad` is a float or a per-sample tensor [B] (per-class margins)."""
        m = self.margin_rad if margin_rad is None else margin_rad
        m = torch.as_tensor(m, dtype=torch.float32, device=embeddings.device)
        cos = self.cosine(embeddings)
        target_cos = cos.gather(1, labels.view(-1, 1)).squeeze(1)
        sin = torch.sqrt(1.0 - target_cos * target_cos)
        with_margin = target_cos * torch.cos(m) - sin * torch.sin(m)
        fallback = target_cos - m * torch.sin(m)
        target_logit = torch.where(target_cos > torch.cos(math.pi - m), with_margin, fallback)
        logits = cos.scatter(1, labels.view(-1, 1), target_logit.view(-1, 1))
        return logits * self.scale

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                margin_rad: float | torch.Tensor | None = None) -> torch.Tensor:
        return F.cross_entropy(self.logits(embeddings, labels, margin_rad), labels)
