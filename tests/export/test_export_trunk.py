"""The export contract for a timm trunk (EfficientNet-Lite0 with its real weights), the input
moved to the model's device, and the torch 1.11 export's refusal of a trunk."""
import numpy as np
import pytest
import torch

from guie.config import ExperimentConfig, ModelConfig, PreprocessConfig
from guie.export.script import build_submission_model, export_submission_zip
from guie.model import build_model
from guie.weights import lite0_weights_path

from test_export import _inputs, _run_in_fresh_host  # tests/export is on sys.path (rootdir mode)


@pytest.fixture(scope="module")
def lite0():
    model, preprocess = build_model(ExperimentConfig(
        preprocess=PreprocessConfig(image_size=96),
        model=ModelConfig(backbone="guie-lite0", pretrained_path=lite0_weights_path())))
    return model.eval(), preprocess


@pytest.mark.parametrize("fp16_weights", [False, True])
def test_trunk_export_matches_eager_in_a_fresh_process(tmp_path, lite0, fp16_weights):
    model, preprocess = lite0
    export_submission_zip(model, preprocess, tmp_path, fp16_weights=fp16_weights)
    inputs = _inputs()  # the contract's odd shapes, uint8 and float
    out = _run_in_fresh_host(tmp_path, inputs)
    for name, pixels in inputs.items():
        with torch.no_grad():
            eager = model(preprocess(torch.from_numpy(pixels))).numpy()
        assert out[name].dtype == np.float32 and out[name].shape == (pixels.shape[0], 64)
        if fp16_weights:  # half weights through 16 blocks: close in direction, not to 1e-5
            cos = (out[name] * eager).sum(axis=1)
            assert cos.min() > 0.99, (name, cos)
        else:
            np.testing.assert_allclose(out[name], eager, atol=1e-5, err_msg=name)


def test_the_export_moves_its_input_to_the_models_device(lite0):
    model, preprocess = lite0
    scripted = torch.jit.script(build_submission_model(model, preprocess))
    # The host may hand a CUDA tensor to a model saved on the CPU: forward's first step moves
    # it to the weights' device (no GPU here: the graph is what can be checked).
    first = scripted.forward.code.split("\n")
    assert any("torch.to(images" in line and "linear.weight" in "".join(first)
               for line in first), scripted.forward.code
    pixels = torch.randint(0, 256, (1, 3, 70, 90), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(scripted(pixels), scripted(pixels.clone()))
        assert pixels.device.type == "cpu"
    if torch.cuda.is_available():  # on a GPU machine: a CUDA input into a CPU model
        with torch.no_grad():
            torch.testing.assert_close(scripted(pixels.cuda()), scripted(pixels))


def test_compat_export_refuses_a_trunk_by_name(tmp_path, lite0):
    from guie.export.compat import export_compat_submission_zip

    model, preprocess = lite0
    with pytest.raises(ValueError, match=r"--compat torch1.11: guie-lite0|--compat torch1.11: "
                                         r".*timm trunk.*aten::pad"):
        export_compat_submission_zip(model, preprocess, tmp_path)
