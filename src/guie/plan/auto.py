"""`parallel="auto"` resolved for a training run: the stage planned on the run's GPUs, and
`guie.plan.parallel.decide`'s rule applied to its DDP and FSDP peaks. The training engine
(`guie.train.fsdp`) calls `choose_parallel` on every rank.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch

from guie.kaggle.platform import MACHINE_SHAPES, MachineShape
from guie.plan.core import plan_stage, small_backbone
from guie.plan.gpus import MemoryLimit
from guie.plan.parallel import DDP, FSDP, decide

log = logging.getLogger(__name__)


def choose_parallel(cfg, stage, world: int, machine, num_classes: int = 0) -> str:
    """`stages[*].parallel == "auto"` resolved: "ddp" or "fsdp" for `stage` (a StageConfig or
    its name) on `world` GPUs of `machine` (a `guie.kaggle.platform.MachineShape`, or the GiB
    PyTorch can allocate per device, e.g. `total_memory / 2**30`). Deterministic, so every rank
    reaches the same answer; seconds (measurements at hand; a large backbone never measured
    is not measured here and gets DDP)."""
    stage = cfg.stage(stage) if isinstance(stage, str) else stage
    if world <= 1 or stage.parallel in (DDP, FSDP):
        return decide(stage.parallel, world, False, 0.0, None, 0.0).parallel
    if isinstance(machine, MachineShape):
        shape = replace(machine, gpus=world)
        limit = None
    else:  # a GPU known only by its memory: a T4's facts for the small GPU-side terms
        shape = replace(MACHINE_SHAPES["NvidiaTeslaT4"], gpus=world, gpu_memory_gib=machine,
                        allocatable_gib=machine)
        limit = MemoryLimit(float(machine), "given", "measured")
    classes = num_classes or cfg.num_classes or cfg.data.sample_instances
    try:
        # The plan runs a head step on the CPU (dropout draws): the training's random stream
        # must not depend on whether `auto` was resolved.
        with torch.random.fork_rng(devices=[]):
            sp = plan_stage(cfg, stage, shape, classes, 0, 1.0,
                            measure_missing=small_backbone(cfg), limit=limit)
    except ValueError as e:
        log.warning("parallel=auto for %s: DDP (the plan cannot judge: %s)", stage.name, e)
        return DDP
    return sp.parallel or DDP
