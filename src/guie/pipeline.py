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
import torch.nn.functional as F

from guie.config import DataConfig, ExperimentConfig, StageConfig, load_config, save_config
from guie.data.augment import EvalTransform
from guie.data.preprocess import Preprocess
from guie.data.sources import Split, load_split
from guie.losses import ArcFace, build_loss, class_margins_from_counts
from guie.model import EmbeddingModel, IdentityHead, LinearHead, build_model, head_output_dim
from guie.plots import plot_history
from guie.reduction import fit_reduction, fold_into_linear
from guie.train import dist
from guie.train.averaging import average_into
from guie.train.checkpoint import load_checkpoint
from guie.train.evaluate import Evaluator
from guie.train.features import compute_features
from guie.train.loop import apply_stage_resolution, load_stage_state, run_stage

SUBMISSION_DIM = 64  # what the competition's host accepts


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


def load_experiment_split(cfg: DataConfig) -> tuple[Split, list[str] | None]:
    """The data split of an experiment: on the kit's sample set whole source photos are held
    out (`guie.data.sample.photo_split`), on real data `load_split`'s held-out classes."""
    if cfg.sample_instances > 0:
        from guie.data.sample import load_sample_split
        return load_sample_split(cfg)
    return load_split(cfg), None


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
        raise ValueError(f"num_classes={cfg.num_classes} but the training labels reach {top - 1}")
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


def stages_of(cfg: ExperimentConfig) -> list[StageConfig]:
    return [s for s in cfg.stages if s.enabled]


def run_training(session: Session, out_dir: Path, resume: bool = True,
                 max_hours: float = 0.0) -> dict:
    """All enabled stages in order; returns {"status", "map5_<stage>", ...}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main():  # what `export.concat` and `export.soup` read back
        save_config(session.cfg, out_dir / "config.json")
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
        if "map5" in outcome.metrics:
            report[f"map5_{stage.name}"] = outcome.metrics["map5"]
            report[f"map5_{stage.name}_per_domain"] = outcome.metrics.get("map5_per_domain", {})
        if "sources" in outcome.metrics:  # the evaluation sources, per domain
            report[f"eval_{stage.name}"] = outcome.metrics["sources"]
        report[f"checkpoint_{stage.name}"] = str(outcome.checkpoint)
    write_curves(out_dir)
    return report


def train(cfg: ExperimentConfig, out_dir: str, resume: bool = True,
          max_hours: float = 0.0) -> dict:
    """Train every enabled stage of `cfg` into `out_dir` (resuming what is there)."""
    return run_training(prepare(cfg), Path(out_dir), resume=resume, max_hours=max_hours)


def load_trained(cfg: ExperimentConfig, checkpoint: str | Path) -> tuple[EmbeddingModel,
                                                                         Preprocess]:
    """The model of a training output folder (its stages' final.pt in order) or of one .pt.

    Each stage's input size is applied before its weights load, as in training. A config without
    stages (the no-training recipe) gives the pretrained model.
    """
    model, preprocess = build_model(cfg)
    stages = stages_of(cfg)
    if not stages:
        return model.eval(), preprocess
    path = Path(checkpoint)
    if path.is_dir():
        files = [(s, path / s.name / "final.pt") for s in stages]
    else:  # one stage's file: that stage's input size (its folder's name), else the last's
        stage = next((s for s in stages if s.name == path.parent.name), stages[-1])
        files = [(stage, path)]
    found = [(s, f) for s, f in files if f.exists()]
    if not found:
        raise FileNotFoundError(f"no finished stage checkpoint under {path} (looked for "
                                f"{', '.join(str(f) for _, f in files)})")
    for stage, file in found:
        apply_stage_resolution(cfg, model, preprocess, stage)
        load_stage_state(model, None, load_checkpoint(file)["model"])
    return model.eval(), preprocess


def export_submission(cfg: ExperimentConfig, checkpoint: str, out_dir: str,
                      compat: str = "none") -> Path:
    """Export a trained model as `out_dir/submission.zip` after checking the contract.

    Soup ingredients (`export.soup`) are averaged in, then the reduction is fitted and folded.
    With `export.concat` the other runs' models join this one side by side (`export_concat`).
    """
    model, preprocess = load_souped(cfg, checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    compat = compat if compat != "none" else cfg.export.compat
    if compat not in ("none", "torch1.11"):
        raise ValueError(f"export.compat: unknown mode {compat!r} (none, torch1.11)")
    if cfg.export.concat:
        zip_path = export_concat(cfg, (model, preprocess), out, compat)
    else:
        zip_path = _export_one(cfg, model, preprocess, out, compat)
    save_config(replace(cfg, export=replace(cfg.export, compat=compat)), out / "export-config.json")
    return zip_path


def _export_one(cfg: ExperimentConfig, model: EmbeddingModel, preprocess: Preprocess,
                out: Path, compat: str) -> Path:
    reduction = fit_export_reduction(cfg, model, preprocess)
    out_dim = model.head.fold().out_features if reduction is None else cfg.export.reduction_dim
    _check_submission_dim(out_dim)
    if compat == "torch1.11":
        if cfg.export.tta:
            raise ValueError(f"export.tta={list(cfg.export.tta)}: the torch1.11 export does not "
                             "support test-time views; export with compat=none or tta=[]")
        from guie.export_compat import export_compat_submission_zip
        if reduction is not None:
            model = replace_head_with_linear(model, reduction)
        return export_compat_submission_zip(model, preprocess, out,
                                            fp16_weights=cfg.export.fp16_weights)
    from guie.export import export_submission_zip
    return export_submission_zip(model, preprocess, out, fp16_weights=cfg.export.fp16_weights,
                                 reduction=reduction, tta=cfg.export.tta)


def _check_submission_dim(out_dim: int) -> None:
    if out_dim != SUBMISSION_DIM:
        raise ValueError(f"export: the embeddings are {out_dim}-d but the competition takes "
                         f"{SUBMISSION_DIM}: set export.reduction (pca, whiten, avg_pool) with "
                         f"reduction_dim={SUBMISSION_DIM}, or model.embed_dim={SUBMISSION_DIM}")


def load_souped(cfg: ExperimentConfig, checkpoint: str | Path) -> tuple[EmbeddingModel,
                                                                        Preprocess]:
    """`load_trained`, with the weights of the `export.soup` runs averaged in."""
    model, preprocess = load_trained(cfg, checkpoint)
    if cfg.export.soup:
        average_into(model, [load_trained(cfg, run)[0] for run in cfg.export.soup])
    return model, preprocess


def run_config(run_dir: str | Path) -> ExperimentConfig:
    """The resolved config a training output folder was trained with."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.json; expected a training output folder "
                                "(`submit.py train --out` or `local --out`)")
    return load_config(path)


