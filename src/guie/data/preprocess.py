"""The one preprocessing definition: used by validation, the feature cache and the export.

`Preprocess` is a scriptable module taking images as the Kaggle host feeds them: [B, 3, H, W],
uint8 or float in 0..255, any H and W. It resizes, scales to 0..1 and normalises with the
backbone's mean/std. Local scores therefore measure exactly what the host will run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from guie.config import PreprocessConfig


class Preprocess(nn.Module):
    def __init__(self, cfg: PreprocessConfig):
        super().__init__()
        self.image_size = int(cfg.image_size)
        self.crop = cfg.resize_mode == "shorter_crop"
        self.mode = cfg.interpolation
        self.antialias = bool(cfg.antialias)
        # [1, 3, 1, 1] so they broadcast over [B, 3, S, S]; pre-scaled for 0..255 input.
        self.register_buffer("mean255", torch.tensor(cfg.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std255", torch.tensor(cfg.std).view(1, 3, 1, 1) * 255.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.mean255.dtype)
        h, w = x.shape[-2], x.shape[-1]
        size = self.image_size
        if self.crop:
            # Shorter side to `size`, then a centre crop (CLIP's own evaluation transform).
            scale = size / float(min(h, w))
            new_h = max(size, int(round(h * scale)))
            new_w = max(size, int(round(w * scale)))
            x = self._resize(x, new_h, new_w)
            top = (new_h - size) // 2
            left = (new_w - size) // 2
            x = x[:, :, top:top + size, left:left + size]
        else:
            x = self._resize(x, size, size)
        return (x - self.mean255) / self.std255

    def _resize(self, x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
        if x.shape[-2] == out_h and x.shape[-1] == out_w:
            return x
        # Bicubic overshoots, so clamp back to 0..255.
        return self._interpolate(x, [out_h, out_w]).clamp(0.0, 255.0)

    def _interpolate(self, x: torch.Tensor, size: list[int]) -> torch.Tensor:
        # Antialias only matters when shrinking, which is the usual case (photos -> 224).
        return F.interpolate(x, size=size, mode=self.mode, align_corners=False,
                             antialias=self.antialias)
