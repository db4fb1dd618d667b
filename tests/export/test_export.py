"""The export contract: scripted model, reloaded in a fresh process that cannot import guie."""
import subprocess
import sys
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import torch

from guie.config import ExperimentConfig, ModelConfig, PreprocessConfig
from guie.export.script import CONTRACT_SHAPES, check_contract, export_submission_zip
from guie.model import build_model

TINY = ExperimentConfig(model=ModelConfig(backbone="guie-tiny-vit", head="multi_dropout",
                                          num_branches=4),
                        preprocess=PreprocessConfig(image_size=64))

FRESH_PROCESS = r"""
import json, sys
import numpy as np
sys.modules["guie"] = None  # the host has no guie: importing it must fail
try:
    import guie  # noqa
    raise SystemExit("guie was importable")
except ImportError:
    pass
import torch
model = torch.jit.load(sys.argv[1])
inputs = np.load(sys.argv[2], allow_pickle=True).item()
out = {}
for name, pixels in inputs.items():
    x = torch.from_numpy(pixels)
    out[name] = model(x).numpy()
np.save(sys.argv[3], out, allow_pickle=True)
"""


def _inputs():
    gen = np.random.default_rng(0)
    inputs = {}
    for shape in CONTRACT_SHAPES:
        pixels = gen.integers(0, 256, shape, dtype=np.uint8)
        inputs[f"{shape}-uint8"] = pixels
        inputs[f"{shape}-float"] = pixels.astype(np.float32)
    return inputs


def _run_in_fresh_host(tmp_path, inputs: dict) -> dict:
    """`tmp_path/saved_model.pt` run on `inputs` by a process that cannot import guie."""
    np.save(tmp_path / "inputs.npy", inputs, allow_pickle=True)
    script = tmp_path / "host.py"
    script.write_text(FRESH_PROCESS)
    subprocess.run([sys.executable, str(script), str(tmp_path / "saved_model.pt"),
                    str(tmp_path / "inputs.npy"), str(tmp_path / "out.npy")], check=True,
                   cwd=tmp_path)
    return np.load(tmp_path / "out.npy", allow_pickle=True).item()


@pytest.mark.parametrize("resize_mode, fp16_weights", [("squash", False), ("shorter_crop", True)])
def test_export_matches_eager_in_a_fresh_process(tmp_path, resize_mode, fp16_weights):
    cfg = replace(TINY, preprocess=replace(TINY.preprocess, resize_mode=resize_mode))
    model, preprocess = build_model(cfg)
    model.eval()
    zip_path = export_submission_zip(model, preprocess, tmp_path, fp16_weights=fp16_weights)
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.namelist() == ["saved_model.pt"]
    inputs = _inputs()
    out = _run_in_fresh_host(tmp_path, inputs)
    tolerance = 2e-3 if fp16_weights else 1e-5
    for name, pixels in inputs.items():
        with torch.no_grad():
            eager = model(preprocess(torch.from_numpy(pixels))).numpy()
        assert out[name].dtype == np.float32 and out[name].shape == (pixels.shape[0], 64)
        np.testing.assert_allclose(out[name], eager, atol=tolerance, err_msg=name)


