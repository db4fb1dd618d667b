"""One training stage, readable in one sitting.

A stage trains the parameter groups its `train` names (head, class centres, backbone blocks) at
its own input resolution. Frozen-backbone stages train from the on-disk feature cache. The loop runs micro-batches in a
deterministic order (`order.BatchOrder`), steps the optimizer every `grad_accum` of them, and
writes atomic checkpoints that hold model, optimizer, scaler, RNG and history, so `resume` ends
exactly where an uninterrupted run would.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from guie.backbones import freeze_batchnorm
from guie.config import ExperimentConfig, StageConfig, save_config, to_dict
from guie.data.augment import EvalTransform, TrainTransform
from guie.data.dataset import ImageDataset, collate_skip_bad
from guie.data.preprocess import Preprocess
from guie.losses import ArcFace, margin_at
from guie.model import EmbeddingModel, backbone, set_resolution
from guie.train import dist
from guie.train.amp import amp_settings
from guie.train.averaging import EMA
from guie.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from guie.train.evaluate import Evaluator, evaluation_row
from guie.train.features import build_feature_cache, cache_key
from guie.train.optim import lr_multiplier, param_groups, trainable
from guie.train.order import BatchOrder, BatchSampler, SeededDataset


@dataclass
class StageOutcome:
    status: str  # "done" or "paused" (stopped by max_hours; resume continues it)
    checkpoint: Path
    metrics: dict
    history: list[dict]


class TrainStep(nn.Module):
    """Model + loss as one module, so DDP synchronises the class centres' gradients too."""

    def __init__(self, model: EmbeddingModel, loss_fn: ArcFace, from_features: bool):
        super().__init__()
        self.model, self.loss_fn, self.from_features = model, loss_fn, from_features

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor, margin_rad: float,
                sizes_hw: torch.Tensor | None = None):
        if self.from_features:
            embeddings = self.model.embed_features(inputs)
        else:
            embeddings = self.model(inputs, sizes_hw)
        # A multisample-dropout head returns K stacked outputs per input: one loss over all K.
        labels = labels.repeat(embeddings.shape[0] // labels.shape[0])
        return self.loss_fn(embeddings, labels, margin_rad)


def trains_backbone(model: EmbeddingModel, stage: StageConfig) -> bool:
    return trainable(stage, backbone(model).num_blocks).backbone


def stage_state(model: EmbeddingModel, loss_fn: ArcFace, stage: StageConfig) -> dict:
    state = {"head": model.head.state_dict(), "loss": loss_fn.state_dict()}
    if trains_backbone(model, stage):
        state["visual"] = model.visual.state_dict()
    return state


def apply_stage_resolution(cfg: ExperimentConfig, model: EmbeddingModel, preprocess: Preprocess,
                           stage: StageConfig) -> None:
    set_resolution(model, preprocess, stage.image_size_px or cfg.preprocess.image_size,
                   stage.patch_stride_px or backbone(model).default_patch_stride)


def load_stage_state(model: EmbeddingModel, loss_fn: ArcFace | None, state: dict) -> None:
    model.head.load_state_dict(state["head"])
    if loss_fn is not None:  # the export needs no class centres
        loss_fn.load_state_dict(state["loss"])
    if "visual" in state:
        model.visual.load_state_dict(state["visual"])


def run_stage(cfg: ExperimentConfig, stage: StageConfig, model: EmbeddingModel,
              preprocess: Preprocess, loss_fn: ArcFace, train_df: pd.DataFrame,
              evaluator: Evaluator | None, out_dir: Path, device: torch.device,
              resume: bool = True, cache_dir: Path | None = None) -> StageOutcome:
    stage_dir = Path(out_dir) / stage.name
    stage_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()  # max_hours counts the feature-cache build too
    if dist.is_main():
        save_config(cfg, stage_dir / "config.json")
    final_path, last_path = stage_dir / "final.pt", stage_dir / "last.pt"
    apply_stage_resolution(cfg, model, preprocess, stage)
    if evaluator is not None:
        evaluator.forget_features()  # the backbone or its input size may differ from last stage's
    if resume and final_path.exists():
        done = load_checkpoint(final_path)
        load_stage_state(model, loss_fn, done["model"])
        _drop_resume_state(last_path)  # a finished stage's optimizer state is dead weight
        _say(f"{stage.name}: complete, skipped ({final_path} holds its weights)")
        return StageOutcome("done", final_path, done["metrics"], done["history"])

    backbone_trains = trains_backbone(model, stage)
    from_cache = not backbone_trains and stage.use_feature_cache
    model.to(device)
    loss_fn.to(device)
    groups = param_groups(model, loss_fn, stage)
    optimizer = torch.optim.AdamW(groups, weight_decay=stage.weight_decay)
    ema = EMA([p for g in groups for p in g["params"]], stage.ema_decay) \
        if stage.ema_decay else None
    use_scaler, amp_dtype = amp_settings(stage.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    rank, world = dist.rank(), dist.world_size()
    if from_cache:
        cache = build_feature_cache(
            model, train_df, _cache_transforms(stage, preprocess),
            cache_key({"backbone": cfg.model, "preprocess": cfg.preprocess, "views":
                       stage.cache_views, "augment": stage.augment, "seed": cfg.seed,
                       "resolution": (stage.image_size_px, stage.patch_stride_px),
                       "backbone_trained_by": _earlier_backbone_stages(cfg, stage, model)},
                      train_df),
            cache_dir or feature_cache_dir(), stage.batch_size,
            cfg.data.num_workers, device)
        rows = np.flatnonzero(cache.valid)
        rank, world = 0, 1  # the head trains on rank 0 only: it takes seconds
        if not dist.is_main():
            dist.barrier()  # rank 0 trains the head; then its final.pt says whether it finished
            if not final_path.exists():
                return StageOutcome("paused", last_path, {}, [])
            done = load_checkpoint(final_path)
            load_stage_state(model, loss_fn, done["model"])
            return StageOutcome("done", final_path, done["metrics"], done["history"])
    else:
        rows = np.arange(len(train_df))
    order = BatchOrder(len(rows), stage.batch_size, cfg.seed, rank, world)
    total_batches = math.ceil(stage.epochs * len(rows) / order.global_batch_size())
    total_batches -= total_batches % stage.grad_accum  # end on an optimizer step
    total_steps = total_batches // stage.grad_accum
    warmup_steps = int(stage.warmup_epochs * len(rows) / order.global_batch_size()
                       / stage.grad_accum)
    batches_per_epoch = len(rows) / order.global_batch_size()
    eval_every = max(1, round(stage.eval_every_epochs * batches_per_epoch))

    # What fixes the data order: a checkpoint resumed under other values would silently
    # continue at the wrong position of a different order.
    order_key = {"rows": len(rows), "batch_size": stage.batch_size, "world": world,
                 "grad_accum": stage.grad_accum, "epochs": stage.epochs, "seed": cfg.seed}
    select_key = _selection_key(stage, evaluator)
    start, history, best = 0, [], None  # best: the evaluation point the stage keeps so far
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path)
        saved_key = ckpt.get("order", order_key)
        if saved_key != order_key:
            changed = {k: (saved_key.get(k), v) for k, v in order_key.items()
                       if saved_key.get(k) != v}
            raise ValueError(f"{last_path}: cannot resume, the data order changed since it was "
                             f"saved (was, now): {changed}; restore them or start the stage "
                             "again (delete the checkpoint)")
        load_stage_state(model, loss_fn, ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        start, history, best = ckpt["next_batch"], ckpt["history"], ckpt.get("best")
        _say(f"{stage.name}: resumed at batch {start} of {total_batches} (optimizer step "
             f"{start // stage.grad_accum}) from {last_path}")
    else:
        # The stage's randomness (dropout) must not depend on what ran before it, e.g. whether
        # the feature cache had to be built in this process.
        torch.manual_seed(cfg.seed * 1000 + sum(map(ord, stage.name)))

    step_module = TrainStep(model, loss_fn, from_cache)
    runner = step_module
    if world > 1:
        runner = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device] if device.type == "cuda" else None)
    def train_mode() -> None:
        # Frozen parts stay in eval: no BatchNorm statistics drift, no dropout on them.
        model.train()
        if not backbone_trains:
            model.visual.eval()
        if not any(g["name"] == "head" for g in groups):
            model.head.eval()
        # No BatchNorm statistics drift: frozen norms anywhere (a frozen BatchNorm head), and
        # every norm of the backbone, trained or not (why: guie.backbones).
        freeze_batchnorm(model)
        freeze_batchnorm(model.visual, statistics_of_trained=True)

    train_mode()

    def save(path: Path, next_batch: int, metrics: dict | None = None) -> None:
        if dist.is_main():
            state = {"model": stage_state(model, loss_fn, stage), "next_batch": next_batch,
                     "order": order_key, "best": best,
                     "history": history, "metrics": metrics or {}, "config": to_dict(cfg)}
            if path != final_path:  # a finished stage needs no optimizer (ViT-H AdamW: 5 GB)
                state.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                             rng=rng_state(), ema=ema.state_dict() if ema else None)
            save_checkpoint(state, path)
            pd.DataFrame(history).to_csv(stage_dir / "history.csv", index=False)

    batches = _batches(from_cache, cache if from_cache else None, rows, train_df, order, start,
                       total_batches, stage, preprocess, cfg.data.num_workers)
    bar = tqdm(total=total_batches, initial=start, desc=stage.name, dynamic_ncols=True,
               disable=not dist.is_main())
    b = start
    for b, (inputs, sizes_hw, labels) in enumerate(batches, start=start):
        step = b // stage.grad_accum
        margin = margin_at(stage, cfg.loss, b / batches_per_epoch)
        loss_value = float("nan")  # a batch whose every image was corrupt (already warned)
        weight = 1.0
        if not len(labels) and world > 1:
            # Under DDP every rank must take part in every backward's all-reduce: a
            # zero-weighted step on blank images stands in for the unreadable batch.
            inputs, labels, sizes_hw = _blank_batch(preprocess)
            weight = 0.0
        if len(labels):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = runner(inputs.to(device, non_blocking=True), labels.to(device), margin,
                              sizes_hw)
            scaler.scale(loss * weight / stage.grad_accum).backward()
            loss_value = loss.item() if weight else loss_value
        if (b + 1) % stage.grad_accum == 0:
            mult = lr_multiplier(step, total_steps, warmup_steps)
            for g in optimizer.param_groups:
                g["lr"] = g["initial_lr"] * mult
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
        first = optimizer.param_groups[0]
        row = {"stage": stage.name, "batch": b + 1, "epoch": (b + 1) / batches_per_epoch,
               "loss": loss_value, f"lr_{first['name']}": first["lr"], "margin_rad": margin}
        if evaluator is not None and (b + 1) % eval_every == 0 and b + 1 < total_batches \
                and dist.is_main():
            result = evaluator.evaluate(model, backbone_frozen=not backbone_trains)
            row.update(evaluation_row(result))
            best = _keep_if_best(best, select_key, row, result, b + 1, stage_dir,
                                 lambda: stage_state(model, loss_fn, stage))
            train_mode()
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}",
                        **{k.replace("map5", "mP@5"): f"{v:.3f}" for k, v in row.items()
                           if k.startswith("map5")})
        bar.update(1)
        at_step_end = (b + 1) % stage.grad_accum == 0
        if at_step_end and (b + 1) // stage.grad_accum % stage.checkpoint_every_steps == 0:
            save(last_path, b + 1)
        if at_step_end and stage.max_hours and _time_is_up(started, stage.max_hours, world,
                                                          device):
            save(last_path, b + 1)
            bar.close()
            if from_cache:
                dist.barrier()  # release the ranks waiting for the head stage
            return StageOutcome("paused", last_path, {}, history)
    bar.close()
    if ema is not None:
        ema.swap_in()
    metrics = {}
    if evaluator is not None and dist.is_main():
        metrics = evaluator.evaluate(model, backbone_frozen=not backbone_trains)
        history.append({"stage": stage.name, "batch": total_batches,
                        "epoch": total_batches / batches_per_epoch, **evaluation_row(metrics)})
        if select_key is not None:
            metrics = _select_best(best, select_key, metrics, total_batches, stage_dir,
                                   model, loss_fn, stage)
    save(final_path, total_batches, metrics)
    (stage_dir / BEST_WEIGHTS).unlink(missing_ok=True)  # final.pt holds the kept weights now
    if dist.is_main():
        # final.pt is what resume and the export read: last.pt's optimizer state (ViT-H AdamW:
        # ~5 GB) would only eat Kaggle's 20 GB output cap.
        _drop_resume_state(last_path)
        if backbone_trains:
            drop_superseded_backbones(cfg, stage, Path(out_dir), model)
    if from_cache:
        dist.barrier()
    return StageOutcome("done", final_path, metrics, history)


