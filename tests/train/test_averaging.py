import copy

import pytest
import torch

from guie.config import ExperimentConfig, ModelConfig, PreprocessConfig
from guie.model import build_model
from guie.train.averaging import EMA, average_into

TINY = ExperimentConfig(model=ModelConfig(backbone="guie-tiny-vit", head="bn_linear"),
                        preprocess=PreprocessConfig(image_size=64))


def test_soup_of_identical_checkpoints_equals_either():
    model, preprocess = build_model(TINY)
    twin = copy.deepcopy(model)
    souped = average_into(copy.deepcopy(model), [twin])
    images = preprocess(torch.randint(0, 256, (2, 3, 70, 50), dtype=torch.uint8))
    with torch.no_grad():
        assert torch.allclose(souped.eval()(images), model.eval()(images), atol=1e-6)


def test_soup_is_the_mean_and_checks_shapes():
    torch.manual_seed(0)
    a, _ = build_model(TINY)
    b, _ = build_model(TINY)
    want = (a.head.linear.weight + b.head.linear.weight) / 2
    average_into(a, [b])
    assert torch.allclose(a.head.linear.weight, want, atol=1e-6)
    other, _ = build_model(ExperimentConfig(model=ModelConfig(backbone="guie-tiny-vit",
                                                              embed_dim=32)))
    with pytest.raises(ValueError, match="ingredient 1"):
        average_into(a, [other])


def test_ema_tracks_and_swaps_in():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.5)
    with torch.no_grad():
        p.fill_(4.0)
    ema.update()  # 0.5 * 0 + 0.5 * 4
    with torch.no_grad():
        p.fill_(8.0)
    ema.update()  # 0.5 * 2 + 0.5 * 8
    ema.swap_in()
    assert torch.allclose(p, torch.full((3,), 5.0))
    with pytest.raises(ValueError, match="ema_decay"):
        EMA([p], decay=1.0)
