"""Hours per stage, the feature-cache pass, the inference kernel, the host's scoring run,
sessions of `max_hours` and the share of Kaggle's weekly GPU quota.

Throughput = an effective TFLOP/s for the GPU (`guie.plan.gpus`: estimates from published
anchors, or a committed `python -m bench --gpu` measurement of that GPU in bench/) divided
by the FLOPs per image, counted on the meta device for the stage's backbone, input size and
stride. A full-backbone step costs 3x the forward (forward, backward to inputs, to weights);
frozen blocks below the trained ones run forward only; gradient checkpointing adds one more
forward of the blocks that run backward. Data loading caps it: JPEG decode + resize per core.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from guie.plan import estimates
from guie.plan import gpus
from guie.plan.gpus import GpuFacts

WEEKLY_QUOTA_HOURS = 30.0  # Kaggle's floating weekly GPU quota (field guide 5a)
# Measured on this repo's CPU: TFRecord JPEG -> 224 px tensor, one core (bench/cpu-full.json,
# decode_speedup, 2026-11-22). Kaggle's 4 vCPUs are assumed as fast.
DECODE_IMG_S_PER_CORE = 703.5
KAGGLE_CPUS = 4
# Loading ViT-H weights, scripting, saving and the contract check: not measured; assumed.
EXPORT_HOURS = 0.1
BENCH_DIR = Path(__file__).resolve().parents[3] / "bench"


@dataclass(frozen=True)
class Rate:
    infer_tflops: float
    train_tflops: float
    source: str
    measured: bool


def bench_measurement(gpu: GpuFacts, bench_dir: Path = BENCH_DIR) -> Rate | None:
    """A committed `python -m bench --gpu` run on this GPU: its ViT-H stage-2 img/s and export
    inference img/s as effective TFLOP/s."""
    for path in sorted(bench_dir.glob("*.json")) if bench_dir.is_dir() else ():
        try:
            details = json.loads(path.read_text())["benchmarks"]["gpu"]["details"]
        except (KeyError, TypeError, json.JSONDecodeError, OSError):
            continue
        if gpu.name not in str(details.get("device", "")):
            continue
        figures = {f["name"]: f["ours"] for f in
                   json.loads(path.read_text())["benchmarks"]["gpu"]["figures"]}
        train, infer = figures.get("gpu_train_img_s"), figures.get("gpu_inference_fp16_img_s")
        if not train or not infer:
            continue
        flop = estimates.VIT_H_FORWARD_GFLOP * 1e9
        return Rate(infer * flop / 1e12, train * 3 * flop / 1e12,
                    f"measured: {path.name} on {details['device']} (ViT-H-14 stage 2 "
                    f"{train:.0f} img/s, export {infer:.0f} img/s)", True)
    return None


def rate_for(gpu: GpuFacts) -> Rate:
    return bench_measurement(gpu) or Rate(gpu.infer_tflops, gpu.train_tflops, gpu.source, False)


def loader_img_s(num_workers: int) -> float:
    return DECODE_IMG_S_PER_CORE * max(1, min(num_workers, KAGGLE_CPUS))


@dataclass(frozen=True)
class StageTime:
    hours: float  # training + (head-only stages) the feature-cache pass
    cache_pass_hours: float
    train_img_s: float  # all devices together (0: head-only)
    basis: str


def backbone_stage_time(images: float, epochs: float, forward_flop: float, block_share: float,
                        checkpointing: bool, rate: Rate, gpus_used: int, num_workers: int
                        ) -> StageTime:
    step_flop = forward_flop * (1 + block_share * (2 + (1 if checkpointing else 0)))
    per_gpu = rate.train_tflops * 1e12 / step_flop
    img_s = min(per_gpu * gpus.multi_gpu_speedup(gpus_used), loader_img_s(num_workers))
    hours = images * epochs / img_s / 3600
    bound = "data loading" if img_s < per_gpu * gpus.multi_gpu_speedup(gpus_used) else "GPU"
    return StageTime(hours, 0.0, img_s,
                     f"{images * epochs:,.0f} images / {img_s:.1f} img/s ({bound}-bound; "
                     f"{step_flop / 1e9:.1f} GFLOP per image trained; {rate.source})")


def head_stage_time(images: float, epochs: float, cache_views: int, batch: int,
                    forward_flop: float, head_step_flop: float, rate: Rate, gpus_used: int,
                    num_workers: int) -> StageTime:
    """Cache pass (sharded over every GPU) + head training on one GPU from the cache."""
    cache_img_s = min(rate.infer_tflops * 1e12 / forward_flop * gpus.multi_gpu_speedup(gpus_used),
                      loader_img_s(num_workers))
    cache_h = images * cache_views / cache_img_s / 3600
    steps = math.ceil(images * epochs / batch)
    step_s = max(head_step_flop / (rate.train_tflops * 1e12), gpus.STEP_FLOOR_S)
    train_h = steps * step_s / 3600
    return StageTime(cache_h + train_h, cache_h, 0.0,
                     f"feature cache: {images * cache_views:,.0f} images at {cache_img_s:.0f} "
                     f"img/s = {cache_h:.2f} h; head: {steps:,} steps x {step_s * 1e3:.1f} ms = "
                     f"{train_h:.2f} h ({gpus.STEP_FLOOR_NOTE}; {rate.source})")


def scoring_hours(forward_flop: float, tta_views: float, rate: Rate) -> float:
    """The host's run: every test image alone through saved_model.pt on one GPU."""
    img_s = rate.infer_tflops * 1e12 / forward_flop / tta_views
    return estimates.TEST_IMAGES / img_s / 3600


def inference_kernel_hours(forward_flop: float, reduction_images: int, rate: Rate) -> float:
    """The inference kernel: export (assumed EXPORT_HOURS) + the reduction's backbone pass."""
    return EXPORT_HOURS + reduction_images * forward_flop / (rate.infer_tflops * 1e12) / 3600


def sessions_needed(stage_hours: list[float], max_hours: float) -> int:
    """Sessions of `max_hours` for the stages run back to back (a paused stage resumes in the
    next session from its last checkpoint)."""
    total = sum(stage_hours)
    return max(1, math.ceil(total / max_hours - 1e-9)) if total > 0 else 0
