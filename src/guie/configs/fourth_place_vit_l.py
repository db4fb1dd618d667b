"""4th place's second backbone: the same 1-epoch recipe on OpenAI's ViT-L-14 at 336 px.

Train it into its own folder, then name that folder in the ViT-H run's export,
`submit.py export --config fourth_place --checkpoint runs/vit-h 'export.concat=["runs/vit-l"]'`:
both models' unit embeddings concatenated, PCA to 64 fitted on the concatenation
(`export.concat`). OpenAI's weights use QuickGELU, hence the -quickgelu config; the weights are
an open_clip-format copy uploaded with `push-weights` (a `kaggle:` reference, attached by
`push`). The layer-wise LR spans ViT-L's 24 blocks with the published end points
(1.25e-6 .. 1e-5).
"""
from dataclasses import replace

from guie.configs.fourth_place import CONFIG as _fourth

_LAYERS = 24 + 2  # ViT-L-14: stem, 24 blocks, top
_DECAY = (1.25e-6 / 1e-5) ** (1 / (_LAYERS - 1))

CONFIG = replace(
    _fourth,
    name="fourth_place_vit_l",
    preprocess=replace(_fourth.preprocess, image_size=336),
    model=replace(_fourth.model, backbone="ViT-L-14-336-quickgelu",
                  # `submit.py push-weights --slug guie-weights-vit-l-14-336
                  # open_clip_pytorch_model.bin` (OpenAI's weights) creates this dataset.
                  pretrained_path="kaggle:KAGGLE_USERNAME/guie-weights-vit-l-14-336/"
                                  "open_clip_pytorch_model.bin"),
    stages=(_fourth.stages[0], replace(_fourth.stages[1], layer_decay=_DECAY)),
    # The PCA is fitted once, on the concatenation, in the ViT-H run's export.
    export=replace(_fourth.export, reduction="none"),
)
