"""From a training output folder to `submission.zip`: the trained model's weights, souped with
`export.soup`, reduced to 64 by `export.reduction` (fitted on training images), beside the
`export.concat` runs' models where set, then scripted (`guie.export.script`) or rebuilt for
PyTorch 1.11 (`guie.export.compat`).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from guie.config import ExperimentConfig, load_config, save_config
from guie.data.augment import EvalTransform
from guie.data.preprocess import Preprocess
from guie.errors import UserValueError
from guie.experiment import load_experiment_split, stages_of
from guie.export.compat import export_compat_submission_zip
from guie.export.script import export_concat_submission_zip, export_submission_zip
from guie.model import EmbeddingModel, LinearHead, apply_stage_resolution, build_model
from guie.reduction import fit_reduction, fold_into_linear
from guie.train.averaging import average_into
from guie.train.checkpoint import load_checkpoint, load_stage_state
from guie.train.features import compute_features

SUBMISSION_DIM = 64  # what the competition's host accepts


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
                      compat: str | None = None) -> Path:
    """Export a trained model as `out_dir/submission.zip` after checking the contract.

    Soup ingredients (`export.soup`) are averaged in, then the reduction is fitted and folded.
    With `export.concat` the other runs' models join this one side by side (`export_concat`).
    """
    model, preprocess = load_souped(cfg, checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The config's export.compat (the command line's --compat sets it); `compat`, given, is a
    # library caller's mode for this export, "none" included.
    compat = cfg.export.compat if compat is None else compat
    if compat not in ("none", "torch1.11"):
        raise UserValueError(f"export.compat: unknown mode {compat!r} (none, torch1.11)")
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
            raise UserValueError(f"export.tta={list(cfg.export.tta)}: the torch1.11 export does "
                                 "not support test-time views; export with compat=none or tta=[]")
        if reduction is not None:
            model = replace_head_with_linear(model, reduction)
        return export_compat_submission_zip(model, preprocess, out,
                                            fp16_weights=cfg.export.fp16_weights)
    return export_submission_zip(model, preprocess, out, fp16_weights=cfg.export.fp16_weights,
                                 reduction=reduction, tta=cfg.export.tta)


def _check_submission_dim(out_dim: int) -> None:
    if out_dim != SUBMISSION_DIM:
        raise UserValueError(f"export: the embeddings are {out_dim}-d but the competition takes "
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
        raise UserValueError("export.concat: the torch1.11 export holds one backbone; export with "
                             "compat=none or concat=[]")
    towers = [first]
    for run in cfg.export.concat:
        towers.append(load_souped(run_config(run), run))
    reduction = fit_concat_reduction(cfg, towers)
    width = sum(model.head.fold().out_features for model, _ in towers)
    _check_submission_dim(width if reduction is None else cfg.export.reduction_dim)
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
    """The model with its head and the reduction as one Linear (what `guie.export.compat`
    rebuilds)."""
    linear = fold_into_linear(model.head.fold(), *reduction)
    head = LinearHead(linear.in_features, linear.out_features, 0.0)
    head.linear = linear
    return EmbeddingModel(model.visual, head, model.feature_dim,
                          aspect_features=model.aspect_features).eval()
