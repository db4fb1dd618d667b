"""The export contract: scripted model, reloaded in a fresh process that cannot import guie."""
import json
import subprocess
import sys
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import torch

from guie.config import ExperimentConfig, ModelConfig, PreprocessConfig
from guie.export import CONTRACT_SHAPES, check_contract, export_submission_zip
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


@pytest.mark.parametrize("resize_mode, fp16_weights", [("squash", False), ("shorter_crop", True)])
def test_export_matches_eager_in_a_fresh_process(tmp_path, resize_mode, fp16_weights):
    cfg = replace(TINY, preprocess=replace(TINY.preprocess, resize_mode=resize_mode))
    model, preprocess = build_model(cfg)
    model.eval()
    zip_path = export_submission_zip(model, preprocess, tmp_path, fp16_weights=fp16_weights)
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.namelist() == ["saved_model.pt"]
    inputs = _inputs()
    np.save(tmp_path / "inputs.npy", inputs, allow_pickle=True)
    script = tmp_path / "host.py"
    script.write_text(FRESH_PROCESS)
    subprocess.run([sys.executable, str(script), str(tmp_path / "saved_model.pt"),
                    str(tmp_path / "inputs.npy"), str(tmp_path / "out.npy")], check=True,
                   cwd=tmp_path)
    out = np.load(tmp_path / "out.npy", allow_pickle=True).item()
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
