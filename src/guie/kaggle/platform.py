"""What the kit knows about Kaggle's machines, and what it learnt from a probe kernel.

The constants here are the fallback: `submit.py probe` runs a tiny kernel that records the
platform as it is (mount layout, Python and library versions, CUDA archs, GPU, disk) into
`<workdir>/platform.json`, and `platform_facts` prefers that record wherever it has an answer.

`check_gpu_runs` runs inside the training kernel, before anything else touches the GPU.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Kaggle's notebook image; 3.11 since its 2025 images (unconfirmed: `submit.py probe` records it).
KAGGLE_PYTHON_FALLBACK = "3.11"
OUTPUT_CAP_BYTES = 20 * 10**9  # /kaggle/working kept after a session (field guide 5a)
PLATFORM_RECORD = "platform.json"


@dataclass(frozen=True)
class MachineShape:
    name: str  # the value of kernel-metadata.json's machine_shape
    accelerator: str  # what a session gets
    gpus: int
    gpu_memory_gib: float  # per device
    compute_capability: tuple[int, int] | None  # None: a TPU
    bf16: bool  # native bf16 matmuls (sm80+)
    # What PyTorch can allocate per device (torch.cuda.get_device_properties().total_memory),
    # below the datasheet figure; None: unknown, the datasheet figure stands in. A probe record's
    # figure, where there is one, wins over this.
    allocatable_gib: float | None = None


# Known names (field guide 5a, checked 2026-12); the client sends machine_shape unvalidated and
# Kaggle reportedly hands out a P100 for a name it does not know.
MACHINE_SHAPES = {m.name: m for m in (
    MachineShape("NvidiaTeslaT4", "2x NVIDIA T4", 2, 15.0, (7, 5), False),
    MachineShape("NvidiaTeslaP100", "1x NVIDIA P100", 1, 16.0, (6, 0), False),
    MachineShape("NvidiaL4", "1x NVIDIA L4", 1, 22.5, (8, 9), True),
    MachineShape("NvidiaH100", "1x NVIDIA H100", 1, 80.0, (9, 0), True),
    MachineShape("Tpu1VmV38", "TPU v3-8", 0, 0.0, None, True),
    MachineShape("TpuV5E8", "TPU v5e-8", 0, 0.0, None, True),
    MachineShape("TpuV6E8", "TPU v6e-8", 0, 0.0, None, True),
)}
DEFAULT_MACHINE_SHAPE = "NvidiaTeslaT4"


class PlatformError(ValueError):
    pass


def check_machine_shape(name: str, allow_unknown: bool = False) -> list[str]:
    """Warnings for a machine shape; PlatformError for an unknown one unless allowed."""
    shape = MACHINE_SHAPES.get(name)
    if shape is None:
        if not allow_unknown:
            raise PlatformError(
                f"--machine-shape {name!r} is not a shape the kit knows "
                f"({', '.join(MACHINE_SHAPES)}); Kaggle reportedly gives a P100 for a name it "
                "does not know. If Kaggle has added it, pass --allow-unknown-machine-shape.")
        return [f"machine shape {name!r} is unknown to the kit; sent as given"]
    warnings = []
    if shape.compute_capability == (6, 0):
        warnings.append(
            f"{name}: Kaggle's current image ships a PyTorch built without sm_60 kernels, so every "
            "CUDA op fails on a P100 (kaggle-cli issue #1151); the training kernel checks this in "
            "its first seconds. Prefer NvidiaTeslaT4 or NvidiaL4.")
    if shape.compute_capability is None:
        warnings.append(f"{name}: a TPU; the kit trains with PyTorch on CUDA or the CPU only")
    return warnings


# ----------------------------------------------------------------------------- probe record


def load_platform_record(workdir: str | Path) -> dict | None:
    path = Path(workdir) / PLATFORM_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass(frozen=True)
class PlatformFacts:
    python_version: str  # X.Y, for the wheels' tags
    layout: str  # "current", "legacy" or "unknown"
    packages: dict  # name -> version seen on Kaggle ({} without a probe)
    source: str  # where these came from


def platform_facts(workdir: str | Path) -> PlatformFacts:
    """The probe's record where there is one, else the kit's constants."""
    record = load_platform_record(workdir)
    if record is None:
        return PlatformFacts(KAGGLE_PYTHON_FALLBACK, "unknown", {},
                             "the kit's defaults (run `submit.py probe` to record Kaggle's)")
    python = ".".join(str(record.get("python", KAGGLE_PYTHON_FALLBACK)).split(".")[:2])
    return PlatformFacts(python, record.get("layout", "unknown"), dict(record.get("packages", {})),
                         f"{Path(workdir) / PLATFORM_RECORD} "
                         f"(probe of {record.get('probed_at', '?')})")


# ----------------------------------------------------------------------------- inside kernels


def check_gpu_runs() -> str:
    """Run one tiny CUDA op; a clear error when this GPU cannot run this PyTorch build.

    Kaggle's current PyTorch has no sm_60 kernels: on a P100 the first real op fails deep in
    training otherwise, hours of queue later. Returns a one-line description of the device.
    """
    import torch

    if not torch.cuda.is_available():
        return "no GPU: training on the CPU"
    name = torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    archs = torch.cuda.get_arch_list()
    try:
        value = (torch.ones(8, device="cuda") * 2).sum().item()
    except RuntimeError as e:
        raise PlatformError(
            f"{name} (sm_{major}{minor}) cannot run this PyTorch {torch.__version__} build, "
            f"compiled for {', '.join(archs) or 'no CUDA arch'}: {str(e).splitlines()[0]}. "
            "Push again with --machine-shape NvidiaTeslaT4 (2xT4) or NvidiaL4.") from None
    if value != 16.0:
        raise PlatformError(f"{name}: a CUDA sum gave {value}, not 16: this GPU is not usable")
    return (f"{torch.cuda.device_count()}x {name} "
            f"(sm_{major}{minor}; build archs {', '.join(archs)})")
