"""Load a TorchScript export in *this* interpreter's torch (1.11) and compare it with saved outputs.

Standalone on purpose: run by the torch 1.11 venv (scripts/setup_torch111.sh), which has neither
guie nor open_clip, from tests/export/test_export_compat.py in a subprocess, because a failed
load can abort the whole process.

    python compat_runner.py MANIFEST.json [MANIFEST.json ...]

Each manifest (paths relative to its folder):
    {"model": "saved_model.pt", "tolerance": 1e-5, "expect_torch": "1.11.",
     "cases": [{"name": "...", "input": "x.npy", "expected": "y.npy"}, ...]}
Inputs are .npy (uint8 or float32, [B, 3, H, W]); expected outputs float32 [B, D].

Prints one line per case and a `RESULT {json}` line per manifest (its "manifest" key names it).
Exit status, the worst over the manifests: 0 all cases match, 1 some case mismatched or broke
the contract, 2 a model did not load, 3 the wrong torch.
"""
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch


def run_case(model, folder: Path, case: dict, tolerance: float) -> dict:
    images = torch.from_numpy(np.load(folder / case["input"]))
    expected = np.load(folder / case["expected"])
    result = {"name": case["name"], "shape": list(images.shape), "dtype": str(images.dtype)}
    start = time.perf_counter()
    try:
        with torch.no_grad():
            out = model(images)
    except Exception:  # noqa: BLE001 - the host would see a failed submission: report, go on
        result.update(ok=False, error=traceback.format_exc(limit=3))
        return result
    result["seconds"] = round(time.perf_counter() - start, 3)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32:
        result.update(ok=False, error=f"output is {type(out).__name__} "
                                      f"{getattr(out, 'dtype', '')}, expected a float32 tensor")
        return result
    if tuple(out.shape) != expected.shape:
        result.update(ok=False, error=f"output shape {tuple(out.shape)}, expected {expected.shape}")
        return result
    diff = float(np.abs(out.numpy().astype(np.float64) - expected.astype(np.float64)).max())
    finite = bool(torch.isfinite(out).all())
    result.update(max_abs_diff=diff, ok=finite and diff <= tolerance)
    if not finite:
        result["error"] = "output has NaN or Inf"
    elif diff > tolerance:
        result["error"] = f"max abs diff {diff:.3g} > tolerance {tolerance:g}"
    return result


def run_manifest(manifest_path: Path) -> int:
    manifest = json.loads(manifest_path.read_text())
    folder = manifest_path.parent
    summary = {"manifest": str(manifest_path), "torch": torch.__version__,
               "model": manifest["model"], "cases": []}
    expect = manifest.get("expect_torch", "1.11.")
    status = 0
    if not torch.__version__.startswith(expect):
        summary["error"] = f"this interpreter has torch {torch.__version__}, expected {expect}*"
        status = 3
    else:
        start = time.perf_counter()
        try:
            model = torch.jit.load(str(folder / manifest["model"]), map_location="cpu").eval()
        except Exception:  # noqa: BLE001 - any load failure is the finding: record it
            summary["error"] = "load failed:\n" + traceback.format_exc(limit=3)
            status = 2
        else:
            summary["load_seconds"] = round(time.perf_counter() - start, 3)
            for case in manifest["cases"]:
                result = run_case(model, folder, case, float(manifest["tolerance"]))
                print(f"{'ok  ' if result['ok'] else 'FAIL'} {manifest_path.parent.name}/"
                      f"{result['name']} {result.get('max_abs_diff', '')} "
                      f"{result.get('error', '')}", flush=True)
                summary["cases"].append(result)
            status = 0 if all(c["ok"] for c in summary["cases"]) else 1
    print("RESULT " + json.dumps(summary), flush=True)
    return status


def main(argv) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 3
    return max(run_manifest(Path(arg)) for arg in argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
