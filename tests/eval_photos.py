"""Small evaluation benchmarks built from real images that ship with scikit-image but are not
among the kit's sample-data photos (so no domain or photo is shared with training): each class is
one image (an LFW face: `lfw:<i>`), its images are different crops (and flips) of it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

PHOTOS = ("colorwheel", "horse", "clock", "checkerboard", "cell", "microaneurysms",
          "shepp_logan_phantom", "binary_blobs")


def _image(name: str) -> Image.Image:
    if name.startswith("lfw:"):
        pixels = skdata.lfw_subset()[int(name[4:])]
    else:
        pixels = getattr(skdata, name)()
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:  # bool masks and float images in [0, 1]
        pixels = (pixels.astype(np.float64) / max(float(pixels.max()), 1e-9) * 255).astype(np.uint8)
    return Image.fromarray(pixels).convert("RGB")


def views(name: str, count: int, seed: int) -> list[Image.Image]:
    image = _image(name)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        w, h = image.size
        cw, ch = int(w * rng.uniform(0.6, 0.9)), int(h * rng.uniform(0.6, 0.9))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        view = image.crop((x, y, x + cw, y + ch)).resize((96, 96))
        out.append(view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i % 2 else view)
    return out


def build_gpr1200(root: Path, classes: dict[int, str], per_class: int = 3) -> Path:
    """root/images/<class>_<name>.jpg for {class number: photo}."""
    images = root / "images"
    images.mkdir(parents=True)
    for number, photo in classes.items():
        for i, view in enumerate(views(photo, per_class, seed=number)):
            view.save(images / f"{number}_{photo.replace(':', '')}{i}.jpg", quality=90)
    return root


def build_folders(root: Path, photos: list[str], per_class: int = 3) -> Path:
    for c, photo in enumerate(photos):
        (root / photo).mkdir(parents=True)
        for i, view in enumerate(views(photo, per_class, seed=100 + c)):
            view.save(root / photo / f"{i}.jpg", quality=90)
    return root
