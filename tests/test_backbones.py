"""The backbone seam: one interface, a ViT and a timm trunk behind it, refusals by name."""
from dataclasses import replace

import pytest
import torch
from torch import nn

from guie.backbones import (CLIP_MEAN, TimmTrunkBackbone, VisionTransformerBackbone, backbone_of,
                            freeze_batchnorm)
from guie.config import TINY_BACKBONE, ExperimentConfig, ModelConfig, PreprocessConfig
from guie.model import backbone, build_model, set_resolution
from guie.train.optim import param_groups

LITE0 = "guie-lite0"


@pytest.fixture(scope="module")
def lite0():
    return build_model(ExperimentConfig(model=ModelConfig(backbone=LITE0)))


def test_lite0_trunk_gives_its_pooled_1280_features_without_a_projection(lite0):
    model, _ = lite0
    assert isinstance(backbone(model), TimmTrunkBackbone)
    assert model.feature_dim == 1280
    assert not list(model.visual.head.parameters())  # no random proj="linear" layer
    with torch.no_grad():
        assert model.visual.eval()(torch.randn(2, 3, 64, 80)).shape == (2, 1280)


def test_lite0_layer_groups_cover_every_parameter_once_bottom_up(lite0):
    model, _ = lite0
    groups = backbone(model).layer_groups()
    assert backbone(model).num_blocks == 16  # Lite0's 1+2+2+3+3+4+1 blocks
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.visual.parameters()))
    names = {id(p): n for n, p in model.visual.named_parameters()}
    assert {names[id(p)] for p in groups[0]} == {"trunk.conv_stem.weight", "trunk.bn1.weight",
                                                 "trunk.bn1.bias"}
    assert all(names[id(p)].startswith("trunk.blocks.0.0.") for p in groups[1])
    assert all(names[id(p)].startswith("trunk.blocks.6.0.") for p in groups[16])
    assert {names[id(p)].split(".")[1] for p in groups[-1]} == {"conv_head", "bn2"}


def test_partial_unfreezing_by_block_on_the_trunk(lite0):
    model, _ = lite0
    from guie.losses import build_loss
    loss = build_loss(ExperimentConfig().loss, 64, 10)
    stage = replace(ExperimentConfig().stages[1], train=("head", "blocks:14-15"),
                    layer_decay=0.5, lr_backbone=1e-3)
    groups = param_groups(model, loss, stage)
    assert [g["name"] for g in groups] == ["head", "backbone.15", "backbone.16"]
    assert groups[1]["lr"] == pytest.approx(1e-3 * 0.5 ** 2)  # two groups below the top
    trained = {n for n, p in model.visual.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("trunk.blocks.5.3.", "trunk.blocks.6.0."))
                           for n in trained)
    with pytest.raises(ValueError, match=r"0 <= I <= J < 16"):
        param_groups(model, loss, replace(stage, train=("blocks:0-16",)))


def test_trunk_takes_any_size_but_refuses_a_patch_stride(lite0):
    model, preprocess = lite0
    set_resolution(model, preprocess, 96, 0)
    assert preprocess.image_size == 96
    with pytest.raises(ValueError, match="patch_stride_px=6: guie-lite0|patch_stride_px=6: "):
        set_resolution(model, preprocess, 96, 6)
    with pytest.raises(ValueError, match="at least 32 px"):
        set_resolution(model, preprocess, 16, 0)
    set_resolution(model, preprocess, 224, 0)


def test_preprocessing_comes_from_the_backbone_unless_the_config_sets_it(lite0):
    _, preprocess = lite0
    assert torch.allclose(preprocess.mean255.flatten(), torch.full((3,), 127.5))
    assert torch.allclose(preprocess.std255.flatten(), torch.full((3,), 127.5))
    own = PreprocessConfig(mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2), interpolation="bilinear")
    _, pre = build_model(ExperimentConfig(preprocess=own, model=ModelConfig(backbone=LITE0)))
    assert torch.allclose(pre.mean255.flatten(), torch.full((3,), 0.4 * 255))
    assert pre.mode == "bilinear"
    # A ViT has no statistics of its own: CLIP's stay.
    vit, vit_pre = build_model(ExperimentConfig(model=ModelConfig(backbone=TINY_BACKBONE)))
    assert isinstance(backbone(vit), VisionTransformerBackbone)
    assert torch.allclose(vit_pre.mean255.flatten(), torch.tensor(CLIP_MEAN) * 255)


def test_an_unsupported_tower_is_refused_by_name():
    with pytest.raises(ValueError, match="Conv2d tower is not supported"):
        backbone_of(nn.Conv2d(3, 8, 3))


def test_freeze_batchnorm_sets_only_frozen_norms_to_eval():
    net = nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm2d(4)).train()
    net[0].requires_grad_(False)
    assert freeze_batchnorm(net) == 1
    assert not net[0].training and net[1].training
