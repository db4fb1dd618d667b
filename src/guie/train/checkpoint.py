"""Atomic checkpoints that carry everything a resumed run needs to end where it would have."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from guie.errors import UserValueError


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write to a temporary file then rename: a crash mid-write never leaves a torn checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a torn or foreign file: say which
        raise UserValueError(f"{path}: not a readable checkpoint ({e})") from e


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_stage_state(model, loss_fn, state: dict) -> None:
    """Load a stage checkpoint's "model" entry: head, class centres (skipped with `loss_fn`
    None: the export needs none) and, where the stage trained it, the backbone."""
    model.head.load_state_dict(state["head"])
    if loss_fn is not None:
        loss_fn.load_state_dict(state["loss"])
    if "visual" in state:
        model.visual.load_state_dict(state["visual"])


# What a checkpoint holds beyond its tensors (config, history, pickle framing, per-tensor
# records): measured on smoke runs at 30-80 KB; a generous bound keeps the prediction an
# upper estimate without mattering next to gigabytes of weights.
CHECKPOINT_OVERHEAD_BYTES = 256 * 1024
# config.json, guie-run.json, history.csv, curves: small files of a training output folder.
OUTPUT_OVERHEAD_BYTES = 1024 * 1024


@dataclass(frozen=True)
class StageFiles:
    """Predicted bytes of one stage's checkpoints."""

    name: str
    final_pt: int  # stays in the output once the stage has finished
    last_pt: int  # while the stage runs (weights + optimizer, scaler, RNG, EMA); deleted at its end


@dataclass(frozen=True)
class OutputSize:
    """Predicted size of a training output folder (`guie.pipeline.train`'s out_dir)."""

    stages: tuple[StageFiles, ...]
    end_bytes: int  # after every stage finished: the final.pt files + small files
    peak_bytes: int  # the most at any moment: while a checkpoint is being written

    def fits(self, cap_bytes: int) -> bool:
        return self.peak_bytes <= cap_bytes


def predict_output_bytes(cfg, num_classes: int = 0) -> OutputSize:
    """Bytes of the training output folder `cfg` produces, from parameter counts and dtypes,
    without building real weights (the model is built on the meta device) or writing anything.

    Per stage: `final.pt` holds the head, the loss's class centres and, if the stage trains any
    backbone layer, the whole backbone; `last.pt` holds the same plus AdamW's two moments of
    every trained parameter (and an EMA copy of them with `ema_decay`). `last.pt` is replaced
    atomically (a .tmp beside the old file), so its peak is two copies; at the stage's end
    final.pt is written beside it, then last.pt is deleted. Finished stages' final.pt stay,
    without the backbone once a later stage has saved a newer one.
    `num_classes` defaults to `cfg.num_classes` (one of them is needed: the class centres are
    often the head stage's largest tensor)."""
    from guie.losses import build_loss
    from guie.model import apply_stage_resolution, build_model, head_output_dim
    from guie.train.optim import param_groups, trains_backbone

    classes = num_classes or cfg.num_classes
    if classes <= 0:
        raise UserValueError(f"config {cfg.name!r}: num_classes is 0 (inferred from the data); "
                             "pass num_classes to predict the class centres' size")
    meta_cfg = replace(cfg, model=replace(cfg.model, pretrained_path="", grad_checkpointing=False))
    with torch.device("meta"):
        model, preprocess = build_model(meta_cfg)
        loss_fn = build_loss(cfg.loss, head_output_dim(cfg.model, model.feature_dim), classes)
    stages, existing, peak = [], 0, 0
    backbone_files: list[str] = []  # stages whose final.pt holds a backbone copy
    for stage in (s for s in cfg.stages if s.enabled):
        apply_stage_resolution(meta_cfg, model, preprocess, stage)
        weights = _bytes(model.head.state_dict()) + _bytes(loss_fn.state_dict())
        if trains_backbone(model, stage):
            weights += _bytes(model.visual.state_dict())
        trained = [p for g in param_groups(model, loss_fn, stage) for p in g["params"]]
        moments = 2 * sum(p.numel() * p.element_size() for p in trained)
        ema = sum(p.numel() * p.element_size() for p in trained) if stage.ema_decay else 0
        final = weights + CHECKPOINT_OVERHEAD_BYTES
        last = weights + moments + ema + CHECKPOINT_OVERHEAD_BYTES
        stages.append(StageFiles(stage.name, final, last))
        peak = max(peak, existing + max(2 * last, last + final))
        if trains_backbone(model, stage):
            # `drop_superseded_backbones`: earlier stages' backbone copies go once this ends.
            visual = _bytes(model.visual.state_dict())
            existing -= visual * len(backbone_files)
            backbone_files[:] = [stage.name]
        existing += final
    return OutputSize(tuple(stages), existing + OUTPUT_OVERHEAD_BYTES,
                      max(peak, existing) + OUTPUT_OVERHEAD_BYTES)


def _bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
