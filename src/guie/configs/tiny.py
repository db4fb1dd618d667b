"""`submit.py local`'s default: the whole two-stage path on the built-in sample data, on a CPU.

The tiny backbone has random weights (nothing can be downloaded here), so unlike the ViT-H
recipes its stage 2 learns the backbone at a high LR; the point is to exercise every step of the
real pipeline in minutes and to see held-out mP@5 move.
"""
from dataclasses import replace

from guie.config import TINY_BACKBONE, ExperimentConfig

_base = ExperimentConfig()
_stage1, _stage2 = _base.stages

CONFIG = replace(
    _base,
    name="tiny",
    data=replace(
        _base.data, root="build/sample-data", sample_instances=600, sample_views=6,
        min_per_class=2,
        # 220 unseen classes -> 220 queries, each with 5 relevant index images, plus
        # 40 more unseen classes x 3 images as distractors (as on Kaggle, test classes are new).
        heldout_classes=220, queries_per_class=1, distractor_classes=40, distractors_per_class=3,
    ),
    preprocess=replace(_base.preprocess, image_size=64),
    model=replace(_base.model, backbone=TINY_BACKBONE, dropout=0.1),
    stages=(
        # Stage 1: frozen backbone, head + centres from a 4-view feature cache; cheap: many epochs.
        replace(_stage1, epochs=40, batch_size=64, lr_head=3e-3, warmup_epochs=1,
                cache_views=4, eval_every_epochs=10),
        # Stage 2: everything; a random backbone needs far more LR than ViT-H's 1e-6.
        replace(_stage2, epochs=8, batch_size=32, lr_head=1e-3, lr_backbone=5e-4,
                margin_rad=0.4, warmup_epochs=0.5, eval_every_epochs=2),
    ),
)
