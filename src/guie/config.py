"""Experiment configuration: frozen dataclasses, one small module per experiment.

An experiment is a `ExperimentConfig`; every recipe module under `guie.configs` builds one with
`dataclasses.replace` from the defaults here and states only what differs. Overrides from the
command line (`--stage2.lr_head=1e-4`, a stage addressed by its name) are parsed against the
field types and unknown keys are errors, so a typo never silently trains the wrong thing; that
parsing lives in `guie.config_io`, and a config name with its overrides resolves through
`guie.configs.resolve_config`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from guie.config_io import ConfigError, from_dict, to_dict


@dataclass(frozen=True)
class DataSource:
    """One training data set. Configs list these; the Kaggle kit and `data fetch` reuse them."""

    name: str
    kind: Literal["tfrecord", "csv"]
    # tfrecord: a folder of shards (matched by `pattern`); csv: a CSV file of path,label whose
    # paths are relative to the CSV's folder. Relative locations resolve against the data root.
    location: str
    domain: str = "mixed"
    # Added to every label of this source so that several sources share one label space.
    label_offset: int = 0
    pattern: str = "*.tfrec"
    kaggle_slug: str | None = None  # owner/slug of the Kaggle dataset that holds it, if any


@dataclass(frozen=True)
class EvalSource:
    """A retrieval benchmark scored beside the held-out split and never trained on (5th place
    validated on GPR1200): its own classes, its own domains, outside the label space."""

    name: str
    # folders: one sub-folder per class; csv: a file of path,label[,domain] rows (paths relative
    # to it); gpr1200: GPR1200's images/<class>_<name>.jpg, domains from its class ranges.
    kind: Literal["folders", "csv", "gpr1200"]
    location: str  # relative locations resolve against the data root
    # Every image's domain ("" = the source's name); gpr1200 and csv give their own.
    domain: str = ""
    # 0: leave-one-out, every image queries all others (GPR1200's protocol); N: the first N
    # images of each class (by path) query the rest.
    queries_per_class: int = 0
    kaggle_slug: str | None = None  # owner/slug: attached to the training kernel


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[DataSource, ...] = ()
    root: str = "data"  # where relative source locations live (on Kaggle: /kaggle/input)
    # > 0: build the kit's sample data set (this many instances) under `root` and use it as the
    # sources; for local runs and tests, where no real data can be downloaded.
    sample_instances: int = 0
    sample_views: int = 6
    min_per_class: int = 3
    max_per_class: int = 0  # 0 = no cap
    resample_min_per_class: int = 0  # repeat images of small classes up to this count; 0 = off
    heldout_classes: int = 0  # classes kept out of training for validation (unseen, as on Kaggle)
    queries_per_class: int = 1  # held-out images used as queries; the rest go to the index
    distractor_classes: int = 0  # further unseen classes whose images only pad the index
    distractors_per_class: int = 2
    split_seed: int = 0
    eval_sources: tuple[EvalSource, ...] = ()  # scored at every evaluation point, never trained on
    verify_crc: bool = True
    num_workers: int = 2


@dataclass(frozen=True)
class PreprocessConfig:
    """The one preprocessing shared by validation, the feature cache and the export."""

    image_size: int = 224
    # squash: resize to size x size ignoring aspect; shorter_crop: CLIP's resize + centre crop.
    resize_mode: Literal["squash", "shorter_crop"] = "squash"
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    antialias: bool = True
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # CLIP's
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


# The kit's own tiny open_clip config (src/guie/model_configs/), registered by guie.model: local
# runs and tests with random weights. Named here so configs need not import open_clip.
TINY_BACKBONE = "guie-tiny-vit"


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "ViT-H-14"
    pretrained_path: str = ""  # local weights file (open_clip checkpoint or visual state_dict)
    use_projection: bool = True  # False: pre-projection features (1280-d for ViT-H, 2nd place)
    embed_dim: int = 64
    # linear: Dropout + Linear (1st/2nd); multi_dropout: K parallel Dropout(p_i)+Linear branches,
    # averaged (3rd: 20, p 0.01..0.20); multisample_dropout: one Linear under K dropout masks, the
    # loss averaged over them (4th); bn_linear: BatchNorm + Linear (5th); identity: the backbone
    # feature itself (the no-training recipe, reduced to 64 by export.reduction).
    head: Literal["linear", "multi_dropout", "multisample_dropout", "bn_linear",
                  "identity"] = "linear"
    dropout: float = 0.2
    # 5th place: the head also sees 3 features of the image's aspect ratio (guie.model.
    # aspect_features), which the export computes from the input's H and W before resizing.
    aspect_features: bool = False
    num_branches: int = 20  # multi_dropout branches, or multisample_dropout masks
    dropout_min: float = 0.01
    grad_checkpointing: bool = False


@dataclass(frozen=True)
class LossConfig:
    # arcface: cos(theta + m); cosface: cos(theta) - m (1st place). Both take sub-centres.
    name: Literal["arcface", "cosface"] = "arcface"
    scale: float = 30.0
    margin_rad: float = 0.3  # for cosface a cosine offset, not an angle
    subcenters: int = 1  # sub-center ArcFace k (3rd/4th place: 3)
    # 4th place: each class's margin from its image count n, rare classes getting more:
    # n^-1/4 mapped linearly onto [min, max]. Replaces the stages' scalar margins.
    class_margins: bool = False
    class_margin_min_rad: float = 0.2
    class_margin_max_rad: float = 0.5


@dataclass(frozen=True)
class StageConfig:
    name: str = "stage"
    enabled: bool = True
    # Parameter groups that learn; every other parameter is frozen (no gradient, no optimizer
    # state): "head", "centres" (the loss's class centres), "backbone" (all of it), "blocks:I-J"
    # (transformer blocks I..J inclusive, 0-based), "backbone_stem" (patch + position
    # embeddings), "backbone_top" (final norm + projection), "all".
    train: tuple[str, ...] = ("head", "centres")
    use_feature_cache: bool = True  # only where no backbone group trains
    cache_views: int = 1  # augmented views per image cached (1 = the plain preprocessing)
    epochs: float = 1.0  # fractional epochs allowed (3rd place: 200 tenth-epochs)
    batch_size: int = 64
    grad_accum: int = 1
    lr_head: float = 1e-3
    lr_centres: float | None = None  # None: lr_head
    lr_backbone: float = 0.0
    layer_decay: float = 1.0  # backbone LR multiplier per block from the top; 1 = flat
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    margin_rad: float | None = None  # None: the loss config's margin
    # 2nd place: the margin grows by this much after every full epoch, up to the cap.
    margin_step_rad_per_epoch: float = 0.0
    margin_max_rad: float = 0.8
    # Input size and patch-embedding stride of this stage; 0: the preprocess config's size and
    # the backbone's patch size. Position embeddings are interpolated to the new token grid
    # (1st place: 280 then 290 px with stride 12 for ViT-H/14's 14 px patches).
    image_size_px: int = 0
    patch_stride_px: int = 0
    ema_decay: float = 0.0  # > 0: train with an exponential moving average of the weights
    # Which weights the stage keeps: "last" (its final step's), or the best evaluation point by
    # "heldout" (the held-out mP@5) or by an evaluation source's name (its mP@5).
    select_by: str = "last"
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    augment: tuple[str, ...] = ("random_resized_crop", "hflip")
    eval_every_epochs: float = 1.0
    checkpoint_every_steps: int = 500
    max_hours: float = 0.0  # stop cleanly with a checkpoint after this much time; 0 = no limit
    # Global gradient-norm clip, applied after the grad scaler unscales; 0 = off.
    grad_clip_norm: float = 0.0
    # Data parallelism across ranks: "ddp" (every rank holds full weights, gradients and AdamW
    # state), "fsdp" (FSDP2: that state sharded across ranks), or "auto" (guie.plan.parallel's
    # rule). One rank trains plainly whatever this says.
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    # Under FSDP with grad_accum > 1: reduce-scatter every micro-step (True: gradients stay
    # sharded) or only at the window's last (False: less traffic, but each rank keeps a full
    # unsharded fp32 gradient through the window).
    fsdp_reduce_every_micro_step: bool = True


@dataclass(frozen=True)
class ExportConfig:
    fp16_weights: bool = False
    compat: Literal["none", "torch1.11"] = "none"
    # Reduction of the head's output to `reduction_dim`, folded into the exported Linear: pca or
    # whiten fitted on `reduction_images` training images (4th, 6th), avg_pool of neighbouring
    # dimensions (motono0223's notebook; needs no images).
    reduction: Literal["none", "pca", "whiten", "avg_pool"] = "none"
    reduction_dim: int = 64
    reduction_images: int = 2000
    # Other training output folders of this same config whose weights are averaged with this
    # one's (a model soup, 4th place).
    soup: tuple[str, ...] = ()
    # Training output folders of other experiments (each holds its config.json) whose models
    # run beside this one in the export: each model's unit embedding, concatenated, then
    # `reduction` fitted on the concatenation (4th place: ViT-L-14-336 beside ViT-H-14, PCA
    # to 64). `tta` and `fp16_weights` apply to every model.
    concat: tuple[str, ...] = ()
    # Test-time views inside forward, averaged before the L2 norm: "flip" (horizontal), and
    # "aspect_crops" (5th place: the two ends of an elongated image as extra square views).
    tta: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "default"
    seed: int = 0
    num_classes: int = 0  # 0 = infer from the data
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # Trained in order; each stage's checkpoints live in a folder named after it.
    stages: tuple[StageConfig, ...] = (
        StageConfig(name="stage1"),
        StageConfig(name="stage2", train=("all",), use_feature_cache=False, lr_head=1e-4,
                    lr_backbone=1e-6, margin_rad=0.5, warmup_epochs=0.1),
    )
    export: ExportConfig = field(default_factory=ExportConfig)
    # The training budget of one session (one process tree: a Kaggle session, a `submit.py
    # train`), all stages together: at this many hours the running stage checkpoints and stops
    # cleanly ("paused"), and the next session resumes there; 0 = no limit. A stage's own
    # `max_hours` limits that stage alone; the stricter of the two stops it. `push` and `run`
    # send 11.0 where this is 0, since Kaggle ends a session at 12 h.
    max_hours: float = 0.0

    def __post_init__(self):
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stages: names must be unique (they name checkpoint folders): "
                              f"{names}")

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"no stage named {name!r} (stages: "
                          f"{', '.join(s.name for s in self.stages) or 'none'})")

    def replace_stage(self, name: str, **changes) -> "ExperimentConfig":
        self.stage(name)
        return replace(self, stages=tuple(replace(s, **changes) if s.name == name else s
                                          for s in self.stages))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as JSON next to an output (timm's habit)."""
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def load_config(path: str | Path) -> ExperimentConfig:
    return from_dict(ExperimentConfig, migrate(json.loads(Path(path).read_text())))


def migrate(data: dict) -> dict:
    """A config saved before stage schedules (fixed stage1/stage2, `train_backbone`) in today's
    form, so earlier training outputs still load and export."""
    data = dict(data)
    if "stages" not in data and ("stage1" in data or "stage2" in data):
        old = [data.pop(k) for k in ("stage1", "stage2") if k in data]
        data["stages"] = [_migrate_stage(s) for s in old]
    return data


def _migrate_stage(stage: dict) -> dict:
    stage = dict(stage)
    if "train_backbone" in stage:
        stage["train"] = ["all"] if stage.pop("train_backbone") else ["head", "centres"]
    return stage
