"""One training stage, readable in one sitting: setup, resume, steps, finish.

A stage trains the parameter groups its `train` names (head, class centres, backbone blocks) at
its own input resolution. Frozen-backbone stages train from the on-disk feature cache. The loop
runs micro-batches in a deterministic order (`order.BatchOrder`), steps the optimizer every
`grad_accum` of them (`step.StageStep`), and writes atomic checkpoints that hold model,
optimizer, scaler, RNG and history (`stage_io`), so `resume` ends exactly where an
uninterrupted run would.

Under torchrun every rank trains every stage (a cached head stage too, each rank its share of
the batches) with the stage's parallelism (`fsdp.resolve_parallel`: DDP or FSDP2), evaluates
its share at the evaluation points, and reads the same figures, so no rank ever waits on
another's solo work. The plain model (`TrainContext.model`) always holds full weights where
anything reads it: evaluation, `select_by`, the checkpoints, the next stage.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from guie.backbones import freeze_batchnorm
from guie.config import ExperimentConfig, StageConfig, save_config
from guie.config_io import to_dict
from guie.losses import margin_at
from guie.model import EmbeddingModel, apply_stage_resolution
from guie.train import dist
from guie.train.batches import blank_batch, cache_transforms, cached_batches, image_batches
from guie.train.checkpoint import load_checkpoint
from guie.train.evaluate import evaluation_row
from guie.train.features import CacheRequest, build_feature_cache, cache_key
from guie.train.fsdp import auto_parallel, resolve_parallel
from guie.train.optim import trains_backbone
from guie.train.order import BatchOrder
from guie.train.run_state import StageOutcome, StageRun, TrainContext, stage_state
from guie.train.select import BEST_WEIGHTS, keep_if_best, select_best, selection_key
from guie.train.stage_io import (drop_resume_state, drop_superseded_backbones, finished,
                                 keep_global_batch, resume_stage, save_stage, stages_before)
from guie.train.step import StageStep

__all__ = ["TrainContext", "StageOutcome", "run_stage", "feature_cache_dir"]


def run_stage(ctx: TrainContext, stage: StageConfig, resume: bool = True) -> StageOutcome:
    """Train `stage` into `ctx.out_dir/<stage>/` (final.pt; last.pt while it runs), or load it
    where final.pt exists and `resume`; continue from last.pt where it exists and `resume`.
    Under torchrun every rank calls it."""
    stage_dir = Path(ctx.out_dir) / stage.name
    stage_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()  # max_hours counts the feature-cache build too
    if dist.is_main():
        save_config(ctx.cfg, stage_dir / "config.json")
    final_path, last_path = stage_dir / "final.pt", stage_dir / "last.pt"
    apply_stage_resolution(ctx.cfg, ctx.model, ctx.preprocess, stage)
    if ctx.evaluator is not None:  # the backbone or its input size may differ from last stage's
        ctx.evaluator.forget_features()
    if resume and final_path.exists():
        done = finished(ctx, final_path)
        drop_resume_state(last_path)  # a finished stage's optimizer state is dead weight
        dist.say(f"{stage.name}: complete, skipped ({final_path} holds its weights)")
        return done
    ckpt = load_checkpoint(last_path) if resume and last_path.exists() else None
    run = setup_stage(ctx, keep_global_batch(stage, ckpt, dist.world_size()))
    stage = run.stage
    resume_stage(run, ckpt, last_path)
    del ckpt  # ViT-H: gigabytes of optimizer state, loaded into the step now
    train_mode(run)
    bar = tqdm(total=run.total_batches, initial=run.next_batch, desc=stage.name,
               dynamic_ncols=True, disable=not dist.is_main())
    for b, (inputs, sizes_hw, labels) in enumerate(_batches(run), start=run.next_batch):
        weight = 1.0
        if not len(labels) and run.world > 1:
            # Every rank must take part in every backward's collectives (DDP's all-reduce,
            # FSDP's gathers): a zero-weighted step on blank images stands in for the
            # unreadable batch.
            inputs, labels, sizes_hw = blank_batch(ctx.preprocess)
            weight = 0.0
        # The margin of the optimizer step's first sample: the same whatever the ranks.
        window_start = b - b % stage.grad_accum
        margin = margin_at(stage, ctx.cfg.loss, window_start / run.batches_per_epoch)
        loss_value = run.step(b, inputs, sizes_hw, labels, margin, weight)
        row = _record(run, b, loss_value, margin)
        bar.set_postfix(loss=f"{row['loss']:.3f}", skipped=run.step.skipped_steps,
                        **{k.replace("map5", "mP@5"): f"{v:.3f}" for k, v in row.items()
                           if k.startswith("map5")})
        bar.update(1)
        run.next_batch = b + 1
        if (b + 1) % stage.grad_accum:
            continue  # checkpoints and the clock only at the end of an optimizer step
        if (b + 1) // stage.grad_accum % stage.checkpoint_every_steps == 0:
            save_stage(run, last_path)
        if stage.max_hours and _time_is_up(started, stage.max_hours, run.world, ctx.device):
            save_stage(run, last_path)
            bar.close()
            dist.barrier()  # last.pt is written before any rank moves on
            return StageOutcome("paused", last_path, {}, run.history, run.step.skipped_steps)
    bar.close()
    return finish_stage(run)


def setup_stage(ctx: TrainContext, stage: StageConfig) -> StageRun:
    """The stage's step (optimizer, scaler, EMA; DDP or FSDP over the ranks), its rows (the
    feature cache, built here for a frozen-backbone stage) and the schedule over them."""
    select_key = selection_key(stage, ctx.evaluator)  # a wrong `select_by` fails before the cache
    backbone_trains = trains_backbone(ctx.model, stage)
    from_cache = not backbone_trains and stage.use_feature_cache
    ctx.model.to(ctx.device)
    ctx.loss_fn.to(ctx.device)
    rank, world = dist.rank(), dist.world_size()
    cache = build_feature_cache(ctx.model, _cache_request(ctx, stage)) if from_cache else None
    rows = np.flatnonzero(cache.valid) if from_cache else np.arange(len(ctx.train_df))
    order = BatchOrder(len(rows), stage.batch_size, ctx.cfg.seed, rank, world)
    samples_per_step = order.global_batch_size() * stage.grad_accum
    # Whole optimizer steps, counted in samples: 2 ranks x accum 2 and 1 rank x accum 4 run
    # the same steps over the same samples.
    total_steps = max(1, math.ceil(stage.epochs * len(rows) / samples_per_step))
    steps_per_epoch = len(rows) / samples_per_step
    step = StageStep(ctx.model, ctx.loss_fn, stage, ctx.device, from_cache, world,
                     total_steps=total_steps,
                     warmup_steps=int(stage.warmup_epochs * steps_per_epoch),
                     parallel=resolve_parallel(
                         stage, world, from_cache,
                         auto=lambda: auto_parallel(ctx.cfg, stage, world, ctx.device,
                                                    ctx.loss_fn.num_classes)))
    order_key = {"rows": len(rows), "samples_per_step": samples_per_step,
                 "epochs": stage.epochs, "seed": ctx.cfg.seed}
    return StageRun(ctx, stage, backbone_trains, from_cache, step, world, cache, rows, order,
                    total_steps * stage.grad_accum, len(rows) / order.global_batch_size(),
                    max(1, round(stage.eval_every_epochs * steps_per_epoch)), order_key,
                    select_key)


def train_mode(run: StageRun) -> None:
    """Frozen parts stay in eval: no BatchNorm statistics drift, no dropout on them."""
    model = run.step.train_model  # under FSDP the sharded replica, which trains
    model.train()
    if not run.backbone_trains:
        model.visual.eval()
    if not any(g["name"] == "head" for g in run.step.groups):
        model.head.eval()
    # No BatchNorm statistics drift: frozen norms anywhere (a frozen BatchNorm head), and
    # every norm of the backbone, trained or not (why: guie.backbones).
    freeze_batchnorm(model)
    freeze_batchnorm(model.visual, statistics_of_trained=True)


def finish_stage(run: StageRun) -> StageOutcome:
    """The last evaluation, the kept weights (`select_by`) as final.pt, and the clean-up of
    what a finished stage no longer needs. Every rank."""
    ctx, stage = run.ctx, run.stage
    final_path = run.stage_dir / "final.pt"
    if run.step.ema is not None:
        run.step.ema.swap_in()
    run.step.sync_weights()
    metrics = {}
    if ctx.evaluator is not None:
        metrics = ctx.evaluator.evaluate(ctx.model, backbone_frozen=not run.backbone_trains)
        run.history.append({"stage": stage.name, "batch": run.total_batches,
                            "epoch": run.total_batches / run.batches_per_epoch,
                            **evaluation_row(metrics)})
        if run.select_key is not None:
            metrics = select_best(run.best, run.select_key, metrics, run.total_batches,
                                  run.stage_dir, ctx.model, ctx.loss_fn, stage)
    run.next_batch = run.total_batches
    save_stage(run, final_path, metrics)
    if dist.is_main():
        (run.stage_dir / BEST_WEIGHTS).unlink(missing_ok=True)  # final.pt holds them now
        # final.pt is what resume and the export read: last.pt's optimizer state (ViT-H AdamW:
        # ~5 GB) would only eat Kaggle's 20 GB output cap.
        drop_resume_state(run.stage_dir / "last.pt")
        if run.backbone_trains:
            drop_superseded_backbones(ctx.cfg, stage, Path(ctx.out_dir), ctx.model)
    dist.barrier()  # every rank leaves the stage with its files written
    return StageOutcome("done", final_path, metrics, run.history, run.step.skipped_steps)


def _record(run: StageRun, b: int, loss_value: float, margin: float) -> dict:
    """Micro-batch `b`'s history row; at the end of an optimizer step its gradient norm and
    skip count, and an evaluation point's figures where one falls (every rank evaluates)."""
    ctx, stage = run.ctx, run.stage
    first = run.step.optimizer.param_groups[0]
    row = {"stage": stage.name, "batch": b + 1, "epoch": (b + 1) / run.batches_per_epoch,
           "loss": loss_value, f"lr_{first['name']}": first["lr"], "margin_rad": margin}
    if (b + 1) % stage.grad_accum:
        run.history.append(row)
        return row
    row.update(grad_norm=run.step.grad_norm, skipped_steps=run.step.skipped_steps)
    steps = (b + 1) // stage.grad_accum
    if ctx.evaluator is not None and steps % run.eval_every_steps == 0 \
            and b + 1 < run.total_batches:
        run.step.sync_weights()
        result = ctx.evaluator.evaluate(ctx.model, backbone_frozen=not run.backbone_trains)
        row.update(evaluation_row(result))
        run.best = keep_if_best(run.best, run.select_key, row, result, b + 1, run.stage_dir,
                                lambda: stage_state(ctx.model, ctx.loss_fn, stage))
        run.step.park_plain()
        train_mode(run)
    run.history.append(row)
    return row


