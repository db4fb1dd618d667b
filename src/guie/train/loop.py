"""One training stage, readable in one sitting: setup, resume, steps, finish.

A stage trains the parameter groups its `train` names (head, class centres, backbone blocks) at
its own input resolution. Frozen-backbone stages train from the on-disk feature cache. The loop
runs micro-batches in a deterministic order (`order.BatchOrder`), steps the optimizer every
`grad_accum` of them (`step.StageStep`), and writes atomic checkpoints that hold model,
optimizer, scaler, RNG and history, so `resume` ends exactly where an uninterrupted run would.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from guie.backbones import freeze_batchnorm
from guie.config import ExperimentConfig, StageConfig, save_config
from guie.config_io import to_dict
from guie.data.preprocess import Preprocess
from guie.losses import ArcFace, margin_at
from guie.model import EmbeddingModel, apply_stage_resolution
from guie.train import dist
from guie.train.batches import blank_batch, cache_transforms, cached_batches, image_batches
from guie.train.checkpoint import (load_checkpoint, load_stage_state, rng_state, save_checkpoint,
                                   set_rng_state)
from guie.train.evaluate import Evaluator, evaluation_row
from guie.train.features import CacheRequest, FeatureCache, build_feature_cache, cache_key
from guie.train.optim import trains_backbone
from guie.train.order import BatchOrder
from guie.train.select import BEST_WEIGHTS, keep_if_best, select_best, selection_key
from guie.train.step import StageStep


@dataclass
class TrainContext:
    """What every stage of one training run shares."""

    cfg: ExperimentConfig
    model: EmbeddingModel
    preprocess: Preprocess
    loss_fn: ArcFace
    train_df: pd.DataFrame
    evaluator: Evaluator | None  # None: no evaluation points, the last weights are kept
    out_dir: Path  # one folder per stage under it
    device: torch.device
    cache_dir: Path | None = None  # the feature cache; None: `feature_cache_dir()`


@dataclass
class StageOutcome:
    status: str  # "done" or "paused" (stopped by max_hours; resume continues it)
    checkpoint: Path
    metrics: dict
    history: list[dict]
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite gradient


@dataclass
class StageRun:
    """A stage under way: its step, data and schedule, and how far it got."""

    ctx: TrainContext
    stage: StageConfig
    backbone_trains: bool
    from_cache: bool
    step: StageStep
    world: int  # 1 for a cached stage: rank 0 trains the head alone (it takes seconds)
    cache: FeatureCache | None
    rows: np.ndarray  # the training rows the stage draws from
    order: BatchOrder
    total_batches: int
    batches_per_epoch: float
    eval_every: int  # micro-batches between evaluation points
    # What fixes the data order: a checkpoint resumed under other values would silently
    # continue at the wrong position of a different order.
    order_key: dict
    select_key: str | None
    next_batch: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict | None = None  # the evaluation point the stage keeps so far

    @property
    def stage_dir(self) -> Path:
        return Path(self.ctx.out_dir) / self.stage.name


def stage_state(model: EmbeddingModel, loss_fn: ArcFace, stage: StageConfig) -> dict:
    state = {"head": model.head.state_dict(), "loss": loss_fn.state_dict()}
    if trains_backbone(model, stage):
        state["visual"] = model.visual.state_dict()
    return state


def run_stage(ctx: TrainContext, stage: StageConfig, resume: bool = True) -> StageOutcome:
    """Train `stage` into `ctx.out_dir/<stage>/` (final.pt; last.pt while it runs), or load it
    where final.pt exists and `resume`; continue from last.pt where it exists and `resume`."""
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
        done = _finished(ctx, final_path)
        _drop_resume_state(last_path)  # a finished stage's optimizer state is dead weight
        dist.say(f"{stage.name}: complete, skipped ({final_path} holds its weights)")
        return done
    run = setup_stage(ctx, stage)
    if run.from_cache and not dist.is_main():
        dist.barrier()  # rank 0 trains the head; then its final.pt says whether it finished
        return _finished(ctx, final_path) if final_path.exists() else \
            StageOutcome("paused", last_path, {}, [])
    resume_stage(run, last_path if resume else None)
    train_mode(run)
    bar = tqdm(total=run.total_batches, initial=run.next_batch, desc=stage.name,
               dynamic_ncols=True, disable=not dist.is_main())
    for b, (inputs, sizes_hw, labels) in enumerate(_batches(run), start=run.next_batch):
        weight = 1.0
        if not len(labels) and run.world > 1:
            # Under DDP every rank must take part in every backward's all-reduce: a
            # zero-weighted step on blank images stands in for the unreadable batch.
            inputs, labels, sizes_hw = blank_batch(ctx.preprocess)
            weight = 0.0
        margin = margin_at(stage, ctx.cfg.loss, b / run.batches_per_epoch)
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
            if run.from_cache:
                dist.barrier()  # release the ranks waiting for the head stage
            return StageOutcome("paused", last_path, {}, run.history)
    bar.close()
    return finish_stage(run)


def setup_stage(ctx: TrainContext, stage: StageConfig) -> StageRun:
    """The stage's step (optimizer, scaler, EMA), its rows (the feature cache, built here for a
    frozen-backbone stage) and the schedule over them."""
    select_key = selection_key(stage, ctx.evaluator)  # a wrong `select_by` fails before the cache
    backbone_trains = trains_backbone(ctx.model, stage)
    from_cache = not backbone_trains and stage.use_feature_cache
    ctx.model.to(ctx.device)
    ctx.loss_fn.to(ctx.device)
    rank, world = (0, 1) if from_cache else (dist.rank(), dist.world_size())
    cache = build_feature_cache(ctx.model, _cache_request(ctx, stage)) if from_cache else None
    rows = np.flatnonzero(cache.valid) if from_cache else np.arange(len(ctx.train_df))
    order = BatchOrder(len(rows), stage.batch_size, ctx.cfg.seed, rank, world)
    total_batches = math.ceil(stage.epochs * len(rows) / order.global_batch_size())
    total_batches -= total_batches % stage.grad_accum  # end on an optimizer step
    batches_per_epoch = len(rows) / order.global_batch_size()
    step = StageStep(ctx.model, ctx.loss_fn, stage, ctx.device, from_cache, world,
                     total_steps=total_batches // stage.grad_accum,
                     warmup_steps=int(stage.warmup_epochs * len(rows)
                                      / order.global_batch_size() / stage.grad_accum))
    order_key = {"rows": len(rows), "batch_size": stage.batch_size, "world": world,
                 "grad_accum": stage.grad_accum, "epochs": stage.epochs, "seed": ctx.cfg.seed}
    return StageRun(ctx, stage, backbone_trains, from_cache, step, world, cache, rows,
                    order, total_batches, batches_per_epoch,
                    max(1, round(stage.eval_every_epochs * batches_per_epoch)), order_key,
                    select_key)


def resume_stage(run: StageRun, last_path: Path | None) -> None:
    """Continue from `last_path` where it exists (None: start afresh), else seed the stage."""
    if last_path is None or not last_path.exists():
        # The stage's randomness (dropout) must not depend on what ran before it, e.g. whether
        # the feature cache had to be built in this process.
        torch.manual_seed(run.ctx.cfg.seed * 1000 + sum(map(ord, run.stage.name)))
        return
    ckpt = load_checkpoint(last_path)
    saved_key = ckpt.get("order", run.order_key)
    if saved_key != run.order_key:
        changed = {k: (saved_key.get(k), v) for k, v in run.order_key.items()
                   if saved_key.get(k) != v}
        raise ValueError(f"{last_path}: cannot resume, the data order changed since it was "
                         f"saved (was, now): {changed}; restore them or start the stage "
                         "again (delete the checkpoint)")
    load_stage_state(run.ctx.model, run.ctx.loss_fn, ckpt["model"])
    run.step.load_state_dict(ckpt)
    set_rng_state(ckpt["rng"])
    run.next_batch, run.history, run.best = ckpt["next_batch"], ckpt["history"], ckpt.get("best")
    dist.say(f"{run.stage.name}: resumed at batch {run.next_batch} of {run.total_batches} "
             f"(optimizer step {run.next_batch // run.stage.grad_accum}) from {last_path}")


def train_mode(run: StageRun) -> None:
    """Frozen parts stay in eval: no BatchNorm statistics drift, no dropout on them."""
    model = run.ctx.model
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
    what a finished stage no longer needs."""
    ctx, stage = run.ctx, run.stage
    final_path = run.stage_dir / "final.pt"
    if run.step.ema is not None:
        run.step.ema.swap_in()
    metrics = {}
    if ctx.evaluator is not None and dist.is_main():
        metrics = ctx.evaluator.evaluate(ctx.model, backbone_frozen=not run.backbone_trains)
        run.history.append({"stage": stage.name, "batch": run.total_batches,
                            "epoch": run.total_batches / run.batches_per_epoch,
                            **evaluation_row(metrics)})
        if run.select_key is not None:
            metrics = select_best(run.best, run.select_key, metrics, run.total_batches,
                                  run.stage_dir, ctx.model, ctx.loss_fn, stage)
    run.next_batch = run.total_batches
    save_stage(run, final_path, metrics)
    (run.stage_dir / BEST_WEIGHTS).unlink(missing_ok=True)  # final.pt holds the kept weights now
    if dist.is_main():
        # final.pt is what resume and the export read: last.pt's optimizer state (ViT-H AdamW:
        # ~5 GB) would only eat Kaggle's 20 GB output cap.
        _drop_resume_state(run.stage_dir / "last.pt")
        if run.backbone_trains:
            drop_superseded_backbones(ctx.cfg, stage, Path(ctx.out_dir), ctx.model)
    if run.from_cache:
        dist.barrier()
    return StageOutcome("done", final_path, metrics, run.history, run.step.skipped_steps)


