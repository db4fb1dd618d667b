"""Small evaluation benchmarks built from the real photos that ship with scikit-image: each class
is one photo, its images are different crops (and flips) of it. Shared by the evaluation tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
          "colorwheel", "retina")


def views(name: str, count: int, seed: int) -> list[Image.Image]:
    image = Image.fromarray(getattr(skdata, name)()).convert("RGB")
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
            view.save(images / f"{number}_{photo}{i}.jpg", quality=90)
    return root


def build_folders(root: Path, photos: list[str], per_class: int = 3) -> Path:
    for c, photo in enumerate(photos):
        (root / photo).mkdir(parents=True)
        for i, view in enumerate(views(photo, per_class, seed=100 + c)):
            view.save(root / photo / f"{i}.jpg", quality=90)
    return root
