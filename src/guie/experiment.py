"""What an experiment config resolves to before anything trains: its data split and its stages.

Shared by the pipeline (training, scoring) and the export (the reduction's fit, the trained
model's checkpoints), which must read the same split and stages.
"""
from __future__ import annotations

from guie.config import DataConfig, ExperimentConfig, StageConfig
from guie.data.sources import Split, load_split


def load_experiment_split(cfg: DataConfig) -> tuple[Split, list[str] | None]:
    """The data split of an experiment: on the kit's sample set whole source photos are held
    out (`guie.data.sample_split.photo_split`), on real data `load_split`'s held-out classes."""
    if cfg.sample_instances > 0:
        from guie.data.sample_split import load_sample_split
        return load_sample_split(cfg)
    return load_split(cfg), None


def stages_of(cfg: ExperimentConfig) -> list[StageConfig]:
    """The enabled stages, in training order."""
    return [s for s in cfg.stages if s.enabled]
