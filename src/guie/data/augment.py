"""Train-time augmentations, named in the stage config, ending in the shared `Preprocess`."""
from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import v2

from guie.data.decode import as_pixels
from guie.data.preprocess import Preprocess
from guie.errors import UserValueError

AUGMENTATIONS = {
    # scale >= 0.5: instance retrieval needs the object in view, unlike ImageNet's 0.08.
    "random_resized_crop": lambda size: v2.RandomResizedCrop(size, scale=(0.5, 1.0),
                                                             antialias=True),
    "hflip": lambda size: v2.RandomHorizontalFlip(),
    "color_jitter": lambda size: v2.ColorJitter(0.3, 0.3, 0.2, 0.02),
    "grayscale": lambda size: v2.RandomGrayscale(p=0.05),
}


class EvalTransform:
    """PIL image -> normalised [3, S, S] through exactly the export's preprocessing."""

    def __init__(self, preprocess: Preprocess):
        self.preprocess = preprocess

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = v2.functional.pil_to_tensor(image).unsqueeze(0)  # [1, 3, H, W] uint8
        with torch.no_grad():
            return self.preprocess(pixels)[0]


class TrainTransform:
    """Named augmentations, then the shared preprocessing.

    They run on the uint8 tensor, not a PIL image: torch's antialiased uint8 resize is several
    times faster than PIL's. `decode_size` puts `ImageDataset` on its fast path (uint8 tensors,
    JPEGs decoded at a reduced scale keeping both sides >= the model's input size:
    `guie.data.decode`); a 0.5-area crop of such an image is upscaled by up to ~1.6x, a mild blur
    that resize-then-crop pipelines have too.
    """

    def __init__(self, names: tuple[str, ...], preprocess: Preprocess):
        unknown = [n for n in names if n not in AUGMENTATIONS]
        if unknown:
            raise UserValueError(f"augment: unknown augmentations {unknown}; "
                                 f"known: {sorted(AUGMENTATIONS)}")
        size = preprocess.image_size
        self.augment = v2.Compose([AUGMENTATIONS[n](size) for n in names])
        self.preprocess = preprocess
        self.decode_size = size

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        pixels = self.augment(as_pixels(image))  # uint8 [3, H, W]
        with torch.no_grad():
            return self.preprocess(pixels.unsqueeze(0))[0].contiguous()
