"""One stage's plan: whether it fits the machine's GPUs, term by term, and how long it takes
(`plan_stage`), on a meta-device model of the config (`meta_model`). `guie.plan.run` puts the
stages of a run together; `guie.plan.advice` and `guie.plan.auto` re-plan single stages.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from guie.config import ExperimentConfig, StageConfig
from guie.plan import estimates, measurements, memory, parallel, timing
from guie.plan.gpus import GIB, MemoryLimit, gpu_of, memory_limit
from guie.plan.memory import MemoryTerm, StageSetup

# The kit's tiny ViT (~0.7M parameters) measures in about a second on 2 busy cores; ViT-B-32
# (88M) takes ~20 s per setting and ViT-H-14 10-15 minutes: too long for a gate.
MEASURE_MAX_PARAMS = 30_000_000
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


def meta_model(cfg: ExperimentConfig, num_classes: int):
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
    meta_cfg, model, preprocess, loss_fn = model_parts or meta_model(cfg, num_classes)
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
    head = memory.measure_head(cfg, head_in(model), num_classes, amp, trains_backbone)
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


def head_in(model) -> int:
    return model.feature_dim + (3 if model.aspect_features else 0)


def small_backbone(cfg: ExperimentConfig) -> bool:
    """Whether measuring the backbone, if it is missing, takes seconds (counted on meta)."""
    from guie.model import build_model

    meta_cfg = replace(cfg, model=replace(cfg.model, pretrained_path=""))
    with torch.device("meta"):
        model, _ = build_model(meta_cfg)
    return sum(p.numel() for p in model.visual.parameters()) < MEASURE_MAX_PARAMS
