"""4th place (0.688 private LB): one ingredient of their soups, a 1-epoch ViT-H-14 fine-tune.

Multisample dropout head, sub-center ArcFace k=3 with per-class adaptive margins, layer-wise
backbone LR from 1.25e-6 (patch embedding) to 1e-5 (top), head 3e-4; ~2.5 h on one RTX 3090.
Their soups: list other runs of this config in `export.soup`; the reduction to 64 is a PCA fitted
at export. They also concatenated a ViT-L-14-336 soup before the PCA: train
`fourth_place_vit_l` into its own folder and list it in `export.concat`.
Head width 256 and the head-only warm-up stage: kit's choices.
"""
from dataclasses import replace

from guie.config import StageConfig
from guie.configs.third_place import CONFIG as _third
from guie.configs.third_place import GRAD_CLIP_NORM  # fp16 on a T4: why, there

_LAYERS = 32 + 2  # ViT-H-14: stem, 32 blocks, top
_DECAY = (1.25e-6 / 1e-5) ** (1 / (_LAYERS - 1))  # 1e-5 at the top down to 1.25e-6 at the stem

CONFIG = replace(
    _third,
    name="fourth_place",
    model=replace(_third.model, head="multisample_dropout", num_branches=5, dropout=0.2,
                  embed_dim=256),
    loss=replace(_third.loss, scale=30.0, subcenters=3, class_margins=True,
                 class_margin_min_rad=0.2, class_margin_max_rad=0.5),
    stages=(
        StageConfig(name="head", epochs=2.0, batch_size=256, lr_head=3e-3, warmup_epochs=0.1),
        StageConfig(name="finetune", train=("all",), use_feature_cache=False, epochs=1.0,
                    batch_size=32, lr_head=3e-4, lr_backbone=1e-5, layer_decay=_DECAY,
                    warmup_epochs=0.1, checkpoint_every_steps=1000,
                    grad_clip_norm=GRAD_CLIP_NORM),
    ),
    export=replace(_third.export, reduction="pca", reduction_dim=64, reduction_images=20000),
)