def export_concat(cfg: ExperimentConfig, first: tuple[EmbeddingModel, Preprocess], out: Path,
                  compat: str) -> Path:
    """4th place: this run's model beside each `export.concat` run's (each with its own config,
    input size and soup), their unit embeddings concatenated and reduced to 64 by
    `export.reduction` fitted on the concatenation. `export.tta` and `fp16_weights` apply to
    every tower."""
    if compat != "none":
        raise ValueError("export.concat: the torch1.11 export holds one backbone; export with "
                         "compat=none or concat=[]")
    towers = [first]
    for run in cfg.export.concat:
        towers.append(load_souped(run_config(run), run))
    reduction = fit_concat_reduction(cfg, towers)
    width = sum(model.head.fold().out_features for model, _ in towers)
    _check_submission_dim(width if reduction is None else cfg.export.reduction_dim)
    from guie.export import export_concat_submission_zip
    return export_concat_submission_zip(towers, out, reduction, cfg.export.fp16_weights,
                                        cfg.export.tta)


def reduction_sample(cfg: ExperimentConfig) -> pd.DataFrame:
    """The training images a reduction is fitted on (the same ones for a given seed)."""
    train = load_experiment_split(cfg.data)[0].train
    return train.sample(min(len(train), cfg.export.reduction_images),
                        random_state=cfg.seed).reset_index(drop=True)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fit_export_reduction(cfg: ExperimentConfig, model: EmbeddingModel,
                         preprocess: Preprocess) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(W, b) of `export.reduction`, fitted on the head's outputs for up to `reduction_images`
    training images, or None."""
    kind, dim = cfg.export.reduction, cfg.export.reduction_dim
    if kind == "none":
        return None
    in_dim = model.head.fold().out_features
    if kind == "avg_pool":
        return fit_reduction(kind, dim, input_dim=in_dim)
    outputs, ok = _head_outputs(cfg, model, preprocess, reduction_sample(cfg),
                                f"export.reduction={kind} features")
    return fit_reduction(kind, dim, outputs[ok])


def fit_concat_reduction(cfg: ExperimentConfig, towers: list[tuple[EmbeddingModel, Preprocess]]
                         ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(W, b) of `export.reduction` over the towers' concatenated unit embeddings of the same
    training images (those every tower could read), or None."""
    kind, dim = cfg.export.reduction, cfg.export.reduction_dim
    if kind == "none":
        return None
    if kind == "avg_pool":
        width = sum(model.head.fold().out_features for model, _ in towers)
        return fit_reduction(kind, dim, input_dim=width)
    images = reduction_sample(cfg)
    parts, all_ok = [], torch.ones(len(images), dtype=torch.bool)
    for i, (model, preprocess) in enumerate(towers):
        outputs, ok = _head_outputs(cfg, model, preprocess, images,
                                    f"export.concat tower {i} features")
        parts.append(F.normalize(outputs, dim=-1))  # each tower's unit embedding
        all_ok &= ok
    return fit_reduction(kind, dim, torch.cat(parts, dim=1)[all_ok])


