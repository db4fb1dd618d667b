"""The kit's pipeline as library calls: train the stages, export, evaluate, report.

The Kaggle notebooks and `submit.py local` call these same functions, so what is tested here is
what runs on Kaggle.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch

from guie.config import ExperimentConfig, save_config
from guie.data.preprocess import Preprocess
from guie.data.sources import Split, load_split
from guie.losses import ArcFace
from guie.model import EmbeddingModel, build_model
from guie.plots import plot_history
from guie.train import dist
from guie.train.checkpoint import load_checkpoint
from guie.train.evaluate import Evaluator
from guie.train.loop import load_stage_state, run_stage


@dataclass
class Session:
    cfg: ExperimentConfig
    split: Split
    model: EmbeddingModel
    preprocess: Preprocess
    loss_fn: ArcFace
    evaluator: Evaluator | None
    device: torch.device


def num_classes_of(cfg: ExperimentConfig, split: Split) -> int:
    top = int(split.train["label"].max()) + 1
    if cfg.num_classes and top > cfg.num_classes:
        raise ValueError(f"num_classes={cfg.num_classes} but the training labels reach {top - 1}")
    return cfg.num_classes or top


def prepare(cfg: ExperimentConfig) -> Session:
    _, _, device = dist.init()
    torch.manual_seed(cfg.seed)
    split = load_split(cfg.data)
    model, preprocess = build_model(cfg)
    loss_fn = ArcFace(cfg.model.embed_dim, num_classes_of(cfg, split), cfg.loss.scale,
                      cfg.loss.margin_rad, cfg.loss.subcenters)
    evaluator = None
    if len(split.query):
        evaluator = Evaluator(split.query, split.index, preprocess,
                              cfg.stage1.batch_size, cfg.data.num_workers, device)
    return Session(cfg, split, model.to(device), preprocess, loss_fn, evaluator, device)


def stages_of(cfg: ExperimentConfig) -> list:
    return [s for s in (cfg.stage1, cfg.stage2) if s.enabled]


def run_training(session: Session, out_dir: Path, resume: bool = True,
                 max_hours: float = 0.0) -> dict:
    """All enabled stages in order; returns {"status", "map5_<stage>", ...}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"status": "done"}
    started = time.monotonic()
    for stage in stages_of(session.cfg):
        if max_hours:
            left = max_hours - (time.monotonic() - started) / 3600
            stage = replace(stage, max_hours=max(left, 1e-6))
        outcome = run_stage(session.cfg, stage, session.model, session.preprocess,
                            session.loss_fn, session.split.train, session.evaluator, out_dir,
                            session.device, resume=resume)
        if outcome.status == "paused":
            report["status"] = "paused"
            report["paused_in"] = stage.name
            break
        if outcome.metrics:
            report[f"map5_{stage.name}"] = outcome.metrics["map5"]
            report[f"map5_{stage.name}_per_domain"] = outcome.metrics.get("map5_per_domain", {})
        report[f"checkpoint_{stage.name}"] = str(outcome.checkpoint)
    write_curves(out_dir)
    return report


def train(cfg: ExperimentConfig, out_dir: str, resume: bool = True,
          max_hours: float = 0.0) -> dict:
    """Train every enabled stage of `cfg` into `out_dir` (resuming what is there)."""
    return run_training(prepare(cfg), Path(out_dir), resume=resume, max_hours=max_hours)


def load_trained(cfg: ExperimentConfig, checkpoint: str | Path) -> tuple[EmbeddingModel,
                                                                         Preprocess]:
    """The model of a training output folder (its stages' final.pt in order) or of one .pt."""
    model, preprocess = build_model(cfg)
    path = Path(checkpoint)
    files = [path / s.name / "final.pt" for s in stages_of(cfg)] if path.is_dir() else [path]
    found = [f for f in files if f.exists()]
    if not found:
        raise FileNotFoundError(f"no finished stage checkpoint under {path} (looked for "
                                f"{', '.join(str(f) for f in files)})")
    for file in found:
        load_stage_state(model, None, load_checkpoint(file)["model"])
    return model.eval(), preprocess


def export_submission(cfg: ExperimentConfig, checkpoint: str, out_dir: str,
                      compat: str = "none") -> Path:
    """Export a trained model as `out_dir/submission.zip` after checking the contract."""
    model, preprocess = load_trained(cfg, checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    compat = compat if compat != "none" else cfg.export.compat
    if compat == "torch1.11":
        from guie.export_compat import export_compat_submission_zip as export_fn
    elif compat == "none":
        from guie.export import export_submission_zip as export_fn
    else:
        raise ValueError(f"export.compat: unknown mode {compat!r} (none, torch1.11)")
    zip_path = export_fn(model, preprocess, out, fp16_weights=cfg.export.fp16_weights)
    save_config(replace(cfg, export=replace(cfg.export, compat=compat)), out / "export-config.json")
    return zip_path


def run_local(cfg: ExperimentConfig, out_dir: str, resume: bool = False,
              compat: str = "none") -> dict:
    """The whole path on this machine: untrained eval, stages, export, eval through the export."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    session = prepare(cfg)
    save_config(session.cfg, out / "config.json")
    report: dict = {"experiment": cfg.name, "data": {
        "train_images": len(session.split.train),
        "train_classes": int(session.split.train["label"].nunique()),
        "queries": len(session.split.query), "index_images": len(session.split.index)}}
    if session.evaluator is None:
        raise ValueError("run_local needs held-out queries: set data.heldout_classes > 0")
    untrained = session.evaluator.evaluate(session.model, backbone_frozen=True)
    report["map5_untrained"] = untrained["map5"]
    report["map5_untrained_per_domain"] = untrained["map5_per_domain"]
    report.update(run_training(session, out, resume=resume))
    if report["status"] != "done":
        return _write_report(out, report)
    zip_path = export_submission(session.cfg, str(out), str(out), compat=compat)
    exported = torch.jit.load(str(out / "saved_model.pt"))
    result = session.evaluator.evaluate_exported(exported)
    report["map5_export"] = result["map5"]
    report["map5_export_per_domain"] = result["map5_per_domain"]
    report["submission_zip"] = str(zip_path)
    report["submission_mb"] = round(zip_path.stat().st_size / 2**20, 2)
    return _write_report(out, report)


def _write_report(out: Path, report: dict) -> dict:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def write_curves(out_dir: Path) -> None:
    """All stages' histories as one CSV and one PNG (loss and mP@5 against epochs)."""
    frames = [pd.read_csv(f) for f in sorted(out_dir.glob("*/history.csv"))]
    if not frames:
        return
    history = pd.concat(frames, ignore_index=True)
    history.to_csv(out_dir / "curves.csv", index=False)
    plot_history(history, out_dir / "curves.png")
