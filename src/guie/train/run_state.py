"""What one training run and one stage under way hold (`guie.train.loop` drives them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from guie.config import ExperimentConfig, StageConfig
from guie.data.preprocess import Preprocess
from guie.losses import ArcFace
from guie.model import EmbeddingModel
from guie.train.evaluate import Evaluator
from guie.train.features import FeatureCache
from guie.train.optim import trains_backbone
from guie.train.order import BatchOrder
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
    world: int  # the ranks training the stage (all of them, a cached head stage too)
    cache: FeatureCache | None
    rows: np.ndarray  # the training rows the stage draws from
    order: BatchOrder
    total_batches: int  # micro-batches per rank, a whole number of optimizer steps
    batches_per_epoch: float
    eval_every_steps: int  # optimizer steps between evaluation points
    # What fixes the data order: a checkpoint resumed under other values would silently
    # continue at the wrong position of a different order. Samples per optimizer step, not
    # ranks or grad_accum: 2 ranks x accum 2 and 1 rank x accum 4 walk the same sequence.
    order_key: dict
    select_key: str | None
    next_batch: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict | None = None  # the evaluation point the stage keeps so far

    @property
    def stage_dir(self) -> Path:
        return Path(self.ctx.out_dir) / self.stage.name

    @property
    def samples_per_step(self) -> int:
        return self.order.global_batch_size() * self.stage.grad_accum


def stage_state(model: EmbeddingModel, loss_fn: ArcFace, stage: StageConfig) -> dict:
    """A stage checkpoint's "model" entry: head, class centres and, where the stage trains
    it, the backbone (full weights whatever the parallelism: the plain model's)."""
    state = {"head": model.head.state_dict(), "loss": loss_fn.state_dict()}
    if trains_backbone(model, stage):
        state["visual"] = model.visual.state_dict()
    return state