def test_contract_check_catches_a_broken_model():
    class NotNormalised(torch.nn.Module):
        def forward(self, x):
            return torch.ones(x.shape[0], 64)

    with pytest.raises(AssertionError, match="not L2-normalised"):
        check_contract(torch.jit.script(NotNormalised()))

    class WrongDim(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.normalize(torch.ones(x.shape[0], 32), dim=1)

    with pytest.raises(AssertionError, match="output shape"):
        check_contract(torch.jit.script(WrongDim()))


def _eager_views(model, preprocess, pixels, tta):
    """The eager reference for test-time views: mean of the head outputs, then the L2 norm."""
    views = [pixels]
    if "flip" in tta:
        views.append(pixels.flip(-1))
    h, w = pixels.shape[-2:]
    if "aspect_crops" in tta and max(h, w) >= 1.5 * min(h, w):
        s = min(h, w)
        views += [pixels[..., :s], pixels[..., w - s:]] if w > h else \
            [pixels[..., :s, :], pixels[..., h - s:, :]]
    with torch.no_grad():
        outs = [model.head.fold()(model.features(preprocess(v), _sizes(v))) for v in views]
    return torch.nn.functional.normalize(torch.stack(outs).mean(0), dim=-1)


def _sizes(pixels):
    """[B, 2] (H, W) of a batch of unresized images, as the data loader reports them."""
    return torch.tensor([list(pixels.shape[-2:])] * pixels.shape[0])


@pytest.mark.parametrize("tta", [("flip",), ("flip", "aspect_crops")])
def test_scripted_tta_equals_eager_tta(tmp_path, tta):
    from guie.export.script import build_submission_model, script_and_save

    model, preprocess = build_model(TINY)
    model.eval()
    saved = script_and_save(build_submission_model(model, preprocess, tta=tta),
                            tmp_path / "saved_model.pt")
    scripted = torch.jit.load(str(saved))
    check_contract(scripted)
    for shape in ((1, 3, 60, 150), (1, 3, 150, 60), (2, 3, 64, 70)):
        pixels = torch.randint(0, 256, shape, dtype=torch.uint8)
        with torch.no_grad():
            got = scripted(pixels)
            if tta == ("flip",):  # the flip view alone makes the embedding mirror-invariant
                assert torch.allclose(got, scripted(pixels.flip(-1)), atol=1e-5)
        assert torch.allclose(got, _eager_views(model, preprocess, pixels, tta), atol=1e-5)


ASPECT = replace(TINY, model=replace(TINY.model, head="bn_linear", aspect_features=True))


def _with_random_norm_stats(model):
    """BatchNorm statistics and a head weight on the aspect columns that are not identities,
    so the fold and the three features both matter."""
    with torch.no_grad():
        norm = model.head.norm
        norm.running_mean.copy_(torch.randn_like(norm.running_mean))
        norm.running_var.copy_(torch.rand_like(norm.running_var) + 0.5)
        model.head.linear.weight[:, -3:] = torch.randn(64, 3)
    return model.eval()


@pytest.mark.parametrize("tta", [(), ("flip", "aspect_crops")])
def test_aspect_features_come_from_the_inputs_size(tmp_path, tta):
    """5th place's head: the export computes the three features from the input's H and W
    before resizing, as the eager model gets them from the data loader; views use their own."""
    torch.manual_seed(0)
    model, preprocess = build_model(ASPECT)
    assert model.head.norm.num_features == model.feature_dim + 3
    _with_random_norm_stats(model)
    export_submission_zip(model, preprocess, tmp_path, tta=tta)  # checks the contract
    scripted = torch.jit.load(str(tmp_path / "saved_model.pt"))
    for shape in ((1, 3, 60, 150), (1, 3, 150, 60), (2, 3, 64, 70), (1, 3, 97, 1)):
        pixels = torch.randint(0, 256, shape, dtype=torch.uint8)
        with torch.no_grad():
            got = scripted(pixels)
            eager = _eager_views(model, preprocess, pixels, tta)
            square = model(preprocess(pixels), torch.full((shape[0], 2), 64))
        assert torch.allclose(got, eager, atol=1e-5), shape
        if not tta and shape[-1] != shape[-2]:  # the size is what changed: it is used
            assert (got - square).abs().max() > 1e-3, shape
    with pytest.raises(ValueError, match="size before resizing"):
        model(preprocess(pixels))


def test_aspect_features_are_scale_free():
    from guie.model import aspect_features

    feats = aspect_features(torch.tensor([30, 300, 40]), torch.tensor([40, 400, 30]))
    assert torch.allclose(feats[0], feats[1])
    assert torch.allclose(feats[0], torch.tensor([float(np.log(4 / 3)), 1.0, 0.75]), atol=1e-6)
    assert torch.allclose(feats[2], torch.tensor([-float(np.log(4 / 3)), 0.75, 1.0]), atol=1e-6)


def test_pca_reduced_export_equals_eager_reduction(tmp_path):
    from guie.reduction import fit_reduction

    wide = replace(TINY, model=replace(TINY.model, embed_dim=96))
    model, preprocess = build_model(wide)
    model.eval()
    images = torch.randint(0, 256, (80, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        head_out = model.head(model.features(preprocess(images)))
    w, b = fit_reduction("pca", 64, head_out)
    export_submission_zip(model, preprocess, tmp_path, reduction=(w, b))  # checks the contract
    scripted = torch.jit.load(str(tmp_path / "saved_model.pt"))
    with torch.no_grad():
        eager = torch.nn.functional.normalize(head_out[:4] @ w.T + b, dim=-1)
        assert torch.allclose(scripted(images[:4]), eager, atol=1e-5)


def test_every_export_option_passes_the_contract_in_a_fresh_process(tmp_path):
    """TTA, a folded reduction, a bn_linear head with aspect features and overlapping patches
    at a higher resolution, reloaded by a process that cannot import guie."""
    from guie.model import set_resolution
    from guie.reduction import fit_reduction

    cfg = replace(TINY, model=replace(TINY.model, head="bn_linear", embed_dim=128,
                                      aspect_features=True))
    model, preprocess = build_model(cfg)
    set_resolution(model, preprocess, 80, 6)
    model.eval()
    reduction = fit_reduction("avg_pool", 64, input_dim=128)
    export_submission_zip(model, preprocess, tmp_path, reduction=reduction,
                          tta=("flip", "aspect_crops"))
    for name, v in _run_in_fresh_host(tmp_path, _inputs()).items():
        assert v.shape[1] == 64 and v.dtype == np.float32, name
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-3, err_msg=name)


def test_concat_export_equals_eager_concatenation(tmp_path):
    """4th place's two towers: each with its own input size, head and width; their unit
    embeddings concatenated, PCA fitted on the concatenation, the result L2-normalised."""
    from guie.export.script import export_concat_submission_zip
    from guie.reduction import fit_reduction

    first, first_pre = build_model(ASPECT)
    from guie.model import set_resolution

    second, second_pre = build_model(replace(TINY, seed=1, model=replace(
        TINY.model, head="linear", embed_dim=96)))
    set_resolution(second, second_pre, 48, 0)
    towers = [(_with_random_norm_stats(first), first_pre), (second.eval(), second_pre)]
    images = torch.randint(0, 256, (180, 3, 64, 80), dtype=torch.uint8)

    def unit_embeddings(pixels):
        with torch.no_grad():
            return torch.cat([m(p(pixels), _sizes(pixels)) for m, p in towers], dim=1)

    w, b = fit_reduction("pca", 64, unit_embeddings(images))
    assert w.shape == (64, 64 + 96)
    export_concat_submission_zip(towers, tmp_path, (w, b))  # checks the contract
    scripted = torch.jit.load(str(tmp_path / "saved_model.pt"))
    for pixels in (images[:2], torch.randint(0, 256, (1, 3, 150, 60), dtype=torch.uint8)):
        eager = torch.nn.functional.normalize(unit_embeddings(pixels) @ w.T + b, dim=-1)
        with torch.no_grad():
            assert torch.allclose(scripted(pixels), eager, atol=1e-5)
    for name, v in _run_in_fresh_host(tmp_path, _inputs()).items():
        assert v.shape[1] == 64 and v.dtype == np.float32, name