def _head_outputs(cfg: ExperimentConfig, model: EmbeddingModel, preprocess: Preprocess,
                  images: pd.DataFrame, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's float32 outputs before the L2 norm [N, D] and the readable rows [N]; the
    backbone runs on the GPU if there is one, the model ends on the CPU in eval mode."""
    feats, ok = compute_features(model, images, EvalTransform(preprocess), 64,
                                 cfg.data.num_workers, _device(), desc)
    model.cpu().eval()
    with torch.no_grad():
        return model.head(feats.to(model.head_dtype())).float(), ok


def replace_head_with_linear(model: EmbeddingModel,
                             reduction: tuple[torch.Tensor, torch.Tensor]) -> EmbeddingModel:
    """The model with its head and the reduction as one Linear: what `export_compat` mirrors."""
    linear = fold_into_linear(model.head.fold(), *reduction)
    head = LinearHead(linear.in_features, linear.out_features, 0.0)
    head.linear = linear
    return EmbeddingModel(model.visual, head, model.feature_dim,
                          aspect_features=model.aspect_features).eval()


def score_untrained(session: Session) -> dict:
    """The report's opening: the data split and the mP@5 of the model before any training."""
    if session.evaluator is None:
        raise ValueError(f"config {session.cfg.name!r} holds out no classes: nothing to score "
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
              "map5_untrained": untrained["map5"],
              "map5_untrained_per_domain": untrained["map5_per_domain"],
              **({"eval_untrained": untrained["sources"]} if "sources" in untrained else {})}
    report.update(score_pca(session))
    return report


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
    identity = EmbeddingModel(base.visual, IdentityHead(base.feature_dim), base.feature_dim)
    reduced = replace_head_with_linear(
        identity, fit_export_reduction(pca_cfg, identity, session.preprocess))
    # The evaluator's cached features are this very backbone's: only the head differs.
    result = session.evaluator.evaluate(reduced.to(session.device), backbone_frozen=True)
    base.to(session.device)  # the fit leaves the shared backbone on the CPU
    return {"map5_pca": result["map5"], "map5_pca_per_domain": result["map5_per_domain"]}


def score_export(session: Session, out: Path) -> dict:
    """mP@5 through the reloaded `out/saved_model.pt`, fed as the host feeds it."""
    result = session.evaluator.evaluate_exported(torch.jit.load(str(out / "saved_model.pt")))
    zip_path = out / "submission.zip"
    return {"map5_export": result["map5"], "map5_export_per_domain": result["map5_per_domain"],
            "submission_zip": str(zip_path),
            "submission_mb": round(zip_path.stat().st_size / 2**20, 2)}


def run_local(cfg: ExperimentConfig, out_dir: str, resume: bool = False,
              compat: str = "none") -> dict:
    """The whole path on this machine: untrained eval, stages, export, eval through the export."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    session = prepare(cfg)
    report = score_untrained(session)
    report.update(run_training(session, out, resume=resume))
    if report["status"] == "done":
        export_submission(session.cfg, str(out), str(out), compat=compat)
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
    plot_history(history, out_dir / "curves.png")
