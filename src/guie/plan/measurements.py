"""Activation memory and FLOPs of a backbone, measured on this CPU once and cached.

A measurement is keyed by backbone, input size, patch stride, AMP dtype, gradient checkpointing
and attention kernel. It holds the peak activation bytes of a full-backbone training step at
batches 2 and 4 (per op, with autocast's weight copies apart: `probe.envelope`), the peak of a
no-grad forward at batches 2 and 4 (the feature cache and the export), and the forward FLOPs per
image.

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
BATCHES = (2, 4)  # two batches give the line per op (batch 1 runs a few other ops)


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
    # (live bytes at BATCHES[0], at BATCHES[1], weight copies) of the ops that hold the training
    # step's peak at some batch (probe.envelope); weight copies included in the live bytes
    train_envelope: tuple[tuple[int, int, int], ...]
    infer_peak_bytes: tuple[int, ...]  # no-grad forward, per batch in BATCHES
    forward_flops_per_image: int
    params: int
    num_blocks: int
    attention_ops: tuple[str, ...]
    measured_on: str  # machine and date: these are measurements, say where they were taken

    def train_peak(self, batch: float, block_share: float = 1.0) -> tuple[float, float]:
        """(activations without the weight copies, weight copies) at the training step's peak
        at `batch`, for a backbone whose top `block_share` of blocks keep activations
        (identical blocks: that share of the full backbone's)."""
        (b1, b2) = BATCHES

        def live(p):
            return p[0] + (p[1] - p[0]) * (batch - b1) / (b2 - b1)
        top = max(self.train_envelope, key=live)
        return max(0.0, live(top) - top[2]) * block_share, top[2] * block_share

    def activations_without_copies(self, batch: float, block_share: float = 1.0) -> float:
        """The step's largest live bytes less autocast's weight copies at `batch`: what a
        step whose parameters are already in the AMP dtype keeps (FSDP's mixed precision, where
        autocast has nothing to cast), taken over the envelope's ops."""
        (b1, b2) = BATCHES
        return max(max(0.0, p[0] + (p[1] - p[0]) * (batch - b1) / (b2 - b1) - p[2])
                   for p in self.train_envelope) * block_share

    def activation_bytes(self, batch: float, block_share: float = 1.0) -> float:
        return self.train_peak(batch, block_share)[0]

    @property
    def weight_copy_bytes(self) -> int:
        """Autocast's weight copies at the peak of the smaller measured batch."""
        return int(self.train_peak(BATCHES[0])[1])

    def per_image_activation_bytes(self, batch: float = 64) -> float:
        """The slope at `batch` (bytes per extra image)."""
        return sum(self.train_peak(batch + 1)) - sum(self.train_peak(batch))

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
    data["train_envelope"] = tuple(tuple(p) for p in data["train_envelope"])
    for name in ("infer_peak_bytes", "attention_ops"):
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
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # ranks of one run may store at once
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
    towers; ViT-H-14 took 11-15 minutes and ~8 GiB on a shared 2-core CPU)."""
    visual, backbone = build_tower(key)
    side = key.image_size_px
    gen = torch.Generator().manual_seed(0)
    steps = [probe.measure_step(visual, torch.randn(b, 3, side, side, generator=gen), key.amp,
                                key.attention) for b in BATCHES]
    train = probe.envelope(*steps, BATCHES)
    infer = []
    visual.eval()
    for b in BATCHES:
        images = torch.randn(b, 3, side, side, generator=gen)
        infer.append(_inference_peak(visual, images, key.amp))
    with torch.device("meta"):
        meta_visual, _ = build_tower(key)
    flops = probe.forward_flops(meta_visual, (1, 3, side, side))
    return Measurement(key, train, tuple(infer), flops,
                       sum(p.numel() for p in visual.parameters()), backbone.num_blocks,
                       steps[0].attention_ops, _machine())


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
        for p, flag in zip(visual.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return tracker.peak_bytes


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:  # the CPU's model name says more than "x86_64"
        cpu = next(line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{datetime.now(timezone.utc).date().isoformat()}")