BEST_WEIGHTS = "best.pt"  # the best evaluation point's weights while a selecting stage runs


def _selection_key(stage: StageConfig, evaluator: Evaluator | None) -> str | None:
    """The history column `select_by` names (None: keep the last weights)."""
    if stage.select_by == "last":
        return None
    names = [name for name, _, _ in evaluator.sources] if evaluator is not None else []
    heldout = evaluator is not None and len(evaluator.query) > 0
    options = ["last", *(["heldout"] if heldout else []), *names]
    if stage.select_by == "heldout" and heldout:
        return "map5"
    if stage.select_by in names:
        return f"map5_{stage.select_by}"
    raise ValueError(f"{stage.name}.select_by={stage.select_by!r}: choose one of "
                     f"{', '.join(options)} (the evaluation sources are data.eval_sources)")


def _keep_if_best(best: dict | None, key: str | None, row: dict, result: dict, batch: int,
                  stage_dir: Path, weights) -> dict | None:
    """Save this evaluation point's weights (`weights()`) as best.pt if it beats the best so far."""
    if key is None or row.get(key) is None or (best is not None and row[key] <= best["figure"]):
        return best
    if dist.is_main():
        save_checkpoint({"model": weights()}, stage_dir / BEST_WEIGHTS)
    return {"figure": row[key], "batch": batch, "metrics": result}


