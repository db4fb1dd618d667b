"""3rd place (0.692 private LB): ViT-H/14 laion2b, 20-branch dropout head, sub-center ArcFace.

Stage 1 trains the head with the backbone frozen, m=0.3, for 200 "epochs" of a tenth of the data
(= 20 full passes), from the feature cache. Stage 2 trains all layers at lr 1e-6 with m=0.5 for
one epoch. 17,691 classes: motono0223's ImageNet-1k mini (0-999), Products-10k (1000-10690) and
GLR2021 mini (10691-17690) TFRecords, whose records already carry global labels.
"""
from dataclasses import replace

from guie.config import DataSource, ExperimentConfig

_base = ExperimentConfig()
_stage1, _stage2 = _base.stages

SOURCES = (
    DataSource("imagenet1k-mini", "tfrecord", "guie-imagenet1k-mini1-tfrecords-label-0-999",
               domain="objects", pattern="*-train-*.tfrec",
               kaggle_slug="motono0223/guie-imagenet1k-mini1-tfrecords-label-0-999"),
    DataSource("products10k", "tfrecord", "guie-products10k-tfrecords-label-1000-10690",
               domain="packaged goods", pattern="*-train-*.tfrec",
               kaggle_slug="motono0223/guie-products10k-tfrecords-label-1000-10690"),
    DataSource("glr2021-mini", "tfrecord", "guie-glr2021mini-tfrecords-label-10691-17690",
               domain="landmarks", pattern="*-train-*.tfrec",
               kaggle_slug="motono0223/guie-glr2021mini-tfrecords-label-10691-17690"),
)

CONFIG = replace(
    _base,
    name="third_place",
    num_classes=17691,
    data=replace(_base.data, sources=SOURCES, root="/kaggle/input", min_per_class=1,
                 heldout_classes=0, num_workers=4),
    model=replace(_base.model, backbone="ViT-H-14",
                  # `submit.py push-weights open_clip_pytorch_model.bin` creates this dataset
                  # (laion2b_s32b_b79k); push fills in your user name and attaches it.
                  pretrained_path="kaggle:KAGGLE_USERNAME/guie-weights-open-clip-pytorch-model/"
                                  "open_clip_pytorch_model.bin",
                  head="multi_dropout", num_branches=20, dropout_min=0.01, dropout=0.20,
                  grad_checkpointing=True),
    loss=replace(_base.loss, scale=30.0, margin_rad=0.3, subcenters=3),
    stages=(
        replace(_stage1, epochs=20.0, batch_size=256, lr_head=1e-3, warmup_epochs=0.5,
                eval_every_epochs=2.0, checkpoint_every_steps=2000),
        replace(_stage2, epochs=1.0, batch_size=32, lr_head=1e-6, lr_backbone=1e-6,
                margin_rad=0.5, warmup_epochs=0.0, checkpoint_every_steps=1000),
    ),
)
