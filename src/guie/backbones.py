"""The backbone seam: what the kit needs to know of an image tower, for each kind it supports.

The model, the optimizer's layer groups, the stages' resolution and the exports ask a `Backbone`
instead of reaching into a ViT's attributes. Two kinds:

- `VisionTransformerBackbone`: open_clip's `VisionTransformer` (ViT-H-14, the tiny test ViT):
  layer groups are patch/position embeddings, each transformer block, final norm + projection;
  any input size (position embeddings interpolated) and patch stride (overlapping patches).
- `TimmTrunkBackbone`: open_clip's `TimmModel` around a timm trunk (EfficientNet-Lite0,
  ConvNeXt): layer groups are timm's own fine-grained `group_matcher` (stem, each block, head
  conv); any input size (global average pooling); no patch stride (it has no patch embedding:
  refused, never ignored); mean/std/interpolation from timm's `pretrained_cfg`. Its features
  are the trunk's pooled ones (1280-d for Lite0), not a projection the weights do not cover.

BatchNorm: a frozen layer must not learn, and a BatchNorm's running statistics are learnt from
every training-mode forward. `freeze_batchnorm` puts every BatchNorm without trainable
parameters into eval mode; the training loop calls it after each `model.train()`. Inside the
backbone the loop goes further and keeps every BatchNorm in eval mode, trained or not
(`freeze_batchnorm(visual, statistics_of_trained=True)`): its scale and shift still learn, but
normalisation uses the pretrained running statistics. Fine-tuning batches (Kaggle: 16-32 images
per GPU, augmented crops) are too small and too unlike the pretraining data for batch
statistics; measured on Lite0, train-mode BatchNorm in stage 2 dropped held-out mP@5 from 0.845
to 0.59 within one epoch at a backbone LR of 3e-5.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from guie.errors import UserValueError

# A preprocessing field left at this (CLIP's) default is taken from the backbone if it has its
# own (`resolve_preprocess`).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# timm's group_matcher keys what comes after every block (head conv, final norm) 99999.
_TOP_KEY = 99999


@dataclass(frozen=True)
class BackbonePreprocess:
    """The input statistics a backbone was pretrained with."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str


