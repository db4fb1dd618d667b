"""TorchScript export in the competition's contract, packed as `submission.zip`.

The host loads `saved_model.pt` from the zip root and calls it on one RGB image at a time,
[1, 3, H, W] in 0..255 at its original size (most likely uint8). So everything the eager
pipeline does before the backbone (resize, /255, mean/std) lives inside `forward`, through the
very `Preprocess` module used for validation. Output: float32 [B, 64], L2-normalised.

The head and any reduction to 64 (`guie.reduction`) are folded into one Linear. Test-time views
(flip, aspect-ratio crops) run inside `forward` and are averaged before the L2 norm. Several
trained models can run side by side (`ConcatSubmissionModel`, 4th place): their unit embeddings
concatenated, then the reduction, then the L2 norm.
"""
from __future__ import annotations

import copy
import zipfile
from pathlib import Path
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from guie.data.preprocess import Preprocess
from guie.errors import UserValueError
from guie.model import EmbeddingModel, image_aspect_features
from guie.reduction import fold_into_linear

TTA_VIEWS = ("flip", "aspect_crops")
# aspect_crops: images at least this elongated also get their two square ends as views.
ASPECT_CROP_MIN_RATIO = 1.5

# Shapes the contract must survive: the host's odd sizes, extreme aspect ratios, tiny images.
CONTRACT_SHAPES = ((1, 3, 300, 1200), (1, 3, 512, 512), (1, 3, 1200, 300), (1, 3, 7, 5),
                   (2, 3, 224, 224), (1, 3, 97, 1))


class SubmissionModel(nn.Module):
    """images [B, 3, H, W] uint8/float 0..255 -> float32 [B, embed_dim], unit norm."""

    def __init__(self, preprocess: Preprocess, visual: nn.Module, linear: nn.Linear,
                 tta: tuple[str, ...] = (), aspect: bool = False):
        super().__init__()
        unknown = sorted(set(tta) - set(TTA_VIEWS))
        if unknown:
            raise UserValueError(f"export.tta: unknown views {unknown} "
                                 f"(known: {', '.join(TTA_VIEWS)})")
        self.preprocess = preprocess
        self.visual = visual
        self.linear = linear
        self.flip: bool = "flip" in tta
        self.aspect_crops: bool = "aspect_crops" in tta
        self.aspect_crop_min_ratio: float = ASPECT_CROP_MIN_RATIO
        self.aspect_features: bool = aspect  # the head also takes the view's aspect features

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        x = x.to(self.linear.weight.dtype)
        feats = self.visual(x)
        if self.aspect_features:
            # From this view's H and W before the resize, as the data loader reports them.
            shape = image_aspect_features(images).to(feats.device, feats.dtype)
            feats = torch.cat([feats, shape], dim=1)
        return self.linear(feats).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The host may hand a CUDA tensor to a model saved on the CPU, or the reverse: compute
        # where the weights are (a no-op when they already agree).
        images = images.to(self.linear.weight.device)
        total = self.embed(images)
        views = 1
        if self.flip:
            total = total + self.embed(images.flip(-1))
            views += 1
        if self.aspect_crops:
            h, w = images.shape[-2], images.shape[-1]
            short = min(h, w)
            if max(h, w) >= self.aspect_crop_min_ratio * short:
                if w > h:
                    ends = (images[:, :, :, :short], images[:, :, :, w - short:])
                else:
                    ends = (images[:, :, :short, :], images[:, :, h - short:, :])
                total = total + self.embed(ends[0]) + self.embed(ends[1])
                views += 2
        return F.normalize(total / views, dim=-1)


class ConcatSubmissionModel(nn.Module):
    """images -> each tower's unit embedding (its own preprocessing, backbone, head and views),
    concatenated -> the reduction -> L2 norm. The towers' norms keep one backbone from
    outweighing the other in the reduction, which is why it cannot fold into their heads."""

    def __init__(self, towers: list[SubmissionModel], reduction: nn.Linear):
        super().__init__()
        self.towers = nn.ModuleList(towers)
        self.reduction = reduction

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        parts: List[torch.Tensor] = []
        images = images.to(self.reduction.weight.device)
        for tower in self.towers:
            parts.append(tower(images))
        return F.normalize(self.reduction(torch.cat(parts, dim=1)), dim=-1)


