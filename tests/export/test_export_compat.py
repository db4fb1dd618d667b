"""The torch 1.11 export: matches the eager model here, and loads and matches in a real torch 1.11.

torch 1.11 is never imported in-process: tests/export/compat_runner.py runs under the 1.11 venv
(scripts/setup_torch111.sh) in a subprocess, on the contract's odd shapes and both input dtypes,
against eager outputs this test saves as .npy. Those tests skip when that venv is absent.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.model import _build_vision_tower
from torch import nn

from guie.config import ExperimentConfig, ModelConfig, PreprocessConfig
from guie.data.preprocess import Preprocess
from guie.export.compat import (TORCH111_MAX_FILE_FORMAT_VERSION, archive_format_version,
                                build_compat_export, check_torch111_archive,
                                export_compat_submission_zip, save_compat_export)
from guie.export.script import (CONTRACT_SHAPES, build_submission_model, check_contract,
                                script_and_save)
from guie.config import TINY_BACKBONE
from guie.model import EmbeddingModel, MultiDropoutHead, build_model

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("compat_runner.py")
TOLERANCE = 1e-5
TORCH111_PYTHON = Path(os.environ.get("GUIE_TORCH111_PYTHON",
                                      REPO / ".venv-torch111" / "bin" / "python"))
needs_torch111 = pytest.mark.skipif(
    not os.access(TORCH111_PYTHON, os.X_OK),
    reason=f"no torch 1.11 interpreter at {TORCH111_PYTHON}: run scripts/setup_torch111.sh "
           "or set GUIE_TORCH111_PYTHON")


@dataclass(frozen=True)
class Variant:
    use_projection: bool
    preprocess: PreprocessConfig
    fp16_weights: bool = False
    vision_overrides: tuple = ()  # extra open_clip vision_cfg keys (features ViT-H lacks)
    head: str = "multi_dropout"
    aspect_features: bool = False  # 5th place's head input


TINY = dict(image_size=64)
VARIANTS = {
    "proj-squash-bicubic": Variant(True, PreprocessConfig(**TINY)),
    "noproj-crop-bilinear": Variant(False, PreprocessConfig(
        **TINY, resize_mode="shorter_crop", interpolation="bilinear")),
    "fp16-noaa": Variant(True, PreprocessConfig(**TINY, antialias=False), fp16_weights=True),
    "layerscale-avgpool": Variant(True, PreprocessConfig(**TINY), vision_overrides=(
        ("ls_init_value", 0.5), ("pool_type", "avg"), ("final_ln_after_pool", True))),
    "aspect-bn-linear": Variant(True, PreprocessConfig(**TINY, resize_mode="shorter_crop"),
                                head="bn_linear", aspect_features=True),
}


def _build(variant: Variant) -> tuple[EmbeddingModel, Preprocess]:
    torch.manual_seed(0)
    cfg = ExperimentConfig(preprocess=variant.preprocess, model=ModelConfig(
        backbone=TINY_BACKBONE, use_projection=variant.use_projection, head=variant.head,
        num_branches=3, aspect_features=variant.aspect_features))
    model, preprocess = build_model(cfg)
    if variant.vision_overrides:
        model_cfg = open_clip.get_model_config(TINY_BACKBONE)
        vision_cfg = {**model_cfg["vision_cfg"], **dict(variant.vision_overrides)}
        model.visual = _build_vision_tower(model_cfg["embed_dim"], vision_cfg)
    # Random LayerNorm affine and layer-scale values, so every copied weight matters.
    with torch.no_grad():
        for name, p in model.visual.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model.eval(), preprocess


def _eager_oracle(model: EmbeddingModel, preprocess: Preprocess, fp16_weights: bool) -> nn.Module:
    """The eager export, computing in fp32. With fp16 weights: those half-rounded weights in
    fp32, which is what the compat model computes on CPU (1.11 has no half CPU kernels)."""
    oracle = build_submission_model(model, preprocess, fp16_weights)
    return oracle.float()


def _inputs(shapes=CONTRACT_SHAPES, seed: int = 0):
    """(name, images) pairs: each shape as uint8 pixels and as float32 in 0..255."""
    gen = torch.Generator().manual_seed(seed)
    for shape in shapes:
        name = "x".join(str(s) for s in shape)
        yield f"{name}-uint8", torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        yield f"{name}-float", torch.rand(shape, generator=gen) * 255.0


def _max_diff(a: nn.Module, b: nn.Module, inputs) -> float:
    worst = 0.0
    with torch.no_grad():
        for _, images in inputs:
            worst = max(worst, (a(images) - b(images)).abs().max().item())
    return worst


def _write_cases(model_path: Path, oracle: nn.Module, inputs, folder: Path) -> Path:
    """Inputs and the oracle's outputs as .npy plus a manifest for compat_runner.py."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    with torch.no_grad():
        for name, images in inputs:
            np.save(folder / f"{name}-in.npy", images.numpy())
            np.save(folder / f"{name}-out.npy", oracle(images).numpy())
            cases.append({"name": name, "input": f"{name}-in.npy", "expected": f"{name}-out.npy"})
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({"model": os.path.relpath(model_path, folder),
                                    "tolerance": TOLERANCE, "cases": cases}))
    return manifest


