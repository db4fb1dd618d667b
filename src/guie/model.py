"""Backbone (open_clip image tower) + embedding head, returned with its matching preprocessing.

Only the image tower is built (ViT-H-14's text tower would cost 354M parameters for nothing),
through open_clip's own `_build_vision_tower`, so the model code is open_clip's. Weights come from
a local file or nowhere: the kit never downloads at run time.
"""
from __future__ import annotations

from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import _build_vision_tower
from torch import nn

from guie.config import ExperimentConfig, ModelConfig
from guie.data.preprocess import Preprocess

TINY_BACKBONE = "guie-tiny-vit"
open_clip.add_model_config(Path(__file__).parent / "model_configs")


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
        rates = torch.linspace(dropout_min, dropout_max, num_branches).tolist()
        self.dropouts = nn.ModuleList(nn.Dropout(p) for p in rates)
        self.linears = nn.ModuleList(nn.Linear(feature_dim, embed_dim) for _ in rates)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        outs = [lin(drop(features)) for drop, lin in zip(self.dropouts, self.linears)]
        return torch.stack(outs).mean(0)

    def fold(self) -> nn.Linear:
        first = self.linears[0]
        folded = nn.Linear(first.in_features, first.out_features).to(first.weight.device)
        with torch.no_grad():
            folded.weight.copy_(torch.stack([lin.weight for lin in self.linears]).mean(0))
            folded.bias.copy_(torch.stack([lin.bias for lin in self.linears]).mean(0))
        return folded


def build_head(cfg: ModelConfig, feature_dim: int) -> nn.Module:
    if cfg.head == "linear":
        return LinearHead(feature_dim, cfg.embed_dim, cfg.dropout)
    if cfg.head == "multi_dropout":
        return MultiDropoutHead(feature_dim, cfg.embed_dim, cfg.num_branches,
                                cfg.dropout_min, cfg.dropout)
    raise ValueError(f"model.head: unknown head {cfg.head!r}")


class EmbeddingModel(nn.Module):
    """visual backbone -> head -> L2 norm. Takes preprocessed (normalised, resized) images."""

    def __init__(self, visual: nn.Module, head: nn.Module, feature_dim: int):
        super().__init__()
        self.visual = visual
        self.head = head
        self.feature_dim = feature_dim

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(features.to(self.head_dtype())), dim=-1)

    def head_dtype(self) -> torch.dtype:
        return next(self.head.parameters()).dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.features(images))


def build_visual(cfg: ModelConfig) -> tuple[nn.Module, int]:
    """The open_clip image tower by name and its output feature size."""
    model_cfg = open_clip.get_model_config(cfg.backbone)
    if model_cfg is None:
        known = ", ".join(open_clip.list_models())
        raise ValueError(f"model.backbone: unknown open_clip model {cfg.backbone!r}. Known: {known}")
    visual = _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"],
                                 quick_gelu=model_cfg.get("quick_gelu", False))
    if cfg.pretrained_path:
        load_visual_weights(visual, cfg.pretrained_path)
    if not hasattr(visual, "proj") or not hasattr(visual, "transformer"):
        raise ValueError(f"model.backbone: {cfg.backbone!r} is not an open_clip VisionTransformer")
    if cfg.use_projection:
        feature_dim = int(visual.output_dim)
    else:
        # 2nd place: the pre-projection token (width-d: 1280 for ViT-H-14) carries more detail.
        visual.proj = None
        feature_dim = int(visual.transformer.width)
    if cfg.grad_checkpointing:
        visual.set_grad_checkpointing(True)
    return visual, feature_dim


def load_visual_weights(visual: nn.Module, path: str) -> None:
    """Load a full open_clip checkpoint (visual.* keys) or a visual-only state_dict, strictly."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"model.pretrained_path: no weights file at {file}")
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
    expected = visual.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [k for k in state if k in expected and expected[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{file}: weights do not match the backbone: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {mismatched[:5]}")
    visual.load_state_dict(state)


def build_model(cfg: ExperimentConfig) -> tuple[EmbeddingModel, Preprocess]:
    """The embedding model and the preprocessing it must be fed with."""
    visual, feature_dim = build_visual(cfg.model)
    head = build_head(cfg.model, feature_dim)
    return EmbeddingModel(visual, head, feature_dim), Preprocess(cfg.preprocess)


def backbone_blocks(model: EmbeddingModel) -> list[nn.Module]:
    return list(model.visual.transformer.resblocks)
