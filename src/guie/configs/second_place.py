"""2nd place (0.709 private LB): ViT-H-14 without its projection (1280-d) -> Dropout 0.2 ->
Linear(1280, 64), ArcFace s=30 with a margin growing per epoch (0.3, +0.1 per epoch, cap 0.8).

All layers train together; the backbone's LR is the head's x 1e-3 (0.670 -> 0.713 in the
write-up); AdamW, cosine, 1 epoch of warmup. Their 274k classes / 7M images are not public data
sets here: this uses the 3rd place's TFRecords. Epochs: kit's choice, enough to reach the cap.
"""
from dataclasses import replace

from guie.config import StageConfig
from guie.configs.third_place import CONFIG as _third
from guie.configs.third_place import GRAD_CLIP_NORM  # fp16 on a T4: why, there

CONFIG = replace(
    _third,
    name="second_place",
    model=replace(_third.model, use_projection=False, head="linear", dropout=0.2),
    loss=replace(_third.loss, scale=30.0, margin_rad=0.3, subcenters=1),
    stages=(StageConfig(name="all", train=("all",), use_feature_cache=False, epochs=6.0,
                        batch_size=32, lr_head=1e-3, lr_backbone=1e-6, warmup_epochs=1.0,
                        margin_rad=0.3, margin_step_rad_per_epoch=0.1, margin_max_rad=0.8,
                        checkpoint_every_steps=1000, grad_clip_norm=GRAD_CLIP_NORM),),
)
