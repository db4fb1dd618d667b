"""The kit's pipeline as library calls: train the stages, export, evaluate, report.

The Kaggle notebooks and `submit.py local` call these same functions, so what is tested here is
what runs on Kaggle.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from guie.config import DataConfig, ExperimentConfig, save_config
from guie.data.preprocess import Preprocess
from guie.data.sources import Split
from guie.errors import UserValueError
from guie.experiment import load_experiment_split, stages_of
from guie.export.build import (SUBMISSION_DIM, export_submission, fit_export_reduction,
                               replace_head_with_linear)
from guie.losses import ArcFace, build_loss, class_margins_from_counts
from guie.model import EmbeddingModel, IdentityHead, build_model, head_output_dim
from guie.plots import plot_training_curves
from guie.train import dist
from guie.train.evaluate import Evaluator, stage_report
from guie.train.loop import TrainContext, run_stage


@dataclass
class Session:
    cfg: ExperimentConfig
    split: Split
    model: EmbeddingModel
    preprocess: Preprocess
    loss_fn: ArcFace
    evaluator: Evaluator | None
    device: torch.device
    heldout_photos: list[str] | None = None  # the sample set's held-out source photos

    def train_context(self, out_dir: Path) -> TrainContext:
        return TrainContext(self.cfg, self.model, self.preprocess, self.loss_fn,
                            self.split.train, self.evaluator, out_dir, self.device)


def eval_source_rows(cfg: DataConfig, train: pd.DataFrame) -> tuple:
    """(name, rows, duplicates dropped) of each evaluation source, minus any image whose bytes
    are also in the training rows: never trained on, never in the label space."""
    from guie.data.eval_sources import drop_training_duplicates, load_eval_source

    sources = []
    for src in cfg.eval_sources:
        rows, dropped = drop_training_duplicates(load_eval_source(src, cfg.root), train)
        sources.append((src.name, rows, dropped))
    return tuple(sources)


def num_classes_of(cfg: ExperimentConfig, split: Split) -> int:
    top = int(split.train["label"].max()) + 1
    if cfg.num_classes and top > cfg.num_classes:
        raise UserValueError(f"num_classes={cfg.num_classes} but the training labels reach "
                             f"{top - 1}")
    return cfg.num_classes or top


def prepare(cfg: ExperimentConfig) -> Session:
    _, _, device = dist.init()
    torch.manual_seed(cfg.seed)
    split, heldout_photos = load_experiment_split(cfg.data)
    model, preprocess = build_model(cfg)
    num_classes = num_classes_of(cfg, split)
    loss_fn = build_loss(cfg.loss, head_output_dim(cfg.model, model.feature_dim), num_classes)
    if cfg.loss.class_margins:
        counts = np.bincount(split.train["label"].to_numpy(), minlength=num_classes)
        loss_fn.set_class_margins(class_margins_from_counts(
            counts, cfg.loss.class_margin_min_rad, cfg.loss.class_margin_max_rad))
    evaluator = None
    sources = eval_source_rows(cfg.data, split.train)
    if len(split.query) or sources:
        batch_size = cfg.stages[0].batch_size if cfg.stages else 64
        evaluator = Evaluator(split.query, split.index, preprocess, batch_size,
                              cfg.data.num_workers, device, sources)
    return Session(cfg, split, model.to(device), preprocess, loss_fn, evaluator, device,
                   heldout_photos)


def run_training(session: Session, out_dir: Path, resume: bool = True) -> dict:
    """All enabled stages in order, within the config's `max_hours` (all stages together);
    returns {"status", "map5_<stage>", ...}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main():  # what `export.concat` and `export.soup` read back
        save_config(session.cfg, out_dir / "config.json")
    report: dict = {"status": "done"}
    started = time.monotonic()
    context = session.train_context(out_dir)
    max_hours = session.cfg.max_hours
    for stage in stages_of(session.cfg):
        if max_hours:
            left = max(max_hours - (time.monotonic() - started) / 3600, 1e-6)
            # The stricter of what the session has left and the stage's own limit.
            stage = replace(stage, max_hours=min(left, stage.max_hours or left))
        outcome = run_stage(context, stage, resume=resume)
        if outcome.status == "paused":
            report["status"] = "paused"
            report["paused_in"] = stage.name
            break
        report.update(stage_report(stage.name, outcome.metrics))
        # Steps the grad scaler (or a non-finite norm) skipped: 0 on a healthy run.
        report[f"skipped_steps_{stage.name}"] = outcome.skipped_steps
        report[f"checkpoint_{stage.name}"] = str(outcome.checkpoint)
    write_curves(out_dir)
    return report