def save_stage(run: StageRun, path: Path, metrics: dict | None = None) -> None:
    """Checkpoint at `run.next_batch` (rank 0); final.pt without the optimisation state."""
    if not dist.is_main():
        return
    ctx = run.ctx
    state = {"model": stage_state(ctx.model, ctx.loss_fn, run.stage),
             "next_batch": run.next_batch, "order": run.order_key, "best": run.best,
             "history": run.history, "metrics": metrics or {}, "config": to_dict(ctx.cfg),
             "skipped_steps": run.step.skipped_steps}
    if path.name != "final.pt":  # a finished stage needs no optimizer (ViT-H AdamW: 5 GB)
        state.update(run.step.state_dict(), rng=rng_state())
    save_checkpoint(state, path)
    pd.DataFrame(run.history).to_csv(run.stage_dir / "history.csv", index=False)


def _record(run: StageRun, b: int, loss_value: float, margin: float) -> dict:
    """Micro-batch `b`'s history row, with an evaluation point's figures where one falls."""
    ctx, stage = run.ctx, run.stage
    first = run.step.optimizer.param_groups[0]
    row = {"stage": stage.name, "batch": b + 1, "epoch": (b + 1) / run.batches_per_epoch,
           "loss": loss_value, f"lr_{first['name']}": first["lr"], "margin_rad": margin}
    if (b + 1) % stage.grad_accum == 0:  # an optimizer step ended here
        row.update(grad_norm=run.step.grad_norm, skipped_steps=run.step.skipped_steps)
    if ctx.evaluator is not None and (b + 1) % run.eval_every == 0 \
            and b + 1 < run.total_batches and dist.is_main():
        result = ctx.evaluator.evaluate(ctx.model, backbone_frozen=not run.backbone_trains)
        row.update(evaluation_row(result))
        run.best = keep_if_best(run.best, run.select_key, row, result, b + 1, run.stage_dir,
                                lambda: stage_state(ctx.model, ctx.loss_fn, stage))
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