def _select_best(best: dict | None, key: str, metrics: dict, total_batches: int,
                 stage_dir: Path, model: EmbeddingModel, loss_fn: nn.Module,
                 stage: StageConfig) -> dict:
    """The final metrics of a selecting stage: its last step's, unless an earlier evaluation
    point scored higher by `key`; then those weights are loaded back and kept."""
    final = evaluation_row(metrics).get(key)
    if best is None or final is None or final >= best["figure"]:
        return {**metrics, "selected": {"by": stage.select_by, "batch": total_batches,
                                        "figure": final}}
    load_stage_state(model, loss_fn, load_checkpoint(stage_dir / BEST_WEIGHTS)["model"])
    _say(f"{stage.name}: keeps batch {best['batch']} ({stage.select_by} mP@5 {best['figure']:.4f} "
         f"> {final:.4f} at the end)")
    return {**best["metrics"], "selected": {"by": stage.select_by, "batch": best["batch"],
                                            "figure": best["figure"]}}


def drop_superseded_backbones(cfg: ExperimentConfig, stage: StageConfig, out_dir: Path,
                              model: EmbeddingModel) -> None:
    """Once a backbone stage has finished, the backbone copies in earlier stages' final.pt are
    superseded (loading the stages in order overwrites them): rewrite those files without it.
    1st place's six backbone stages would otherwise leave six ViT-H copies (14 GB)."""
    names = [s.name for s in cfg.stages]
    for earlier in cfg.stages[:names.index(stage.name)] if stage.name in names else ():
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