class Backbone:
    """One image tower seen through the kit's needs. `visual` stays the nn.Module the model,
    the checkpoints and the export hold; this object only reads and adjusts it."""

    kind = "backbone"

    def __init__(self, visual: nn.Module, name: str = ""):
        self.visual = visual
        self.name = name or type(visual).__name__

    @property
    def feature_dim(self) -> int:
        raise NotImplementedError

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Parameters bottom-up: [stem], [block 0], ..., [block L-1], [top]. Layer-wise LR decay
        and `blocks:I-J` partial unfreezing index these (stem 0, blocks 1..L, top L+1)."""
        raise NotImplementedError

    @property
    def num_blocks(self) -> int:
        return len(self.layer_groups()) - 2

    def set_resolution(self, preprocess: nn.Module, image_size_px: int,
                       patch_stride_px: int = 0) -> None:
        """Feed the tower `image_size_px` images (0: keep the current size); `patch_stride_px`
        0 keeps the current stride."""
        raise NotImplementedError

    @property
    def default_patch_stride(self) -> int:
        """The stride a stage without `patch_stride_px` runs at (0: no patch embedding)."""
        return 0

    def preprocess_defaults(self) -> BackbonePreprocess | None:
        """The backbone's own input statistics, or None when it has none of its own (CLIP's)."""
        return None

    def supports_compat_export(self) -> str:
        """'' if `--compat torch1.11` can rebuild this tower, else why not."""
        return ""


class VisionTransformerBackbone(Backbone):
    kind = "open_clip VisionTransformer"

    @property
    def feature_dim(self) -> int:
        visual = self.visual
        return int(visual.output_dim) if visual.proj is not None else int(visual.transformer.width)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        blocks = list(self.visual.transformer.resblocks)
        block_params = {id(p) for b in blocks for p in b.parameters()}
        top_names = ("ln_post", "proj", "attn_pool")
        stem, top = [], []
        for name, p in self.visual.named_parameters():
            if id(p) in block_params:
                continue
            (top if name.startswith(top_names) else stem).append(p)
        return [stem] + [list(b.parameters()) for b in blocks] + [top]

    @property
    def num_blocks(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def default_patch_stride(self) -> int:
        return int(self.visual.conv1.kernel_size[0])

    def set_resolution(self, preprocess: nn.Module, image_size_px: int,
                       patch_stride_px: int = 0) -> None:
        """Patches every `patch_stride_px` (< patch size: overlapping patches, 1st place), the
        position embeddings interpolated to the new token grid. Idempotent."""
        visual = self.visual
        conv = visual.conv1
        size = image_size_px or preprocess.image_size
        patch = int(conv.kernel_size[0])
        stride = patch_stride_px or int(conv.stride[0])
        if size < patch:
            raise UserValueError(f"image_size_px={size} is smaller than the {patch} px patch")
        grid = (size - patch) // stride + 1
        old = visual.positional_embedding
        old_grid = int(round((old.shape[0] - 1) ** 0.5))
        preprocess.image_size = size
        conv.stride = (stride, stride)
        if grid == old_grid:
            return
        cls_pos, patch_pos = old[:1], old[1:]
        patch_pos = patch_pos.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)
        with torch.no_grad():
            patch_pos = F.interpolate(patch_pos.float(), size=(grid, grid), mode="bicubic",
                                      align_corners=False).to(old.dtype)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid * grid, -1)
        visual.positional_embedding = nn.Parameter(torch.cat([cls_pos.detach(), patch_pos]),
                                                   requires_grad=old.requires_grad)
        visual.grid_size = (grid, grid)
        visual.image_size = (size, size)


class TimmTrunkBackbone(Backbone):
    kind = "timm trunk"

    @property
    def trunk(self) -> nn.Module:
        return self.visual.trunk

    @property
    def feature_dim(self) -> int:
        head = self.visual.head
        if len(head) == 0:
            return int(self.trunk.num_features)
        last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
        return int(last.out_features)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """timm's fine-grained groups (the trunk's `group_matcher(coarse=False)`): its `stem`,
        then one group per key its block patterns give (captured numbers + suffix, in order),
        and the top: what matches a pattern keyed past every block (timm's (99999,)).
        open_clip's projection, if any, joins the top. A parameter no pattern names is an
        error: it would silently never train."""
        matcher = self.trunk.group_matcher(coarse=False)
        stem_re = matcher["stem"]
        block_res = matcher["blocks"]
        if isinstance(block_res, str):
            block_res = [(block_res, None)]
        stem, top, blocks, unnamed = [], [], {}, []
        for name, p in self.trunk.named_parameters():
            if re.match(stem_re, name):
                stem.append(p)
                continue
            for pattern, suffix in block_res:
                m = re.match(pattern, name)
                if m:
                    key = tuple(int(g) for g in m.groups() if g is not None) + tuple(suffix or ())
                    if key and key[0] >= _TOP_KEY:
                        top.append(p)
                    else:
                        blocks.setdefault(key, []).append(p)
                    break
            else:
                unnamed.append(name)
        if unnamed or not blocks:
            raise UserValueError(f"{self.name}: timm's group_matcher leaves {unnamed[:5]} in no "
                                 "layer group")
        head = list(self.visual.head.parameters())
        return [stem] + [blocks[k] for k in sorted(blocks)] + [top + head]

    def set_resolution(self, preprocess: nn.Module, image_size_px: int,
                       patch_stride_px: int = 0) -> None:
        """Any input size: the trunk's global average pooling takes any feature map."""
        if patch_stride_px:
            raise UserValueError(f"patch_stride_px={patch_stride_px}: {self.name} is a {self.kind} "
                                 "without a patch embedding; overlapping patches apply to ViTs "
                                 "only (set patch_stride_px=0)")
        size = image_size_px or preprocess.image_size
        if size < 32:  # five stride-2 stages: below 32 px the last map is under one pixel
            raise UserValueError(f"image_size_px={size}: {self.name} needs at least 32 px")
        preprocess.image_size = size
        self.visual.image_size = (size, size)

    def preprocess_defaults(self) -> BackbonePreprocess | None:
        cfg = getattr(self.trunk, "pretrained_cfg", None) or {}
        if "mean" not in cfg or "std" not in cfg:
            return None
        interpolation = cfg.get("interpolation", "bicubic")
        if interpolation not in ("bicubic", "bilinear"):
            interpolation = "bicubic"
        return BackbonePreprocess(tuple(cfg["mean"]), tuple(cfg["std"]), interpolation)

    def supports_compat_export(self) -> str:
        return (f"{self.name} is a {self.kind}; the torch 1.11 export rebuilds open_clip "
                "VisionTransformers only (timm's 'same' padding of tf_ models records aten::pad, "
                "which torch 1.11 lacks). Export with compat=none")


def backbone_of(visual: nn.Module, name: str = "") -> Backbone:
    """The seam object for an image tower; an unsupported tower is an error naming its type."""
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        return VisionTransformerBackbone(visual, name)
    if isinstance(visual, TimmModel):
        return TimmTrunkBackbone(visual, name)
    raise UserValueError(f"model.backbone{' ' + repr(name) if name else ''}: a "
                         f"{type(visual).__name__} tower is not supported; the kit takes open_clip "
                         "VisionTransformers and timm trunks (timm_model_name configs)")


def resolve_preprocess(cfg, backbone: Backbone):
    """`cfg` (a PreprocessConfig) with mean, std and interpolation taken from the backbone
    where the config left CLIP's defaults and the backbone has statistics of its own: a timm
    trunk fed CLIP's mean/std would see inputs it was never trained on."""
    from dataclasses import replace

    own = backbone.preprocess_defaults()
    if own is None:
        return cfg
    changes = {}
    if tuple(cfg.mean) == CLIP_MEAN and tuple(cfg.std) == CLIP_STD:
        changes.update(mean=own.mean, std=own.std, interpolation=own.interpolation)
    return replace(cfg, **changes)


def freeze_batchnorm(module: nn.Module, statistics_of_trained: bool = False) -> int:
    """Put every BatchNorm whose parameters are all frozen into eval mode (with
    `statistics_of_trained`: every BatchNorm), so its running statistics stay as they are;
    returns how many. Call after `module.train()`."""
    count = 0
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (statistics_of_trained or not any(
                p.requires_grad for p in m.parameters(recurse=False))):
            m.eval()
            count += 1
    return count
