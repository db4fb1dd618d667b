"""Parameter groups (head, class centres, backbone blocks with layer-wise decay) and LR schedule."""
from __future__ import annotations

import math

from torch import nn

from guie.config import StageConfig
from guie.model import EmbeddingModel


def backbone_layer_groups(visual: nn.Module) -> list[list[nn.Parameter]]:
    """Backbone parameters bottom-up: [embeddings], [block 0], ..., [block L-1], [final norm+proj].

    The layer-wise LR decay of 4th place multiplies group i's LR by decay^(L+1-i), so the
    patch embedding learns least and the top of the network most.
    """
    blocks = list(visual.transformer.resblocks)
    block_params = {id(p) for b in blocks for p in b.parameters()}
    top_names = ("ln_post", "proj", "attn_pool")
    stem, top = [], []
    for name, p in visual.named_parameters():
        if id(p) in block_params:
            continue
        (top if name.startswith(top_names) else stem).append(p)
    return [stem] + [list(b.parameters()) for b in blocks] + [top]


def param_groups(model: EmbeddingModel, loss_fn: nn.Module, stage: StageConfig) -> list[dict]:
    groups = [{"name": "head", "params": list(model.head.parameters()), "lr": stage.lr_head},
              {"name": "centres", "params": list(loss_fn.parameters()), "lr": stage.lr_head,
               "weight_decay": 0.0}]
    for p in model.visual.parameters():
        p.requires_grad_(stage.train_backbone)
    if stage.train_backbone:
        layers = backbone_layer_groups(model.visual)
        top = len(layers) - 1
        for i, params in enumerate(layers):
            lr = stage.lr_backbone * stage.layer_decay ** (top - i)
            groups.append({"name": f"backbone.{i}", "params": params, "lr": lr})
    for g in groups:
        g["initial_lr"] = g["lr"]
    return [g for g in groups if g["params"]]


def lr_multiplier(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup to 1, then cosine to 0 at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
