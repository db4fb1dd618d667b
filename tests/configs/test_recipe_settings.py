"""What the ViT-H recipes state beyond the write-ups: the gradient clip of the stages that train
the backbone in fp16 on a T4, and the 3rd place's length under both readings of its epochs."""
from __future__ import annotations

import pytest

from guie.configs import epoch_readings, get_config, list_configs
from guie.configs.third_place import GRAD_CLIP_NORM
from guie.plan.core import resolve_amp
from guie.train.optim import trainable

VIT_H_BLOCKS = 32


def vit_recipes():
    return [n for n in list_configs() if get_config(n).model.backbone.startswith("ViT-")
            and get_config(n).stages]


@pytest.mark.parametrize("name", vit_recipes())
def test_backbone_stages_clip_their_gradients_on_fp16(name):
    for stage in get_config(name).stages:
        backbone = trainable(stage, VIT_H_BLOCKS).backbone
        if backbone:
            # the T4 has no bf16: these stages run fp16 with a grad scaler there
            assert resolve_amp(stage, bf16=False) == "fp16"
            assert stage.grad_clip_norm == GRAD_CLIP_NORM == 1.0, (name, stage.name)
        else:
            assert stage.grad_clip_norm == 0.0, (name, stage.name)


def test_third_place_states_both_readings_of_its_epochs_and_ships_the_tenths():
    cfg = get_config("third_place")
    (shipped_label, shipped), (_, full) = epoch_readings(cfg)
    assert "shipped" in shipped_label
    assert shipped == {s.name: s.epochs for s in cfg.stages}
    # motono0223's epoch is a tenth of the data: "200 epochs of 1/10 data" = 20 passes
    assert full == {name: 10 * epochs for name, epochs in shipped.items()}
    assert epoch_readings(get_config("tiny")) == ()
