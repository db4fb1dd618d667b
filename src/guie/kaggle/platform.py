"""What the kit knows about Kaggle's machines, and what it learnt from a probe kernel.

The constants here are the fallback: `submit.py probe` runs a tiny kernel that records the
platform as it is (mount layout, Python and library versions, CUDA archs, GPU, disk) into
`<workdir>/platform.json`, and `platform_facts` prefers that record wherever it has an answer.

`check_gpu_runs` runs inside the training kernel, before anything else touches the GPU.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from guie.errors import UserValueError

# Kaggle's notebook image: Python 3.12 since Kaggle/docker-python's "Upgrade to Python 3.12"
# (December 2025; the TPU image too). A probe record's version wins over this.
KAGGLE_PYTHON_FALLBACK = "3.12"
OUTPUT_CAP_BYTES = 20 * 10**9  # /kaggle/working kept after a session (field guide 5a)
PLATFORM_RECORD = "platform.json"
# Documented: kaggle-cli docs/kernels.md, "Accelerators available as of Feb 2026".
SHAPES_SOURCE = "kaggle-cli docs/kernels.md, accelerators available as of Feb 2026"
RESTRICTED_NOTE = ("Kaggle offers some shapes only to participants of specific competitions or "
                   "to Kaggle admins (" + SHAPES_SOURCE + ")")


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
    # "" : GPU count and memory as Kaggle documents them; else what is unconfirmed and why.
    unconfirmed: str = ""


_TPU = "a TPU: the kit trains with PyTorch on CUDA or the CPU only"
# Every name Kaggle documents today except the retired P100 (RETIRED_SHAPES). The T4's
# allocatable figure: users' out-of-memory messages on Kaggle's T4 report 14.56-14.76 GiB total
# capacity; the lowest is taken.
MACHINE_SHAPES = {m.name: m for m in (
    MachineShape("NvidiaTeslaT4", "2x NVIDIA T4", 2, 15.0, (7, 5), False, 14.56),
    MachineShape("NvidiaTeslaT4Highmem", "2x NVIDIA T4 (more host memory)", 2, 15.0, (7, 5),
                 False, 14.56, "the GPU count; the name suggests NvidiaTeslaT4's 2xT4 with more "
                               "host memory"),
    MachineShape("NvidiaL4X1", "1x NVIDIA L4", 1, 22.5, (8, 9), True, None,
                 "the memory PyTorch can allocate; one L4 by its name"),
    MachineShape("NvidiaL4", "1x NVIDIA L4", 1, 22.5, (8, 9), True, None,
                 "the GPU count: since NvidiaL4X1 exists this is probably several L4s (a "
                 "third-party page calls a 4xL4 shape competition-only); planned as one L4"),
    MachineShape("NvidiaTeslaA100", "1x NVIDIA A100", 1, 40.0, (8, 0), True, None,
                 "the GPU count and memory (an A100 has 40 or 80 GB); planned as one 40 GB card"),
    MachineShape("NvidiaH100", "1x NVIDIA H100", 1, 80.0, (9, 0), True, None,
                 "the GPU count and the memory PyTorch can allocate; planned as one 80 GB card"),
    MachineShape("NvidiaRtxPro6000", "1x NVIDIA RTX PRO 6000", 1, 96.0, (12, 0), True, None,
                 "the GPU count and memory; planned as one 96 GB card (its datasheet)"),
    MachineShape("TpuV38", "TPU v3-8", 0, 0.0, None, True),
    MachineShape("Tpu1VmV38", "TPU v3-8 (VM)", 0, 0.0, None, True),
    MachineShape("TpuV5E8", "TPU v5e-8", 0, 0.0, None, True),
    MachineShape("TpuV6E8", "TPU v6e-8", 0, 0.0, None, True),
)}
RETIRED_SHAPES = {
    "NvidiaTeslaP100": (
        "Kaggle retired the P100 in September 2026 (its product announcement), and the current "
        "image's PyTorch has no sm_60 kernels anyway (kaggle-cli issue #1151). Push with "
        "--machine-shape NvidiaTeslaT4 (2xT4, the default)"),
}
DEFAULT_MACHINE_SHAPE = "NvidiaTeslaT4"


class PlatformError(UserValueError):
    pass


def check_machine_shape(name: str, allow_unknown: bool = False) -> list[str]:
    """Warnings for a machine shape; PlatformError for the retired P100 only.

    A name the kit does not know is sent as given: Kaggle's own answer (shown verbatim) decides,
    since its list changes faster than the kit's. `allow_unknown` is kept for callers written
    when unknown names were refused; it changes nothing now."""
    if name in RETIRED_SHAPES:
        raise PlatformError(f"--machine-shape {name}: {RETIRED_SHAPES[name]}.")
    shape = MACHINE_SHAPES.get(name)
    if shape is None:
        return [f"machine shape {name!r} is not a name Kaggle documents ({SHAPES_SOURCE}: "
                f"{', '.join(MACHINE_SHAPES)}); sent as given, Kaggle's answer decides. The plan "
                "and the memory preflight cannot judge it."]
    warnings = []
    if shape.compute_capability is None:
        warnings.append(f"{name}: {_TPU}")
    if shape.unconfirmed:
        warnings.append(f"{name}: unconfirmed: {shape.unconfirmed}. `submit.py probe "
                        f"--machine-shape {name}` records what it gives, and the plan uses that")
    if name != DEFAULT_MACHINE_SHAPE:
        warnings.append(f"{name}: {RESTRICTED_NOTE}; if it is not open to you, Kaggle refuses the "
                        "push and the kit shows its answer")
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
    # How a kernel version is named in status and output reads: "v{}" (kaggle-cli PR 1201) until
    # the probe has read its first version back by label.
    version_label: str = "v{}"


def platform_facts(workdir: str | Path) -> PlatformFacts:
    """The probe's record where there is one, else the kit's constants."""
    record = load_platform_record(workdir)
    if record is None:
        return PlatformFacts(KAGGLE_PYTHON_FALLBACK, "unknown", {},
                             "the kit's defaults (run `submit.py probe` to record Kaggle's)")
    python = ".".join(str(record.get("python", KAGGLE_PYTHON_FALLBACK)).split(".")[:2])
    label = (record.get("version_label") or {}).get("format") or "v{}"
    return PlatformFacts(python, record.get("layout", "unknown"), dict(record.get("packages", {})),
                         f"{Path(workdir) / PLATFORM_RECORD} "
                         f"(probe of {record.get('probed_at', '?')})", label)


def machine_shape(name: str, workdir: str | Path | None = None) -> MachineShape | None:
    """The table's entry for `name`, with what a probe of that shape recorded (GPU count,
    per-device total_memory as the allocatable figure) where <workdir>/platform.json has it;
    None for a name the kit does not know."""
    shape = MACHINE_SHAPES.get(name)
    record = load_platform_record(workdir) if workdir is not None else None
    if shape is None or not record or record.get("machine_shape") != name:
        return shape
    devices = (record.get("gpu") or {}).get("devices") or []
    if not devices:
        return shape
    allocatable = min(d.get("allocatable_gib") or d["memory_gib"] for d in devices)
    return replace(shape, gpus=len(devices), allocatable_gib=allocatable, unconfirmed="")


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
            "Push again with --machine-shape NvidiaTeslaT4 (2xT4).") from None
    if value != 16.0:
        raise PlatformError(f"{name}: a CUDA sum gave {value}, not 16: this GPU is not usable")
    return (f"{torch.cuda.device_count()}x {name} "
            f"(sm_{major}{minor}; build archs {', '.join(archs)})")
