"""`plan_run(cfg, machine_shape)`: whether each stage of a run fits the Kaggle machine, how long
the run takes and what it costs, before anything is pushed. `guie.plan.report` prints it;
`push --dry-run`, the preflight gate (`guie.plan.gate`) and `submit.py plan` call both.
"""
from __future__ import annotations

from pathlib import Path

from guie.config import ExperimentConfig
from guie.configs import epoch_readings
from guie.errors import UserValueError
from guie.kaggle.platform import (MACHINE_SHAPES, OUTPUT_CAP_BYTES, PlatformError,
                                  check_machine_shape)
from guie.kaggle.platform import machine_shape as machine_shape_of
from guie.plan import advice, measurements, timing
from guie.plan.core import (DEFAULT_MAX_HOURS, Plan, StagePlan, head_in, meta_model, plan_stage,
                            train_images_of)
from guie.plan.gpus import GIB, gpu_of, memory_limit
from guie.train.checkpoint import predict_output_bytes


def plan_run(cfg: ExperimentConfig, machine_shape: str = "NvidiaTeslaT4", num_classes: int = 0,
             train_images: int = 0, max_hours: float = DEFAULT_MAX_HOURS,
             measure_missing: bool = True, advise: bool = True,
             workdir: str | Path | None = None) -> Plan:
    """The plan of every enabled stage of `cfg` on `machine_shape`.

    `num_classes`: defaults to cfg.num_classes, else the sample data's instances (an upper
    bound). `train_images`: images per epoch (default: from the config where it can tell).
    `measure_missing`: measure activations on this CPU where no cached measurement exists.
    `workdir`: where `submit.py probe` left platform.json; its record of this machine shape (GPU
    count, what PyTorch can allocate) wins over the kit's table."""
    warnings = check_machine_shape(machine_shape)
    if machine_shape not in MACHINE_SHAPES:
        raise PlatformError(f"plan: {machine_shape!r} is no machine shape the kit knows, so its "
                            "GPU and memory are unknown")
    table = MACHINE_SHAPES[machine_shape]
    shape = machine_shape_of(machine_shape, workdir) or table
    limit = memory_limit(table, shape)
    gpu = gpu_of(shape)
    if gpu is None:
        raise PlatformError(f"plan: {machine_shape} ({shape.accelerator}) is no GPU the planner "
                            "knows; the kit trains with PyTorch on CUDA")
    classes = num_classes or cfg.num_classes or cfg.data.sample_instances
    if not classes:
        raise UserValueError(f"plan: config {cfg.name!r} infers num_classes from its data; pass "
                             "num_classes=N")
    images, images_source = (train_images, "given") if train_images else train_images_of(cfg)
    readings = epoch_readings(cfg)
    stages = []
    for stage in (s for s in cfg.stages if s.enabled):
        sp = plan_stage(cfg, stage, shape, classes, images, max_hours, measure_missing,
                        limit=limit, epoch_readings=tuple(
                            (label, epochs[stage.name]) for label, epochs in readings
                            if stage.name in epochs))
        if advise and not sp.fits:
            sp = advice.with_fix(cfg, sp, shape, classes, images, max_hours, measure_missing,
                                 limit)
        stages.append(sp)
    rate = timing.rate_for(gpu)
    _, model, preprocess, _ = meta_model(cfg, classes)
    last = stages and next(s for s in reversed(cfg.stages) if s.enabled)
    export_key = measurements.Key(cfg.model.backbone,
                                  (last.image_size_px if last else 0) or cfg.preprocess.image_size,
                                  last.patch_stride_px if last else 0,
                                  "bf16" if shape.bf16 else "fp16",
                                  cfg.model.grad_checkpointing)  # FLOPs: either is the same
    forward = measurements.get(export_key, measure_missing).forward_flops_per_image
    views = (2 if "flip" in cfg.export.tta else 1) * (3 if "aspect_crops" in cfg.export.tta else 1)
    scoring = timing.scoring_hours(forward, views, rate)
    reduction = cfg.export.reduction_images if cfg.export.reduction in ("pca", "whiten") else 0
    infer_h = timing.inference_kernel_hours(forward, reduction, rate)
    hours = [s.hours for s in stages]
    sessions = timing.sessions_needed(hours, max_hours)
    output = predict_output_bytes(cfg, num_classes=classes)
    if cfg.export.concat:
        warnings.append("export.concat: the other towers' size and scoring time are not counted")
    return Plan(cfg.name, machine_shape, shape.accelerator, shape.gpus, classes, images,
                images_source, max_hours, tuple(stages), sessions, sum(hours), infer_h,
                (sum(hours) + infer_h) / timing.WEEKLY_QUOTA_HOURS, scoring,
                output.peak_bytes / GIB, output.end_bytes / GIB, OUTPUT_CAP_BYTES / GIB,
                _submission_bytes(cfg, model) / GIB, rate.source,
                tuple(warnings + [w for s in stages for w in s.warnings]), limit,
                _reading_hours(readings, stages))


def _reading_hours(readings, stages: list[StagePlan]) -> tuple[tuple[str, float], ...]:
    """Each reading's training hours: its stages' hours, the configured hours elsewhere."""
    out = []
    for label, _ in readings:
        out.append((label, sum(next((h for lab, _, h in s.readings if lab == label), s.hours)
                               for s in stages)))
    return tuple(out)


def _submission_bytes(cfg: ExperimentConfig, model) -> int:
    """saved_model.pt inside a stored zip: backbone + one folded Linear, in the export dtype,
    plus ~1 MiB of TorchScript code and zip headers."""
    per = 2 if cfg.export.fp16_weights else 4
    out_dim = cfg.export.reduction_dim if cfg.export.reduction != "none" else \
        (cfg.model.embed_dim if cfg.model.head != "identity" else model.feature_dim)
    visual = sum(t.numel() for t in model.visual.state_dict().values())
    return visual * per + (head_in(model) + 1) * out_dim * 4 + 2**20