def train(cfg: ExperimentConfig, out_dir: str, resume: bool = True) -> dict:
    """Train every enabled stage of `cfg` into `out_dir` (resuming what is there), stopping
    cleanly at the config's `max_hours`."""
    return run_training(prepare(cfg), Path(out_dir), resume=resume)


def score_untrained(session: Session) -> dict:
    """The report's opening: the data split and the mP@5 of the model before any training."""
    if session.evaluator is None:
        raise UserValueError(f"config {session.cfg.name!r} holds out no classes: nothing to score "
                             "locally (set data.heldout_classes > 0)")
    split = session.split
    print(f"scoring the untrained model first ({len(split.query)} held-out queries): the "
          "baseline every stage must beat", flush=True)
    untrained = session.evaluator.evaluate(session.model, backbone_frozen=True)
    data = {"train_images": len(split.train),
            "train_classes": int(split.train["label"].nunique()),
            "queries": len(split.query), "index_images": len(split.index)}
    if session.heldout_photos is not None:
        data["heldout_photos"] = session.heldout_photos
    report = {"experiment": session.cfg.name, "data": data,
              **stage_report("untrained", untrained)}
    report.update(score_features(session))
    report.update(score_pca(session))
    return report


def score_features(session: Session) -> dict:
    """`map5_features`: the backbone's own features at their full width (cosine, no head): how
    far a frozen backbone's 64-d head starts below what its features hold. A stage-1 head is a
    linear map of these very features, so a gain above this figure has to come from a better
    metric learned from the training classes, not from dimensions recovered. Empty where the
    model takes aspect-ratio features (they are not the backbone's)."""
    if session.model.aspect_features:
        return {}
    # The evaluator's cached features are this very backbone's: only the head differs.
    result = session.evaluator.evaluate(_without_head(session.model).to(session.device),
                                        backbone_frozen=True)
    return _heldout_report("features", result)


def score_pca(session: Session) -> dict:
    """`map5_pca`: the no-training recipe's figure (`--config pca`) for this backbone: its
    untrained features, PCA to 64 fitted on `export.reduction_images` training images and
    folded into one Linear by the export's own functions. The bar a trained head must clear.
    Empty where it does not apply (aspect-ratio features, or features under 64-d)."""
    cfg, base = session.cfg, session.model
    if base.aspect_features or base.feature_dim < SUBMISSION_DIM:
        return {}
    pca_cfg = replace(cfg, model=replace(cfg.model, head="identity"),
                      export=replace(cfg.export, reduction="pca", reduction_dim=SUBMISSION_DIM))
    identity = _without_head(base)
    reduced = replace_head_with_linear(
        identity, fit_export_reduction(pca_cfg, identity, session.preprocess))
    # The evaluator's cached features are this very backbone's: only the head differs.
    result = session.evaluator.evaluate(reduced.to(session.device), backbone_frozen=True)
    base.to(session.device)  # the fit leaves the shared backbone on the CPU
    return _heldout_report("pca", result)


def _without_head(model: EmbeddingModel) -> EmbeddingModel:
    """The same backbone with an identity head: its features as the embedding."""
    return EmbeddingModel(model.visual, IdentityHead(model.feature_dim), model.feature_dim)


def _heldout_report(name: str, result: dict) -> dict:
    """`map5_<name>` and its per-domain figures only (a reference figure: its evaluation
    sources are not reported)."""
    return stage_report(name, {"map5": result["map5"],
                               "map5_per_domain": result["map5_per_domain"]})


def score_export(session: Session, out: Path) -> dict:
    """mP@5 through the reloaded `out/saved_model.pt`, fed as the host feeds it."""
    result = session.evaluator.evaluate_exported(torch.jit.load(str(out / "saved_model.pt")))
    zip_path = out / "submission.zip"
    return {**_heldout_report("export", result), "submission_zip": str(zip_path),
            "submission_mb": round(zip_path.stat().st_size / 2**20, 2)}


def run_local(cfg: ExperimentConfig, out_dir: str, resume: bool = False) -> dict:
    """The whole path on this machine: untrained eval, stages, export, eval through the export."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    session = prepare(cfg)
    report = score_untrained(session)
    report.update(run_training(session, out, resume=resume))
    if report["status"] == "done":
        export_submission(session.cfg, str(out), str(out))
        report.update(score_export(session, out))
    return write_report(out, report)


def write_report(out: Path, report: dict) -> dict:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def write_curves(out_dir: Path) -> None:
    """All stages' histories as one CSV and one PNG (loss and mP@5 against epochs)."""
    frames = [pd.read_csv(f) for f in sorted(out_dir.glob("*/history.csv"))]
    if not frames:
        return
    history = pd.concat(frames, ignore_index=True)
    history.to_csv(out_dir / "curves.csv", index=False)
    plot_training_curves(history, out_dir / "curves.png")
