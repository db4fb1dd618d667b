"""Photo-like JPEGs of the sizes the reference shards hold, written as a TFRecord shard.

motono0223's shards hold JPEGs of roughly 400-800 px per side. None can be downloaded here, so
crops of the colour photos that ship with scikit-image are resized to a long side drawn from
400-800 px and saved at quality 90 (4:2:0), then framed as tf.train.Example records.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from guie.data.tfrecord import encode_example, index_shard, write_tfrecord

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
          "motorcycle_left.png", "retina.jpg", "rocket.jpg")


def _load_photos() -> list[Image.Image]:
    import skimage.data

    root = Path(skimage.data.data_dir)
    return [Image.open(root / name).convert("RGB") for name in PHOTOS]


def photo_jpegs(count: int, seed: int = 0, long_side=(400, 800), quality: int = 90) -> list[bytes]:
    rng = np.random.default_rng(seed)
    photos = _load_photos()
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        width, height = photo.size
        aspect = rng.uniform(0.6, 1.67)  # crop width / height
        crop_w = min(width, height * aspect) * rng.uniform(0.6, 1.0)
        crop_h = min(height, crop_w / aspect)
        left = rng.uniform(0, width - crop_w)
        top = rng.uniform(0, height - crop_h)
        crop = photo.crop((round(left), round(top), round(left + crop_w), round(top + crop_h)))
        scale = rng.integers(long_side[0], long_side[1] + 1) / max(crop.size)
        size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
        buf = io.BytesIO()
        crop.resize(size, Image.LANCZOS).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def write_shard(jpegs: list[bytes], path: Path, num_classes: int) -> pd.DataFrame:
    """The shard as a sources table (path, offset, length, label): label = i % num_classes."""
    labels = [i % num_classes for i in range(len(jpegs))]
    write_tfrecord(path, [encode_example(j, label) for j, label in zip(jpegs, labels, strict=True)])
    index = index_shard(path, use_cache=False)
    return pd.DataFrame({"path": str(path), "offset": np.asarray(index.offsets, np.int64),
                         "length": np.asarray(index.lengths, np.int64),
                         "label": np.asarray(labels, np.int64)})
