"""The probe kernel's body: record the platform the kit otherwise assumes, as JSON.

`submit.py probe` pushes a notebook holding this module's text (it needs no attached dataset)
that writes `guie-platform.json` into its output: the mount layout it sees, Python and library
versions, the CUDA arch list, the GPU and its memory, free disk, and what is importable.
`status --wait` brings it back as `<workdir>/platform.json`, which `guie.kaggle.platform`
prefers over its constants. Standard library only, with every heavy import optional.

What a machine shape really gives is recorded per device: its name, compute capability and
`total_memory` (what PyTorch reports as the card's total capacity, and what it can allocate at
most; the planner's limit), with the GPU count and the torch build. Where two GPUs exist, a
two-process NCCL all-reduce and one FSDP step of a tiny model run in a subprocess under torchrun
(`two_gpu_smoke`): the kit's 2xT4 path depends on both (field guide 5a: NCCL peer-to-peer hangs
in notebooks, where `NCCL_P2P_DISABLE=1` is the usual remedy, so a hang is retried with it). It is
guarded: a failure or a hang is recorded, never raised, and the probe's record is written anyway.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
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


MARKERS = ("guie-source.json", "guie-wheels.json")  # what the kit writes into its datasets


def input_markers(input_root: str, depth: int = 4) -> list[dict]:
    """The kit's marker files under the input root (where each attached dataset of the kit is
    mounted, and which version: the source marker holds its content hash)."""
    root, found, level = Path(input_root), [], [Path(input_root)]
    for _ in range(depth):
        following = []
        for folder in level:
            try:
                entries = sorted(folder.iterdir())
            except OSError:
                continue
            for entry in entries:
                if entry.is_dir():
                    following.append(entry)
                elif entry.name in MARKERS:
                    try:
                        content = json.loads(entry.read_text())
                    except (OSError, ValueError):
                        content = None
                    found.append({"path": entry.relative_to(root).as_posix(), "content": content})
        level = following
    return found


def gpu_facts() -> dict:
    try:
        import torch
    except ImportError:
        return {"available": False, "error": "torch is not importable"}
    facts: dict = {"available": torch.cuda.is_available(), "torch": torch.__version__,
                   "torch_cuda": torch.version.cuda, "count": 0,
                   "arch_list": torch.cuda.get_arch_list() if torch.cuda.is_available() else []}
    if torch.cuda.is_available():
        devices = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            # total_memory is what an out-of-memory message calls the card's "total capacity":
            # the most PyTorch can allocate there (below the datasheet figure).
            devices.append({"name": p.name, "total_memory": p.total_memory,
                            "memory_gib": round(p.total_memory / 2**30, 2),
                            "allocatable_gib": round(p.total_memory / 2**30, 2),
                            "capability": f"{p.major}.{p.minor}"})
        facts["devices"], facts["count"] = devices, len(devices)
        try:
            facts["op_ok"] = float((torch.ones(8, device="cuda") * 2).sum().item()) == 16.0
        except RuntimeError as e:
            facts["op_ok"], facts["op_error"] = False, str(e).splitlines()[0]
    return facts


# Run under torchrun, one process per GPU: an all-reduce, then one optimizer step of a tiny model
# sharded with FSDP (fully_shard where this torch has it, else FullyShardedDataParallel).
SMOKE_SCRIPT = """
import json, os
import torch
import torch.distributed as dist

backend = os.environ.get("GUIE_SMOKE_BACKEND", "nccl")
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
cuda = backend == "nccl"
if cuda:
    torch.cuda.set_device(rank)
dist.init_process_group(backend)
device = torch.device("cuda", rank) if cuda else torch.device("cpu")
t = torch.full((4,), float(rank + 1), device=device)
dist.all_reduce(t)
result = {"world_size": world, "all_reduce_ok": float(t[0]) == world * (world + 1) / 2}
try:
    from torch.distributed.fsdp import fully_shard
    api = "fully_shard"
except ImportError:
    fully_shard, api = None, "FullyShardedDataParallel"
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
model = model.to(device)
if fully_shard is not None:
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
else:
    from torch.distributed.fsdp import FullyShardedDataParallel
    model = FullyShardedDataParallel(model, device_id=rank if cuda else None)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
loss = model(torch.randn(16, 64, device=device)).float().pow(2).mean()
loss.backward()
optimizer.step()
result.update(fsdp_api=api, fsdp_step_ok=bool(torch.isfinite(loss.detach()).item()))
dist.barrier()
if rank == 0:
    print("GUIE-SMOKE " + json.dumps(result), flush=True)
dist.destroy_process_group()
"""


def two_gpu_smoke(gpus: int, timeout_s: float = 240, backend: str = "nccl") -> dict:
    """The NCCL + FSDP smoke step on `gpus` >= 2 processes; what happened, never an exception."""
    if gpus < 2:
        return {"ran": False, "why": f"{gpus} GPU(s): needs two"}
    attempts = []
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder, "guie_smoke.py")
        script.write_text(SMOKE_SCRIPT)
        for extra in ({}, {"NCCL_P2P_DISABLE": "1"}):
            env = {**os.environ, "GUIE_SMOKE_BACKEND": backend, **extra}
            argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={gpus}", str(script)]
            try:
                done = subprocess.run(argv, capture_output=True, text=True, env=env,
                                      timeout=timeout_s)
            except (OSError, subprocess.SubprocessError) as e:  # a hang ends as TimeoutExpired
                attempts.append({"env": extra, "ok": False, "error": f"{type(e).__name__}: {e}"})
                continue
            lines = [line for line in done.stdout.splitlines() if line.startswith("GUIE-SMOKE ")]
            result = json.loads(lines[-1][len("GUIE-SMOKE "):]) if lines else {}
            ok = done.returncode == 0 and result.get("all_reduce_ok") and result.get("fsdp_step_ok")
            attempts.append({"env": extra, "ok": bool(ok), **result,
                             **({} if ok else {"error": done.stderr[-2000:]})})
            if ok:
                break
    return {"ran": True, "ok": any(a["ok"] for a in attempts), "attempts": attempts}


def record_platform(out_dir: str, input_root: str = "/kaggle/input", push_nonce: str = "",
                    smoke: bool = True) -> dict:
    """Write out_dir/guie-platform.json and return what it holds (push_nonce: the push this
    session ran, echoed so that a stale read of the previous probe is told apart)."""
    disk = shutil.disk_usage(out_dir)
    gpu = gpu_facts()
    try:
        smoke_result = two_gpu_smoke(gpu.get("count", 0)) if smoke else {"ran": False}
    except Exception as e:  # noqa: BLE001 - the smoke step must never fail the probe
        smoke_result = {"ran": False, "error": f"{type(e).__name__}: {e}"}
    record = {
        "probed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "push_nonce": push_nonce,
        "python": platform.python_version(),
        "executable": sys.executable,
        **mount_layout(input_root),
        "input_markers": input_markers(input_root),
        "packages": {name: _version(name) for name in PACKAGES},
        "importable": {name: _importable(name) for name in MODULES},
        "gpu": gpu,
        "two_gpu_smoke": smoke_result,
        "disk_free_gib": round(disk.free / 2**30, 1),
        "cpus": os.cpu_count(),
    }
    Path(out_dir, PROBE_OUTPUT).write_text(json.dumps(record, indent=2) + "\n")
    # The push marker every kit kernel writes (guie.kaggle.inputs.record_push; not importable
    # here: this module runs inlined, alone).
    Path(out_dir, "guie-push.json").write_text(json.dumps({"push_nonce": push_nonce}) + "\n")
    return record
