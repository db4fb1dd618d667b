"""Mixed precision: bf16 where the GPU has it, fp16 with a grad scaler on T4/P100, off on CPU
unless a stage asks for it by name (CPU autocast and `GradScaler("cpu")` are real: the tests
run the scaler's path there)."""
from __future__ import annotations

import torch


def has_native_bf16(device: torch.device) -> bool:
    # Not torch.cuda.is_bf16_supported(): it also says yes for T4/P100, which only emulate bf16
    # (slowly); native bf16 starts with compute capability 8 (A100, H100).
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def amp_settings(mode: str, device: torch.device) -> tuple[bool, torch.dtype | None]:
    """(use a grad scaler, autocast dtype) for a stage's `amp` mode on this device."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return False, None
    if mode == "bf16" or (mode == "auto" and has_native_bf16(device)):
        return False, torch.bfloat16
    return True, torch.float16


def inference_autocast(device: torch.device):
    """Autocast for feature extraction (no gradients, so fp16 needs no scaler)."""
    _, dtype = amp_settings("auto", device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
