"""No training: the pretrained ViT-H-14 laion2b image feature, PCA to 64 folded into the export.

A first submission in minutes: the only cost is the backbone over `reduction_images` images
to fit the PCA.
"""
from dataclasses import replace

from guie.configs.third_place import CONFIG as _third

CONFIG = replace(
    _third,
    name="pca",
    model=replace(_third.model, head="identity", grad_checkpointing=False),
    stages=(),
    export=replace(_third.export, reduction="pca", reduction_dim=64, reduction_images=5000),
)
