from dataclasses import replace

import pytest
import torch

from guie.config import ExperimentConfig, ModelConfig, PreprocessConfig
from guie.model import build_model, load_visual_weights, set_resolution

TINY = ExperimentConfig(model=ModelConfig(backbone="guie-tiny-vit"),
                        preprocess=PreprocessConfig(image_size=64))


def test_multi_dropout_head_folds_to_one_linear():
    cfg = replace(TINY, model=replace(TINY.model, head="multi_dropout", num_branches=5))
    model, _ = build_model(cfg)
    model.eval()
    feats = torch.randn(4, model.feature_dim)
    assert torch.allclose(model.head(feats), model.head.fold()(feats), atol=1e-6)


def test_pre_projection_features_are_backbone_width():
    model, preprocess = build_model(replace(TINY, model=replace(TINY.model, use_projection=False)))
    out = model.features(preprocess(torch.zeros(2, 3, 50, 70, dtype=torch.uint8)))
    assert out.shape == (2, 128) and model.feature_dim == 128


def test_output_is_unit_norm_64d():
    model, preprocess = build_model(TINY)
    emb = model.eval()(preprocess(torch.randint(0, 256, (3, 3, 80, 40), dtype=torch.uint8)))
    assert emb.shape == (3, 64)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Q-99'"):
        build_model(replace(TINY, model=replace(TINY.model, backbone="ViT-Q-99")))


def test_local_weights_load_and_mismatch_names_the_file(tmp_path):
    model, _ = build_model(TINY)
    good = tmp_path / "open_clip_model.pt"
    torch.save({"state_dict": {f"module.visual.{k}": v for k, v in
                               model.visual.state_dict().items()}}, good)
    cfg = replace(TINY, model=replace(TINY.model, pretrained_path=str(good)))
    loaded, _ = build_model(cfg)
    assert all(torch.equal(a, b) for a, b in zip(loaded.visual.state_dict().values(),
                                                 model.visual.state_dict().values(), strict=True))
    bad = tmp_path / "other.pt"
    state = model.visual.state_dict()
    state["proj"] = torch.zeros(3, 3)
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"other\.pt: weights do not match.*proj"):
        load_visual_weights(build_model(TINY)[0].visual, str(bad))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_visual_weights(model.visual, str(tmp_path / "missing.pt"))


def test_higher_resolution_with_overlapping_patches():
    model, preprocess = build_model(TINY)
    model.eval()
    set_resolution(model, preprocess, 80, 6)  # (80 - 8) // 6 + 1 = 13 patches a side
    assert model.visual.positional_embedding.shape[0] == 13 * 13 + 1
    x = preprocess(torch.randint(0, 256, (2, 3, 50, 90), dtype=torch.uint8))
    assert x.shape[-1] == 80 and model(x).shape == (2, 64)
    before = model.visual.positional_embedding.clone()
    set_resolution(model, preprocess, 80, 6)  # idempotent
    assert torch.equal(before, model.visual.positional_embedding)


@pytest.mark.parametrize("head", ["bn_linear", "multisample_dropout", "identity"])
def test_heads_fold_to_one_linear_in_eval(head):
    model, _ = build_model(replace(TINY, model=replace(TINY.model, head=head, num_branches=3)))
    feats = torch.randn(5, model.feature_dim)
    model.train()
    if head == "bn_linear":
        model.head(feats * 3 + 1)  # move the running statistics off their defaults
    if head == "multisample_dropout":  # K masks stacked for the loss
        assert model.head(feats).shape == (3 * 5, 64)
    model.eval()
    assert torch.allclose(model.head(feats), model.head.fold()(feats), atol=1e-5)