def _finished(ctx: TrainContext, final_path: Path) -> StageOutcome:
    """A finished stage's outcome, its weights loaded."""
    done = load_checkpoint(final_path)
    load_stage_state(ctx.model, ctx.loss_fn, done["model"])
    return StageOutcome("done", final_path, done["metrics"], done["history"],
                        done.get("skipped_steps", 0))


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


def drop_superseded_backbones(cfg: ExperimentConfig, stage: StageConfig, out_dir: Path,
                              model: EmbeddingModel) -> None:
    """Once a backbone stage has finished, the backbone copies in earlier stages' final.pt are
    superseded (loading the stages in order overwrites them): rewrite those files without it.
    1st place's six backbone stages would otherwise leave six ViT-H copies (14 GB)."""
    for earlier in _stages_before(cfg, stage):
        path = out_dir / earlier.name / "final.pt"
        if not earlier.enabled or not path.exists() or not trains_backbone(model, earlier):
            continue
        state = load_checkpoint(path)
        if "visual" in state["model"]:
            del state["model"]["visual"]
            state["backbone_in"] = stage.name  # where its backbone now lives
            save_checkpoint(state, path)


def _drop_resume_state(last_path: Path) -> None:
    if dist.is_main():
        last_path.unlink(missing_ok=True)


def _earlier_backbone_stages(cfg: ExperimentConfig, stage: StageConfig,
                             model: EmbeddingModel) -> list[dict]:
    """The stages before this one that changed the backbone: a cache built from the backbone
    before 1st place's backbone-only stage must not serve the head-only stage after it."""
    return [to_dict(s) for s in _stages_before(cfg, stage)
            if s.enabled and trains_backbone(model, s)]


def _stages_before(cfg: ExperimentConfig, stage: StageConfig) -> tuple[StageConfig, ...]:
    """The config's stages before `stage` (none where `stage` is not one of them)."""
    names = [s.name for s in cfg.stages]
    return cfg.stages[:names.index(stage.name)] if stage.name in names else ()


def _time_is_up(started: float, max_hours: float, world: int, device: torch.device) -> bool:
    """Past the stage's time budget? Under DDP rank 0's clock decides for all ranks, so every
    rank stops at the same step instead of one waiting forever in the next all-reduce."""
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