def _say(message: str) -> None:
    """One line on rank 0: what a resumed run picked up or skipped (printed, so it lands in
    the Kaggle log and the executed notebook, not only in a progress bar)."""
    if dist.is_main():
        print(message, flush=True)


def _earlier_backbone_stages(cfg: ExperimentConfig, stage: StageConfig,
                             model: EmbeddingModel) -> list[dict]:
    """The stages before this one that changed the backbone: a cache built from the backbone
    before 1st place's backbone-only stage must not serve the head-only stage after it."""
    names = [s.name for s in cfg.stages]
    earlier = cfg.stages[:names.index(stage.name)] if stage.name in names else ()
    return [to_dict(s) for s in earlier if s.enabled and trains_backbone(model, s)]


def _cache_transforms(stage: StageConfig, preprocess: Preprocess) -> list:
    """View 0: the plain preprocessing; further views: the stage's augmentations."""
    extra = [TrainTransform(stage.augment, preprocess)] * (stage.cache_views - 1)
    return [EvalTransform(preprocess)] + extra


def _batches(from_cache, cache, rows, train_df, order, start, stop, stage, preprocess,
             num_workers):
    """(inputs, sizes_hw, labels) per micro-batch: cached features (the sizes are in them
    already: None), or decoded and augmented images with their sizes before the transform."""
    if from_cache:
        labels = torch.from_numpy(cache.labels)
        for b in range(start, stop):
            picks, seeds = order.batch(b)
            idx = rows[picks]
            views = seeds % cache.features.shape[0]
            feats = torch.from_numpy(np.asarray(cache.features[views, idx], dtype=np.float32))
            yield feats, None, labels[idx]
        return
    dataset = SeededDataset(ImageDataset(train_df.reset_index(drop=True),
                                         TrainTransform(stage.augment, preprocess)))
    loader = DataLoader(dataset, batch_sampler=BatchSampler(order, start, stop),
                        num_workers=num_workers, collate_fn=collate_skip_bad,
                        generator=torch.Generator(),  # keep the global RNG untouched
                        pin_memory=torch.cuda.is_available(),
                        persistent_workers=num_workers > 0)
    for batch in loader:
        yield batch.images, batch.sizes_hw, batch.labels


def _blank_batch(preprocess: Preprocess) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two black preprocessed images (two: a BatchNorm head rejects batches of one), label 0."""
    side = preprocess.image_size
    images = preprocess(torch.zeros(2, 3, side, side, dtype=torch.uint8))
    return images, torch.zeros(2, dtype=torch.int64), torch.full((2, 2), side)


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