def build_submission_model(model: EmbeddingModel, preprocess: Preprocess,
                           fp16_weights: bool = False,
                           reduction: tuple[torch.Tensor, torch.Tensor] | None = None,
                           tta: tuple[str, ...] = ()) -> SubmissionModel:
    """An eval-mode copy with the head, and the reduction (W, b) if any, folded to one Linear
    (dropout branches vanish)."""
    # eval: BatchNorm uses its running statistics and dropout is off in the exported graph.
    visual = copy.deepcopy(model.visual).eval()
    if hasattr(visual, "set_grad_checkpointing"):
        visual.set_grad_checkpointing(False)
    linear = copy.deepcopy(model.head.fold())
    if reduction is not None:
        linear = fold_into_linear(linear, *reduction)
    export = SubmissionModel(copy.deepcopy(preprocess), visual, linear, tta,
                             aspect=model.aspect_features).eval()
    if fp16_weights:
        # Halve the file (ViT-H: 2.4 -> 1.2 GiB); preprocessing stays fp32 for exact resizing.
        export.visual.half()
        export.linear.half()
    for p in export.parameters():
        p.requires_grad_(False)
    return export


def script_and_save(export: nn.Module, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scripted = torch.jit.script(export)
    tmp = path.with_suffix(".tmp")
    scripted.save(str(tmp))
    tmp.replace(path)
    return path


def write_submission_zip(saved_model: str | Path, zip_path: str | Path) -> Path:
    """`saved_model.pt` at the zip root. Stored, not deflated: the .pt is already a zip."""
    zip_path = Path(zip_path)
    tmp = zip_path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.write(saved_model, arcname="saved_model.pt")
    tmp.replace(zip_path)
    return zip_path


def check_contract(module: torch.jit.ScriptModule | nn.Module, embed_dim: int = 64,
                   shapes=CONTRACT_SHAPES, device: str = "cpu") -> None:
    """Run the host's kinds of input through a model and fail loudly on any breach."""
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        pixels = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        for images in (pixels, pixels.float()):
            with torch.no_grad():
                out = module(images.to(device))
            where = f"input {tuple(shape)} {images.dtype}"
            if not isinstance(out, torch.Tensor) or out.dtype != torch.float32:
                raise AssertionError(f"{where}: output must be a float32 tensor, got {type(out)} "
                                     f"{getattr(out, 'dtype', '')}")
            if tuple(out.shape) != (shape[0], embed_dim):
                raise AssertionError(f"{where}: output shape {tuple(out.shape)}, "
                                     f"expected {(shape[0], embed_dim)}")
            if not torch.isfinite(out).all():
                raise AssertionError(f"{where}: output has NaN or Inf")
            norms = out.norm(dim=1)
            if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
                raise AssertionError(f"{where}: output is not L2-normalised (norms {norms})")


def export_submission_zip(model: EmbeddingModel, preprocess: Preprocess, out_dir: str | Path,
                          fp16_weights: bool = False,
                          reduction: tuple[torch.Tensor, torch.Tensor] | None = None,
                          tta: tuple[str, ...] = ()) -> Path:
    """Script, save, reload and contract-check; returns the path to submission.zip."""
    export = build_submission_model(model, preprocess, fp16_weights, reduction, tta)
    return save_checked_zip(export, out_dir, embed_dim=export.linear.out_features)


def build_concat_model(towers: list[tuple[EmbeddingModel, Preprocess]],
                       reduction: tuple[torch.Tensor, torch.Tensor] | None,
                       fp16_weights: bool = False,
                       tta: tuple[str, ...] = ()) -> ConcatSubmissionModel:
    """Towers side by side; `reduction` (W, b) maps their concatenated unit embeddings, None
    keeps the concatenation as it is."""
    parts = [build_submission_model(model, pre, fp16_weights, tta=tta) for model, pre in towers]
    total = sum(part.linear.out_features for part in parts)
    weight, bias = reduction if reduction is not None else (torch.eye(total), torch.zeros(total))
    if weight.shape[1] != total:
        raise UserValueError(f"export.concat: the reduction takes {weight.shape[1]} inputs but the "
                             f"towers give {total}")
    linear = nn.Linear(total, weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    return ConcatSubmissionModel(parts, linear.requires_grad_(False)).eval()


def export_concat_submission_zip(towers: list[tuple[EmbeddingModel, Preprocess]],
                                 out_dir: str | Path,
                                 reduction: tuple[torch.Tensor, torch.Tensor] | None,
                                 fp16_weights: bool = False, tta: tuple[str, ...] = ()) -> Path:
    """Like `export_submission_zip`, for several trained models side by side."""
    export = build_concat_model(towers, reduction, fp16_weights, tta)
    return save_checked_zip(export, out_dir, embed_dim=export.reduction.out_features)


def save_checked_zip(export: nn.Module, out_dir: str | Path, embed_dim: int) -> Path:
    """Script and save `out_dir/saved_model.pt`, reload it, check the contract, then zip it."""
    out_dir = Path(out_dir)
    saved = script_and_save(export, out_dir / "saved_model.pt")
    check_contract(torch.jit.load(str(saved)), embed_dim=embed_dim)
    return write_submission_zip(saved, out_dir / "submission.zip")
