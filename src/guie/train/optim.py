"""Parameter groups (head, class centres, backbone blocks with layer-wise decay) and LR schedule."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from torch import nn

from guie.backbones import backbone_of
from guie.config import StageConfig
from guie.errors import UserValueError
from guie.model import EmbeddingModel


def backbone_layer_groups(visual: nn.Module) -> list[list[nn.Parameter]]:
    """Backbone parameters bottom-up: [stem], [block 0], ..., [block L-1], [top]
    (`guie.backbones`: a ViT's embeddings / blocks / final norm + projection, a timm trunk's
    stem / blocks / head conv).

    The layer-wise LR decay of 4th place multiplies group i's LR by decay^(L+1-i), so the
    stem learns least and the top of the network most.
    """
    return backbone_of(visual).layer_groups()


@dataclass(frozen=True)
class Trainable:
    head: bool
    centres: bool
    layers: frozenset[int]  # indices into backbone_layer_groups: 0 stem, 1..L blocks, L+1 top

    @property
    def backbone(self) -> bool:
        return bool(self.layers)


def trainable(stage: StageConfig, num_blocks: int) -> Trainable:
    """What `stage.train` names, checked against a backbone of `num_blocks` blocks."""
    head = centres = False
    layers: set[int] = set()
    for item in stage.train:
        blocks = re.fullmatch(r"blocks:(\d+)-(\d+)", item)
        if item == "all":
            head = centres = True
            layers.update(range(num_blocks + 2))
        elif item == "head":
            head = True
        elif item == "centres":
            centres = True
        elif item == "backbone":
            layers.update(range(num_blocks + 2))
        elif item == "backbone_stem":
            layers.add(0)
        elif item == "backbone_top":
            layers.add(num_blocks + 1)
        elif blocks and int(blocks[1]) <= int(blocks[2]) < num_blocks:
            layers.update(range(int(blocks[1]) + 1, int(blocks[2]) + 2))
        else:
            raise UserValueError(f"{stage.name}.train: {item!r} is not one of head, centres, "
                                 f"backbone, backbone_stem, backbone_top, all, blocks:I-J with "
                                 f"0 <= I <= J < {num_blocks} (this backbone's blocks)")
    if not (head or centres or layers):
        raise UserValueError(f"{stage.name}.train: nothing to train")
    return Trainable(head, centres, frozenset(layers))


def trains_backbone(model: EmbeddingModel, stage: StageConfig) -> bool:
    return trainable(stage, backbone_of(model.visual).num_blocks).backbone


def param_groups(model: EmbeddingModel, loss_fn: nn.Module, stage: StageConfig) -> list[dict]:
    """Optimizer groups of what the stage trains; everything else gets requires_grad=False."""
    layers = backbone_layer_groups(model.visual)
    what = trainable(stage, len(layers) - 2)
    lr_centres = stage.lr_head if stage.lr_centres is None else stage.lr_centres
    groups = []
    if what.head:
        groups.append({"name": "head", "params": list(model.head.parameters()),
                       "lr": stage.lr_head})
    if what.centres:
        groups.append({"name": "centres", "params": list(loss_fn.parameters()),
                       "lr": lr_centres, "weight_decay": 0.0})
    for p in list(model.head.parameters()) + list(loss_fn.parameters()):
        p.requires_grad_(False)
    for p in model.visual.parameters():
        p.requires_grad_(False)
    top = len(layers) - 1
    for i, params in enumerate(layers):
        if i in what.layers:
            lr = stage.lr_backbone * stage.layer_decay ** (top - i)
            groups.append({"name": f"backbone.{i}", "params": params, "lr": lr})
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["initial_lr"] = g["lr"]
        for p in g["params"]:
            # The identity head's placeholder stays frozen: it is not a weight.
            p.requires_grad_(p.numel() > 0)
    return groups


def lr_multiplier(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup to 1, then cosine to 0 at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