def _batches(run: StageRun):
    """(inputs, sizes_hw, labels) per micro-batch from `run.next_batch` to the end."""
    if run.from_cache:
        return cached_batches(run.cache, run.rows, run.order, run.next_batch, run.total_batches)
    ctx = run.ctx
    return image_batches(ctx.train_df, run.order, run.next_batch, run.total_batches, run.stage,
                         ctx.preprocess, ctx.cfg.data.num_workers)


def _cache_request(ctx: TrainContext, stage: StageConfig) -> CacheRequest:
    cfg = ctx.cfg
    key = cache_key({"backbone": cfg.model, "preprocess": cfg.preprocess,
                     "views": stage.cache_views, "augment": stage.augment, "seed": cfg.seed,
                     "resolution": (stage.image_size_px, stage.patch_stride_px),
                     "backbone_trained_by": _earlier_backbone_stages(cfg, stage, ctx.model)},
                    ctx.train_df)
    return CacheRequest(ctx.train_df, cache_transforms(stage, ctx.preprocess), key,
                        ctx.cache_dir or feature_cache_dir(), stage.batch_size,
                        cfg.data.num_workers, ctx.device)


def _earlier_backbone_stages(cfg: ExperimentConfig, stage: StageConfig,
                             model: EmbeddingModel) -> list[dict]:
    """The stages before this one that changed the backbone: a cache built from the backbone
    before 1st place's backbone-only stage must not serve the head-only stage after it."""
    return [to_dict(s) for s in stages_before(cfg, stage)
            if s.enabled and trains_backbone(model, s)]


def _time_is_up(started: float, max_hours: float, world: int, device: torch.device) -> bool:
    """Past the stage's time budget? Under torchrun rank 0's clock decides for all ranks, so
    every rank stops at the same step instead of one waiting forever in the next collective."""
    up = time.monotonic() - started > max_hours * 3600
    if world > 1:
        flag = torch.tensor([float(up)], device=device)
        torch.distributed.broadcast(flag, src=0)
        up = bool(flag.item())
    return up


def feature_cache_dir() -> Path:
    """`$GUIE_CACHE_DIR/feature-cache` (default ~/.cache/guie): on Kaggle outside
    /kaggle/working, so gigabytes of ViT-H features never become kernel output."""
    return Path(os.environ.get("GUIE_CACHE_DIR") or Path.home() / ".cache" / "guie") / \
        "feature-cache"
