"""Activation memory and FLOPs of a backbone, measured on this CPU once and cached.

A measurement is keyed by backbone, input size, patch stride, AMP dtype, gradient checkpointing
and attention kernel. It holds the peak activation bytes of a full-backbone training step at
batch 1 and 2 (with autocast's weight copies apart), the peak of a no-grad forward at batch 1
and 2 (the feature cache and the export), and the forward FLOPs per image.

Lookup order: the user's cache (`$GUIE_CACHE_DIR/plan/measurements.json`, default
~/.cache/guie), then the measurements shipped with the package (`measured.json`, for
backbones too slow to measure in CI: ViT-H-14), else measure now and store in the user's cache.
"""
from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from guie.plan import probe

SHIPPED = Path(__file__).with_name("measured.json")
BATCHES = (1, 2)  # activations are linear in the batch: two points give the line


@dataclass(frozen=True)
class Key:
    backbone: str
    image_size_px: int
    patch_stride_px: int  # 0: the backbone's own
    amp: str  # "fp16", "bf16" or "off"
    checkpointing: bool
    attention: str = "fused"  # "fused" (flash / memory-efficient) or "math"

    def text(self) -> str:
        return (f"{self.backbone}@{self.image_size_px}px/s{self.patch_stride_px}/{self.amp}/"
                f"{'ckpt' if self.checkpointing else 'nockpt'}/{self.attention}")


@dataclass(frozen=True)
class Measurement:
    key: Key
    train_peak_bytes: tuple[int, ...]  # per batch in BATCHES, weight copies included
    weight_copy_bytes: int  # autocast's low-precision weight copies at the peak (batch 1)
    infer_peak_bytes: tuple[int, ...]  # no-grad forward, per batch in BATCHES
    forward_flops_per_image: int
    params: int
    num_blocks: int
    attention_ops: tuple[str, ...]
    measured_on: str  # machine and date: these are measurements, say where they were taken

    def activation_bytes(self, batch: float, block_share: float = 1.0) -> float:
        """Training activations at `batch` (weight copies excluded), for a backbone whose top
        `block_share` of blocks keep activations (identical blocks: the share of the line)."""
        (b1, b2), (p1, p2) = BATCHES, self.train_peak_bytes
        slope = (p2 - p1) / (b2 - b1)
        base = p1 - slope * b1 - self.weight_copy_bytes
        return max(0.0, base + slope * batch) * block_share

    def per_image_activation_bytes(self) -> float:
        (b1, b2), (p1, p2) = BATCHES, self.train_peak_bytes
        return (p2 - p1) / (b2 - b1)

    def inference_bytes(self, batch: float) -> float:
        (b1, b2), (p1, p2) = BATCHES, self.infer_peak_bytes
        slope = (p2 - p1) / (b2 - b1)
        return max(0.0, p1 + slope * (batch - b1))


def cache_path() -> Path:
    base = os.environ.get("GUIE_CACHE_DIR") or Path.home() / ".cache" / "guie"
    return Path(base) / "plan" / "measurements.json"


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}  # a broken cache is re-measured, never trusted


def _from_json(data: dict) -> Measurement:
    data = dict(data)
    key = Key(**data.pop("key"))
    for name in ("train_peak_bytes", "infer_peak_bytes", "attention_ops"):
        data[name] = tuple(data[name])
    return Measurement(key, **data)


def lookup(key: Key) -> Measurement | None:
    for path in (cache_path(), SHIPPED):
        found = _load(path).get(key.text())
        if found is not None:
            return _from_json(found)
    return None


def store(m: Measurement, path: Path | None = None) -> None:
    path = path or cache_path()
    data = _load(path)
    data[m.key.text()] = asdict(m)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def get(key: Key, measure_missing: bool = True) -> Measurement | None:
    """The cached measurement, or a new one (stored) when `measure_missing`."""
    found = lookup(key)
    if found is None and measure_missing:
        found = measure(key)
        store(found)
    return found


class _Resolution:
    """What `Backbone.set_resolution` reads and writes of a Preprocess."""

    def __init__(self, image_size: int):
        self.image_size = image_size


def build_tower(key: Key):
    """The real image tower (random weights) at the key's input size and stride."""
    from guie.model import build_visual_by_name

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        visual, backbone = build_visual_by_name(key.backbone)
    backbone.set_resolution(_Resolution(key.image_size_px), key.image_size_px,
                            key.patch_stride_px or backbone.default_patch_stride)
    if hasattr(visual, "set_grad_checkpointing"):
        visual.set_grad_checkpointing(key.checkpointing)
    return visual, backbone


def measure(key: Key) -> Measurement:
    """Measure on this CPU: two training steps and two no-grad forwards (seconds for small
    towers; ViT-H-14 takes minutes and ~6 GiB)."""
    visual, backbone = build_tower(key)
    side = key.image_size_px
    gen = torch.Generator().manual_seed(0)
    train, copies, attention = [], 0, ()
    for b in BATCHES:
        images = torch.randn(b, 3, side, side, generator=gen)
        step = probe.measure_step(visual, images, key.amp, key.attention)
        train.append(step.peak_bytes)
        copies = copies or step.weight_copy_bytes
        attention = attention or step.attention_ops
    infer = []
    visual.eval()
    for b in BATCHES:
        images = torch.randn(b, 3, side, side, generator=gen)
        infer.append(_inference_peak(visual, images, key.amp))
    with torch.device("meta"):
        meta_visual, _ = build_tower(key)
    flops = probe.forward_flops(meta_visual, (1, 3, side, side))
    return Measurement(key, tuple(train), copies, tuple(infer), flops,
                       sum(p.numel() for p in visual.parameters()), backbone.num_blocks,
                       attention, _machine())


def _inference_peak(visual: torch.nn.Module, images: torch.Tensor, amp: str) -> int:
    dtype = probe.AMP_DTYPES[amp]
    weights = {p.untyped_storage().data_ptr() for p in visual.parameters()}
    pre = weights | {images.untyped_storage().data_ptr()}
    tracker = probe.ActivationTracker(pre, weights)
    # Frozen, as in the feature cache: autocast caches casts only of weights requiring grad.
    flags = [p.requires_grad for p in visual.parameters()]
    visual.requires_grad_(False)
    try:
        with tracker, torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16,
                                                      enabled=dtype is not None):
            visual(images)
    finally:
        for p, flag in zip(visual.parameters(), flags):
            p.requires_grad_(flag)
    return tracker.peak_bytes


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{datetime.now(timezone.utc).date().isoformat()}")
