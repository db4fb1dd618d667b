"""The memory half of the preflight gate `push` and `run` pass before anything is sent:
`memory_refusals(cfg, machine_shape, workdir)` names every stage whose plan does not fit the
machine's GPUs, with the GiB it needs, the limit and the override that makes it fit.

It answers in seconds: the plan from measurements already at hand (those shipped in
`measured.json` and the user's cache), never minutes of measuring. A backbone small enough to
measure in a second or two (under `MEASURE_MAX_PARAMS`) is measured when missing; a larger one
without a measurement cannot be judged here and is let through (`submit.py plan` measures it).
"""
from __future__ import annotations

import logging
from pathlib import Path


from guie.config import ExperimentConfig
from guie.kaggle.platform import MACHINE_SHAPES
from guie.plan.advice import shell_words
from guie.plan.core import small_backbone
from guie.plan.run import plan_run

log = logging.getLogger(__name__)


def memory_refusals(cfg: ExperimentConfig, machine_shape: str,
                    workdir: str | Path | None = None) -> list[str]:
    """One message per enabled stage that does not fit `machine_shape`'s per-GPU memory; [] when
    every stage fits, and for what the plan cannot judge (a shape without a known GPU, a config
    whose class count comes from its data, a large backbone never measured)."""

    shape = MACHINE_SHAPES.get(machine_shape)
    if shape is None or not shape.gpus:
        return []
    classes = cfg.num_classes or cfg.data.sample_instances
    if not classes:
        log.warning("memory preflight: %s infers its classes from its data; not judged",
                    cfg.name)
        return []
    try:
        plan = plan_run(cfg, machine_shape, num_classes=classes,
                        measure_missing=small_backbone(cfg), workdir=workdir)
    except ValueError as e:  # a missing measurement (measuring is off), an unknown GPU
        log.warning("memory preflight: %s not judged: %s", cfg.name, e)
        return []
    return [refusal(s, machine_shape, cfg.name) for s in plan.stages if not s.fits]


def refusal(stage, machine_shape: str, config: str) -> str:
    """One line: the stage, the GiB it needs against the limit, and the fix."""

    if stage.fix:
        fix = f"fix: {shell_words(stage.fix)} ({stage.fix_note})"
    else:
        fix = f"fix: {stage.fix_note or 'a larger GPU'}"
    return (f"{stage.name} needs {stage.gpu_memory_gib:.2f} GiB per GPU at batch {stage.batch}, "
            f"over the {stage.gpu_memory_limit_gib:g} GiB limit on {machine_shape} "
            f"({stage.limit_source}); {fix}; every term: `python submit.py plan --config "
            f"{config} --machine-shape {machine_shape}` with the same overrides")
