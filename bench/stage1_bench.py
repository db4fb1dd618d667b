"""Figure 2, `stage1_cache_speedup`, and the 3rd-place stage-1 schedule at reference scale.

Speedup: one frozen-backbone (stage-1) epoch of the `tiny` recipe trained the way the kit's loop
does it from the feature cache (rows gathered from a float16 memmap [views, N, D]), against one
epoch that decodes, augments and re-encodes every image through the backbone (the loop's image
path, `ImageDataset` + `TrainTransform`, in-process). Both run the training loop's own step
(`guie.train.step.StageStep`: head + ArcFace + AdamW), the cached epoch on the loop's own
batches (`guie.train.batches.cached_batches`); the backbone runs under no_grad, the kinder
baseline. The backbone's own share of the image epoch is timed too:
`stage1_cache_speedup_backbone_only` is the speedup if decoding were free.

Reference scale: 3rd place's stage 1 is 200 tenth-epochs = 20 passes over 885k cached 1024-d
ViT-H features, 17,691 classes, sub-center k=3, a 20-branch dropout head, batch 256. The step
cost does not depend on the number of rows, so we time steps of exactly that head and loss over
a smaller random cache and multiply by the schedule's step count. Without a GPU that is a CPU
figure, extrapolated and labelled so; `--gpu` measures the same steps on the device.
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from bench.common import BenchResult, Figure, interleaved, rounded
from guie.config import StageConfig
from guie.configs import get_config
from guie.data.augment import EvalTransform, TrainTransform
from guie.data.dataset import ImageDataset, collate_skip_bad
from guie.losses import build_loss, margin_at
from guie.model import EmbeddingModel, build_head, build_model, head_output_dim
from guie.train.batches import cached_batches
from guie.train.features import FeatureCache, compute_features
from guie.train.order import BatchOrder, BatchSampler, SeededDataset
from guie.train.step import StageStep

REFERENCE_ROWS = 885_000
REFERENCE_PASSES = 20
REFERENCE_FEATURE_DIM = 1024  # ViT-H-14's projected image features
REFERENCE_CLASSES = 17_691
GOAL_REFERENCE_S = 120.0  # on one H100


def head_step(model: EmbeddingModel, loss_fn: nn.Module, stage: StageConfig,
              device: torch.device, steps: int) -> StageStep:
    """The training loop's own step of a cached stage (head + class centres on features), its
    LR schedule spread over the `steps` to be timed."""
    return StageStep(model, loss_fn, stage, device, from_features=True, total_steps=steps)


def write_cache(path: Path, features: np.ndarray, labels: np.ndarray) -> FeatureCache:
    """A one-view float16 cache like the kit's ([1, N, D]), reopened read-only as a memmap."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(1, *features.shape))
    mm[0] = features
    mm.flush()
    del mm
    return FeatureCache(np.load(path, mmap_mode="r"), np.ones(len(labels), dtype=bool),
                        labels.astype(np.int64), path)


def cached_epoch_batches(cache: FeatureCache, order: BatchOrder, steps: int):
    """The loop's own cached path (`guie.train.batches.cached_batches`) over every row."""
    return cached_batches(cache, np.arange(len(cache.labels)), order, 0, steps)


def tiny_speedup(df: pd.DataFrame, workdir: Path, repeats: int) -> tuple[list[Figure], dict]:
    torch.manual_seed(0)
    cfg = get_config("tiny")
    stage = cfg.stages[0]
    model, preprocess = build_model(cfg)
    model.visual.eval()
    num_classes = int(df["label"].max()) + 1
    loss_fn = build_loss(cfg.loss, head_output_dim(cfg.model, model.feature_dim), num_classes)
    margin = margin_at(stage, cfg.loss, 0.0)
    n, batch = len(df), stage.batch_size
    order = BatchOrder(n, batch, cfg.seed)
    steps = math.ceil(n / batch)
    step = head_step(model, loss_fn, stage, torch.device("cpu"), steps)

    # Setup, untimed: the cache (view 0, the plain preprocessing), by the loop's own feature pass.
    feats, _ = compute_features(model, df, EvalTransform(preprocess), 64, 0, torch.device("cpu"),
                                progress=False)
    cache = write_cache(workdir / "tiny-features.npy", feats.numpy(),
                        np.array(df["label"], dtype=np.int64))

    def cached_epoch():
        model.head.train()
        for b, (features, sizes_hw, y) in enumerate(cached_epoch_batches(cache, order, steps)):
            step(b, features, sizes_hw, y, margin)

    images = SeededDataset(ImageDataset(df, TrainTransform(stage.augment, preprocess)))
    backbone_s: list[float] = []

    def image_epoch():
        model.head.train()
        loader = DataLoader(images, batch_sampler=BatchSampler(order, 0, steps),
                            collate_fn=collate_skip_bad, generator=torch.Generator())
        spent = 0.0
        for b, batch in enumerate(loader):
            start = time.perf_counter()
            with torch.no_grad():
                features = model.visual(batch.images)
            spent += time.perf_counter() - start
            step(b, features, None, batch.labels, margin)
        backbone_s.append(spent)

    paired = interleaved(cached_epoch, image_epoch, repeats)
    backbone = statistics.median(backbone_s[1:])  # [0]: the warm-up epoch
    cached = paired.ours_median_s
    figures = [
        Figure("stage1_cache_speedup", rounded(cached), rounded(paired.baseline_median_s),
               rounded(paired.speedup), "s/epoch", ">= 50",
               f"tiny backbone, {n} JPEGs 400-800 px, batch {batch}, CPU, in-process"),
        Figure("stage1_cache_speedup_backbone_only", rounded(cached), rounded(backbone + cached),
               rounded((backbone + cached) / cached), "s/epoch", "",
               "baseline without decode/augment: backbone forward + the same head steps"),
    ]
    details = {"images": n, "batch_size": batch, "image_px": preprocess.image_size,
               "augment": list(stage.augment), "paired": paired.to_dict(),
               "backbone_s_per_epoch": rounded(backbone),
               "decode_augment_s_per_epoch": rounded(paired.baseline_median_s - backbone - cached)}
    return figures, details