def _run_torch111(manifests: dict[str, Path], timeout_s: float,
                  threads: int = 1) -> dict[str, dict]:
    """One torch 1.11 subprocess over all manifests; its RESULT per manifest, by key.

    Exit status 1 (a mismatch) and 2 (a load failure) are reported per manifest and judged by
    the tests; anything else (an abort, a crash, a missing RESULT) fails here with the output.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run([str(TORCH111_PYTHON), str(RUNNER), *map(str, manifests.values())],
                          env=env, capture_output=True, text=True, timeout=timeout_s)
    output = proc.stdout + proc.stderr
    by_path = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            by_path[result["manifest"]] = result
    results = {key: by_path.get(str(path)) for key, path in manifests.items()}
    if proc.returncode not in (0, 1, 2) or None in results.values():
        pytest.fail(f"torch 1.11 runner exited {proc.returncode}:\n{output}")
    return results


def _assert_matched(result: dict, expected_cases: int) -> None:
    assert result["torch"].startswith("1.11."), result
    assert "error" not in result, result["error"]
    assert len(result["cases"]) == expected_cases
    failed = [case for case in result["cases"] if not case["ok"]]
    assert not failed, failed


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP's spinning
    threads made this module 4x slower. Restored when the module ends."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Per variant: the model, its eager oracle and the saved compat export (built once)."""
    built = {}

    def get(name: str):
        if name not in built:
            variant = VARIANTS[name]
            model, preprocess = _build(variant)
            folder = tmp_path_factory.mktemp(name)
            path = save_compat_export(build_compat_export(model, preprocess, variant.fp16_weights),
                                      folder / "saved_model.pt")
            built[name] = (model, preprocess, _eager_oracle(model, preprocess,
                                                            variant.fp16_weights), path)
        return built[name]

    return get


@pytest.mark.parametrize("name", VARIANTS)
def test_compat_export_matches_eager_and_contract(exports, name):
    model, preprocess, oracle, path = exports(name)
    assert archive_format_version(path) <= TORCH111_MAX_FILE_FORMAT_VERSION
    loaded = torch.jit.load(str(path))
    assert _max_diff(oracle, loaded, _inputs()) <= TOLERANCE
    check_contract(loaded, embed_dim=model.head.fold().out_features)


@pytest.mark.parametrize("name", ["proj-squash-bicubic", "noproj-crop-bilinear",
                                  "aspect-bn-linear"])
def test_compat_export_agrees_with_default_export(exports, name, tmp_path):
    """Both exports start from the same Preprocess / SubmissionModel: a change to either that
    the compat rebuild does not mirror shows up here."""
    model, preprocess, _, path = exports(name)
    default = torch.jit.load(str(script_and_save(build_submission_model(model, preprocess),
                                                 tmp_path / "default.pt")))
    assert _max_diff(default, torch.jit.load(str(path)), _inputs(seed=1)) <= TOLERANCE


