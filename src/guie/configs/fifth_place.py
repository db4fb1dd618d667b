"""5th place (0.688 private LB): frozen ViT-H-14; the head trains on cached backbone features.

BatchNorm + Linear(1024 + 3 -> 64) head over the backbone feature and 3 aspect-ratio features of
the image (`guie.model.aspect_features`; the export computes them from the input's H and W; which
three they used is not published, the kit's are scale-free ratios), ArcFace s=30 m=0.5, cosine
over 1,000 epochs of the cache; at test time extra views of elongated images (their TTA was by
predicted domain; the kit's aspect-ratio crop views are the part that needs no domain classifier).
"""
from dataclasses import replace

from guie.config import StageConfig
from guie.configs.third_place import CONFIG as _third

CONFIG = replace(
    _third,
    name="fifth_place",
    model=replace(_third.model, head="bn_linear", aspect_features=True,
                  grad_checkpointing=False),
    loss=replace(_third.loss, scale=30.0, margin_rad=0.5, subcenters=1),
    stages=(StageConfig(name="head", epochs=1000.0, batch_size=1024, lr_head=1e-3,
                        warmup_epochs=5.0, eval_every_epochs=100.0,
                        checkpoint_every_steps=5000),),
    export=replace(_third.export, tta=("aspect_crops",)),
)
