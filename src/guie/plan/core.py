"""`plan_run(cfg, machine_shape)`: whether each stage fits the Kaggle machine, how long it takes
and what it costs, before anything is pushed. `guie.plan.report` prints it; `push --dry-run`
and `submit.py plan` call both.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from guie.config import ExperimentConfig, StageConfig
from guie.kaggle.platform import (MACHINE_SHAPES, OUTPUT_CAP_BYTES, PlatformError,
                                  check_machine_shape)
from guie.kaggle.platform import machine_shape as machine_shape_of
from guie.plan import estimates, measurements, memory, parallel, timing
from guie.plan.gpus import GIB, MemoryLimit, gpu_of, memory_limit
from guie.plan.memory import MemoryTerm, StageSetup

DEFAULT_MAX_HOURS = 11.0  # the training kernel's budget per session (push --max-hours)
REFERENCE_SLUGS = {  # 3rd place's training set: guie.plan.estimates.TRAIN_IMAGES images
    "motono0223/guie-imagenet1k-mini1-tfrecords-label-0-999",
    "motono0223/guie-products10k-tfrecords-label-1000-10690",
    "motono0223/guie-glr2021mini-tfrecords-label-10691-17690"}


@dataclass(frozen=True)
class StagePlan:
    name: str
    fits: bool
    gpu_memory_gib: float  # predicted peak per device
    gpu_memory_limit_gib: float
    max_batch: int  # per device, under the stage's own checkpointing setting
    max_batch_other_checkpointing: int  # with checkpointing switched (0: not applicable)
    batch: int
    checkpointing: bool
    terms: tuple[MemoryTerm, ...]
    activations_gib_other_checkpointing: float | None  # the same batch, checkpointing switched
    hours: float
    cache_pass_hours: float
    sessions: int
    time_basis: str
    attention: str = ""  # the SDPA kernel the GPU will run, and what it means for memory
    fix: tuple[str, ...] = ()  # KEY=VALUE overrides that make it fit
    fix_note: str = ""
    warnings: tuple[str, ...] = ()
    limit_source: str = ""  # which figure gpu_memory_limit_gib is (guie.plan.gpus.memory_limit)
    # Several GPUs (guie.plan.parallel): what the stage runs and why, and both columns. `terms`
    # is DDP's (or one GPU's); gpu_memory_gib, fits, max_batch and hours are the chosen one's.
    parallel: str = ""  # "ddp" or "fsdp"; "" on one GPU
    parallel_reason: str = ""
    ddp_gib: float = 0.0
    fsdp_gib: float | None = None  # None: not a stage FSDP would shard
    fsdp_terms: tuple[MemoryTerm, ...] = ()
    fsdp_hours: float = 0.0
    comm_basis: str = ""
    fsdp_eval_gib: float = 0.0  # FSDP's evaluation points (the plain model back on the device)
    # The source's epochs read other ways (guie.configs.epoch_readings): (label, epochs, hours)
    readings: tuple[tuple[str, float, float], ...] = ()


@dataclass(frozen=True)
class Plan:
    config: str
    machine_shape: str
    accelerator: str
    gpus: int
    num_classes: int
    train_images: int
    train_images_source: str
    max_hours: float
    stages: tuple[StagePlan, ...]
    sessions: int
    training_hours: float
    inference_kernel_hours: float
    quota_share: float  # of WEEKLY_QUOTA_HOURS: training sessions + the inference kernel
    scoring_hours: float  # the host's run of saved_model.pt over the 205k test images
    output_gib: float  # peak of the training output folder
    output_end_gib: float
    output_limit_gib: float
    submission_zip_gib: float
    rate_source: str
    warnings: tuple[str, ...]
    memory_limit: MemoryLimit | None = None
    # The recipe's length under each reading of its source's epochs: (label, training hours)
    readings: tuple[tuple[str, float], ...] = ()

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages) and self.output_gib <= self.output_limit_gib


def resolve_amp(stage: StageConfig, bf16: bool) -> str:
    """`guie.train.amp.amp_settings` on the planned GPU: bf16 where native, else fp16."""
    if stage.amp in ("off", "bf16", "fp16"):
        return stage.amp
    return "bf16" if bf16 else "fp16"


def train_images_of(cfg: ExperimentConfig) -> tuple[int, str]:
    """Training images per epoch, and where the number comes from (0: unknown)."""
    if cfg.data.sample_instances:
        train = cfg.data.sample_instances - cfg.data.heldout_classes - cfg.data.distractor_classes
        return (max(train, 0) * cfg.data.sample_views,
                "the config's sample data (instances not held out x views)")
    slugs = {s.kaggle_slug for s in cfg.data.sources}
    if slugs and slugs <= REFERENCE_SLUGS and len(slugs) == len(REFERENCE_SLUGS):
        return estimates.TRAIN_IMAGES, "3rd place's training set (guie.plan.estimates.TRAIN_IMAGES)"
    return 0, "unknown: pass train_images (--train-images N)"


def _meta_model(cfg: ExperimentConfig, num_classes: int):
    from guie.losses import build_loss
    from guie.model import build_model, head_output_dim

    meta_cfg = replace(cfg, model=replace(cfg.model, pretrained_path="", grad_checkpointing=False))
    with torch.device("meta"):
        model, preprocess = build_model(meta_cfg)
        loss_fn = build_loss(cfg.loss, head_output_dim(cfg.model, model.feature_dim), num_classes)
    return meta_cfg, model, preprocess, loss_fn


def plan_stage(cfg: ExperimentConfig, stage: StageConfig, shape, num_classes: int,
               train_images: int, max_hours: float, measure_missing: bool = True,
               model_parts=None, limit: MemoryLimit | None = None,
               epoch_readings: tuple[tuple[str, float], ...] = ()) -> StagePlan:
    """One stage's memory, time and verdict (without a fix: `guie.plan.advice` adds it).

    `limit`: the per-device memory the peak must stay below (default: `memory_limit(shape)`).
    `epoch_readings`: (label, epochs) of other readings of the stage's length, timed too."""
    from guie.model import apply_stage_resolution, backbone
    from guie.train.optim import param_groups, trainable

    gpu = gpu_of(shape)
    meta_cfg, model, preprocess, loss_fn = model_parts or _meta_model(cfg, num_classes)
    apply_stage_resolution(meta_cfg, model, preprocess, stage)
    seam = backbone(model)
    what = trainable(stage, seam.num_blocks)
    trained = sum(p.numel() for g in param_groups(model, loss_fn, stage) for p in g["params"])
    total = sum(p.numel() for p in model.parameters()) + sum(
        p.numel() for p in loss_fn.parameters())
    trains_backbone = what.backbone
    from_cache = not trains_backbone and stage.use_feature_cache
    lowest = min(what.layers) if what.layers else seam.num_blocks + 1
    # Blocks below the lowest trained layer run without grad and keep nothing for backward.
    share = 1.0 if lowest == 0 else max(0.0, (seam.num_blocks - lowest + 1) / seam.num_blocks)
    amp = resolve_amp(stage, shape.bf16)
    ckpt = cfg.model.grad_checkpointing
    stride = stage.patch_stride_px if stage.patch_stride_px else 0
    key = measurements.Key(cfg.model.backbone, preprocess.image_size, stride, amp, ckpt)
    m = measurements.get(key, measure_missing)
    other = measurements.get(replace(key, checkpointing=not ckpt), measure_missing) \
        if trains_backbone else None
    if m is None:
        raise ValueError(f"plan: no activation measurement for {key.text()} and measuring is off")
    head = memory.measure_head(cfg, _head_in(model), num_classes, amp, trains_backbone)
    world = shape.gpus if (trains_backbone or not from_cache) else 1
    blocks = [sum(p.numel() for p in g) for g in seam.layer_groups()[1:-1]]
    centres = sum(p.numel() for p in loss_fn.parameters())
    setup = StageSetup(stage.name, stage.batch_size, world, from_cache, trains_backbone, ckpt, amp,
                       total, trained, bool(stage.ema_decay), share,
                       m if trains_backbone or not from_cache else None,
                       m if from_cache else None, head.peak_bytes, head.weight_copy_bytes,
                       stage.grad_clip_norm, max(blocks, default=0),
                       total - sum(blocks) - centres, centres, stage.grad_accum,
                       stage.fsdp_reduce_every_micro_step)
    limit = limit or memory_limit(shape)
    ddp_peak = memory.stage_peak_gib(setup, gpu)
    shardable = world > 1 and not from_cache
    fsdp_peak = parallel.fsdp_peak_gib(setup, gpu) if shardable else None
    choice = parallel.decide(stage.parallel, world, from_cache, ddp_peak, fsdp_peak, limit.gib)
    peak_of = parallel.fsdp_peak_gib if choice.parallel == parallel.FSDP and shardable else \
        memory.stage_peak_gib
    peak = peak_of(setup, gpu)
    terms = memory.training_terms(setup, gpu)
    _, extra = memory.peak_gib(terms, setup, gpu)
    fsdp_terms = ()
    if shardable:
        raw = parallel.fsdp_terms(setup, gpu)
        fsdp_terms = tuple(raw + memory.peak_gib(raw, setup, gpu, shards=world)[1])
    if from_cache:
        terms += [replace(t, name=f"cache pass: {t.name}")
                  for t in memory.cache_pass_terms(setup, gpu)]
    # auto fits a batch where either parallelism does (it takes FSDP when DDP runs short)
    fit_peak = peak_of if stage.parallel != "auto" or not shardable else (
        lambda s_, g_, b_=None: min(memory.stage_peak_gib(s_, g_, b_),
                                    parallel.fsdp_peak_gib(s_, g_, b_)))
    best = memory.max_batch(setup, gpu, limit.gib, peak=fit_peak)
    best_other, other_act = 0, None
    if other is not None:
        switched = replace(setup, checkpointing=not ckpt, backbone=other)
        best_other = memory.max_batch(switched, gpu, limit.gib, peak=fit_peak)
        other_act = other.activation_bytes(stage.batch_size, share) / GIB
    rate = timing.rate_for(gpu)
    forward = m.forward_flops_per_image

    def time_of(epochs: float) -> timing.StageTime:
        if not train_images:
            return timing.StageTime(0.0, 0.0, 0.0,
                                    "not estimated: training images per epoch unknown")
        if from_cache:
            return timing.head_stage_time(train_images, epochs, stage.cache_views,
                                          stage.batch_size, forward,
                                          3 * head.forward_flops_per_image * stage.batch_size,
                                          rate, shape.gpus, cfg.data.num_workers)
        # a head stage told not to use the cache runs the backbone forward only
        return timing.backbone_stage_time(train_images, epochs, forward,
                                          share if trains_backbone else 0.0,
                                          ckpt and trains_backbone, rate, shape.gpus,
                                          cfg.data.num_workers)
    st = time_of(stage.epochs)
    warnings = []
    if from_cache and st.hours > max_hours:
        warnings.append(f"{stage.name}: the feature cache lives outside /kaggle/working "
                        f"($GUIE_CACHE_DIR) and is lost when a session ends, so cache pass + "
                        f"head training ({st.hours:.1f} h) must fit one {max_hours:g} h "
                        "session")
    comm_h, comm_basis = (parallel.extra_comm_hours(setup, train_images, stage.epochs, gpu)
                          if shardable else (0.0, ""))
    chosen_comm_h = comm_h if choice.parallel == parallel.FSDP and shardable else 0.0
    readings = tuple((label, epochs, time_of(epochs).hours
                      + (chosen_comm_h * epochs / stage.epochs if stage.epochs else 0.0))
                     for label, epochs in epoch_readings)
    hours = st.hours + chosen_comm_h
    return StagePlan(stage.name, peak <= limit.gib, peak, limit.gib, best, best_other,
                     stage.batch_size, ckpt, tuple(terms + extra), other_act, hours,
                     st.cache_pass_hours, timing.sessions_needed([hours], max_hours),
                     st.basis, attention=gpu.attention_note, warnings=tuple(warnings),
                     limit_source=limit.source, readings=readings,
                     parallel=choice.parallel if world > 1 else "",
                     parallel_reason=choice.reason if world > 1 else "", ddp_gib=ddp_peak,
                     fsdp_gib=fsdp_peak, fsdp_terms=fsdp_terms,
                     fsdp_hours=st.hours + comm_h if shardable else 0.0, comm_basis=comm_basis,
                     fsdp_eval_gib=parallel.evaluation_peak_gib(setup, gpu) if shardable else 0.0)


def _head_in(model) -> int:
    return model.feature_dim + (3 if model.aspect_features else 0)


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
    from guie.configs import epoch_readings
    from guie.plan import advice
    from guie.train.checkpoint import predict_output_bytes

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
        raise ValueError(f"plan: config {cfg.name!r} infers num_classes from its data; pass "
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
    _, model, preprocess, _ = _meta_model(cfg, classes)
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
    return visual * per + (_head_in(model) + 1) * out_dim * 4 + 2**20