@pytest.fixture(scope="module")
def torch111_results(exports, tmp_path_factory):
    """Every variant's compat export, plus the default export as a negative control, run
    through compat_runner.py in one torch 1.11 process (its start-up dominates)."""
    manifests = {}
    for name in VARIANTS:
        _, _, oracle, path = exports(name)
        manifests[name] = _write_cases(path, oracle, _inputs(), path.parent / "cases")
    model, preprocess, oracle, _ = exports("proj-squash-bicubic")
    folder = tmp_path_factory.mktemp("default-export")
    default = script_and_save(build_submission_model(model, preprocess), folder / "default.pt")
    manifests["default"] = _write_cases(default, oracle, _inputs(CONTRACT_SHAPES[:1]), folder)
    return _run_torch111(manifests, timeout_s=300)


@needs_torch111
@pytest.mark.parametrize("name", VARIANTS)
def test_compat_export_loads_and_matches_in_torch111(torch111_results, name):
    _assert_matched(torch111_results[name], expected_cases=2 * len(CONTRACT_SHAPES))


@needs_torch111
def test_default_export_does_not_load_in_torch111(torch111_results):
    """The negative control: torch 2.x's default export fails in 1.11 on its archive version,
    the runner sees it, and the static check predicts it."""
    result = torch111_results["default"]
    assert "version 10" in result.get("error", ""), result
    with pytest.raises(ValueError, match="archive format version 10"):
        check_torch111_archive(Path(result["manifest"]).parent / result["model"])


def test_export_compat_submission_zip(exports, tmp_path):
    model, preprocess, oracle, _ = exports("proj-squash-bicubic")
    zip_path = export_compat_submission_zip(model, preprocess, tmp_path)
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.namelist() == ["saved_model.pt"]
    loaded = torch.jit.load(str(tmp_path / "saved_model.pt"))
    assert _max_diff(oracle, loaded, _inputs(shapes=CONTRACT_SHAPES[:2])) <= TOLERANCE


@pytest.mark.parametrize("change, message", [
    (lambda v: setattr(v.transformer.resblocks[0].mlp, "gelu", nn.GELU(approximate="tanh")),
     "activation"),
    (lambda v: setattr(v, "pool_type", "none"), "pool_type"),
    (lambda v: setattr(v, "output_tokens", True), "output_tokens"),
    (lambda v: setattr(v.transformer.resblocks[1], "ls_2", nn.Dropout()), "layer scale"),
])
def test_unsupported_backbone_features_raise(exports, change, message):
    model, preprocess, _, _ = exports("proj-squash-bicubic")
    model = copy.deepcopy(model)
    change(model.visual)
    with pytest.raises(ValueError, match=message):
        build_compat_export(model, preprocess)


def test_multi_dropout_head_folds_into_compat_linear(exports):
    model, preprocess, _, _ = exports("proj-squash-bicubic")
    assert isinstance(model.head, MultiDropoutHead)
    compat = build_compat_export(model, preprocess)
    assert torch.equal(compat.linear_weight, model.head.fold().weight)


@pytest.mark.slow
@needs_torch111
def test_vit_h14_compat_export_in_torch111(tmp_path):
    """ViT-H-14 with random weights: ~2.4 GiB file, loads and matches in torch 1.11."""
    start = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)  # one_thread puts it back after the module
    torch.manual_seed(0)
    model, preprocess = build_model(ExperimentConfig(model=ModelConfig(backbone="ViT-H-14")))
    model.eval()
    export_compat_submission_zip(model, preprocess, tmp_path / "export")
    oracle = _eager_oracle(model, preprocess, fp16_weights=False)
    del model
    every = list(_inputs(shapes=((1, 3, 300, 1200), (1, 3, 512, 512), (1, 3, 97, 1))))
    inputs = [every[0], every[3], every[5]]  # 300x1200 uint8, 512x512 float, 97x1 float
    manifest = _write_cases(tmp_path / "export" / "saved_model.pt", oracle, inputs,
                            tmp_path / "cases")
    result = _run_torch111({"vit-h-14": manifest}, timeout_s=900,
                           threads=os.cpu_count() or 1)["vit-h-14"]
    print(f"ViT-H-14 compat in torch 1.11: max abs diffs "
          f"{[case.get('max_abs_diff') for case in result['cases']]}, "
          f"{time.perf_counter() - start:.0f} s in all", file=sys.stderr)
    _assert_matched(result, expected_cases=3)
