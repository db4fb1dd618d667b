"""The probe kernel's body: record the platform the kit otherwise assumes, as JSON.

`submit.py probe` pushes a notebook holding this module's text (it needs no attached dataset)
that writes `guie-platform.json` into its output: the mount layout it sees, Python and library
versions, the CUDA arch list, the GPU and its memory, free disk, and what is importable.
`status --wait` brings it back as `<workdir>/platform.json`, which `guie.kaggle.platform`
prefers over its constants. Standard library only, with every heavy import optional.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

PROBE_OUTPUT = "guie-platform.json"
# Distributions whose versions the kit depends on: open_clip's needs and the kernels' own.
PACKAGES = ("torch", "torchvision", "timm", "huggingface_hub", "safetensors", "regex", "ftfy",
            "wcwidth", "open_clip_torch", "papermill", "ipykernel", "nbformat", "pandas", "numpy",
            "pillow", "matplotlib", "tqdm", "scikit-image", "google-crc32c", "simplejpeg",
            "packaging")
MODULES = ("torch", "torchvision", "timm", "open_clip", "ftfy", "simplejpeg", "google_crc32c",
           "faiss", "skimage", "kaggle", "kagglehub")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:  # noqa: BLE001 - any failure at import means "not usable here"
        return False


def mount_layout(input_root: str) -> dict:
    """Which of Kaggle's layouts the input root shows, and its first two levels."""
    root = Path(input_root)
    top = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    current = [name for name in ("datasets", "competitions", "notebooks") if name in top]
    layout = "current" if current else ("legacy" if top else "unknown")
    listing = {name: sorted(p.name for p in (root / name).iterdir())
               for name in top if (root / name).is_dir()}
    return {"layout": layout, "top_level": top, "listing": listing}


def gpu_facts() -> dict:
    try:
        import torch
    except ImportError:
        return {"available": False, "error": "torch is not importable"}
    facts: dict = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                   "arch_list": torch.cuda.get_arch_list() if torch.cuda.is_available() else []}
    if torch.cuda.is_available():
        devices = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 2),
                            "capability": f"{p.major}.{p.minor}"})
        facts["devices"] = devices
        try:
            facts["op_ok"] = float((torch.ones(8, device="cuda") * 2).sum().item()) == 16.0
        except RuntimeError as e:
            facts["op_ok"], facts["op_error"] = False, str(e).splitlines()[0]
    return facts


def record_platform(out_dir: str, input_root: str = "/kaggle/input") -> dict:
    """Write out_dir/guie-platform.json and return what it holds."""
    disk = shutil.disk_usage(out_dir)
    record = {
        "probed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "executable": sys.executable,
        **mount_layout(input_root),
        "packages": {name: _version(name) for name in PACKAGES},
        "importable": {name: _importable(name) for name in MODULES},
        "gpu": gpu_facts(),
        "disk_free_gib": round(disk.free / 2**30, 1),
        "cpus": os.cpu_count(),
    }
    Path(out_dir, PROBE_OUTPUT).write_text(json.dumps(record, indent=2) + "\n")
    return record
