"""Stage parameter groups: what a stage names trains, everything else gets no gradient."""
import pytest
import torch

from guie.config import ExperimentConfig, ModelConfig, PreprocessConfig, StageConfig
from guie.losses import ArcFace
from guie.model import build_model
from guie.train.step import TrainStep
from guie.train.optim import param_groups

TINY = ExperimentConfig(model=ModelConfig(backbone="guie-tiny-vit"),
                        preprocess=PreprocessConfig(image_size=64))


def _grads_after_one_backward(train):
    torch.manual_seed(0)
    model, preprocess = build_model(TINY)
    loss_fn = ArcFace(64, 5)
    groups = param_groups(model, loss_fn, StageConfig(train=train, lr_backbone=1e-5))
    images = preprocess(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    TrainStep(model, loss_fn, from_features=False)(images, torch.tensor([0, 3]), 0.3).backward()
    blocks = list(model.visual.transformer.resblocks)
    has_grad = {
        "head": model.head.linear.weight.grad is not None,
        "centres": loss_fn.weight.grad is not None,
        "stem": model.visual.conv1.weight.grad is not None,
        "top": model.visual.proj.grad is not None,
        **{f"block{i}": all(p.grad is not None for p in b.parameters())
           for i, b in enumerate(blocks)},
    }
    return {g["name"] for g in groups}, has_grad


@pytest.mark.parametrize("train, trained", [
    (("head", "centres"), {"head", "centres"}),
    (("backbone",), {"stem", "block0", "block1", "block2", "top"}),
    (("blocks:1-2", "backbone_top"), {"block1", "block2", "top"}),
    (("all",), {"head", "centres", "stem", "block0", "block1", "block2", "top"}),
])
def test_frozen_groups_get_no_gradient(train, trained):
    names, has_grad = _grads_after_one_backward(train)
    assert {k for k, v in has_grad.items() if v} == trained
    assert ("head" in names) == ("head" in trained)


@pytest.mark.parametrize("bad", ["blocks:2-1", "blocks:0-3", "blockz", "heads"])
def test_unknown_or_out_of_range_groups_are_errors(bad):
    model, _ = build_model(TINY)
    with pytest.raises(ValueError, match="is not one of"):
        param_groups(model, ArcFace(64, 5), StageConfig(name="s", train=(bad,)))


def test_layer_decay_and_centre_lr():
    model, _ = build_model(TINY)
    stage = StageConfig(train=("all",), lr_head=1e-3, lr_centres=5e-3, lr_backbone=1e-4,
                        layer_decay=0.5)
    lrs = {g["name"]: g["lr"] for g in param_groups(model, ArcFace(64, 5), stage)}
    assert lrs["head"] == 1e-3 and lrs["centres"] == 5e-3
    # stem, 3 blocks, top: the top learns at lr_backbone, each layer below at half the one above
    assert [lrs[f"backbone.{i}"] for i in range(5)] == [1e-4 * 0.5 ** (4 - i) for i in range(5)]