def reference_step_s(device: torch.device, rows: int, steps: int, workdir: Path) -> float:
    """Median seconds of one 3rd-place stage-1 step (cached features -> head -> loss -> AdamW)."""
    torch.manual_seed(0)
    cfg = get_config("third_place")
    stage = cfg.stages[0]
    head = build_head(cfg.model, REFERENCE_FEATURE_DIM)
    # The step takes cached features and never runs the backbone: the tiny one stands in for
    # ViT-H (the loop's parameter groups need a backbone to freeze).
    tiny_visual = build_model(get_config("tiny"))[0].visual
    model = EmbeddingModel(tiny_visual, head, REFERENCE_FEATURE_DIM).to(device)
    loss_fn = build_loss(cfg.loss, head_output_dim(cfg.model, REFERENCE_FEATURE_DIM),
                         REFERENCE_CLASSES).to(device)
    margin = margin_at(stage, cfg.loss, 0.0)
    rng = np.random.default_rng(0)
    features = rng.standard_normal((rows, REFERENCE_FEATURE_DIM), dtype=np.float32)
    cache = write_cache(workdir / "reference-features.npy", features,
                        rng.integers(0, REFERENCE_CLASSES, rows))
    order = BatchOrder(rows, stage.batch_size, cfg.seed)
    warmup = 2
    step = head_step(model, loss_fn, stage, device, warmup + steps)
    model.train()
    times = []
    for i, (x, sizes_hw, y) in enumerate(cached_epoch_batches(cache, order, warmup + steps)):
        start = time.perf_counter()
        step(i, x, sizes_hw, y, margin)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference_schedule(device: torch.device, rows: int, steps: int,
                       workdir: Path) -> tuple[Figure, dict]:
    stage = get_config("third_place").stages[0]
    total_steps = math.ceil(REFERENCE_PASSES * REFERENCE_ROWS / stage.batch_size)
    step_s = reference_step_s(device, rows, steps, workdir)
    total_s = step_s * total_steps
    on_gpu = device.type == "cuda"
    figure = Figure(
        "stage1_reference_schedule_s" if on_gpu else "stage1_reference_schedule_cpu_s",
        rounded(total_s), None, None, "s", f"<= {GOAL_REFERENCE_S:g}" if on_gpu else "",
        f"{'measured on ' + torch.cuda.get_device_name(device) if on_gpu else 'EXTRAPOLATED, CPU'}:"
        f" {steps} steps timed, x {total_steps:,} steps (20 passes, 885k rows, batch "
        f"{stage.batch_size}); goal {GOAL_REFERENCE_S:g} s is for one H100")
    details = {"device": str(device), "rows_in_cache": rows, "steps_timed": steps,
               "step_s": rounded(step_s), "schedule_steps": total_steps,
               "budget_per_step_s_for_goal": rounded(GOAL_REFERENCE_S / total_steps)}
    return figure, details


def run(df: pd.DataFrame, workdir: Path, repeats: int, reference_rows: int,
        reference_steps: int) -> BenchResult:
    figures, details = tiny_speedup(df, workdir, repeats)
    ref_figure, ref_details = reference_schedule(torch.device("cpu"), reference_rows,
                                                 reference_steps, workdir)
    details["reference_schedule"] = ref_details
    return BenchResult(figures + [ref_figure], details)

