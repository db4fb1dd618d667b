"""Images for training and evaluation: bytes -> RGB PIL image -> tensor, never crashing.

A damaged image (corrupt JPEG, failed record CRC) yields `None` from `ImageDataset` with a
warning naming its path and offset; `collate_skip_bad` drops those and reports how many, so
one bad file among millions costs one sample, not a run.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from PIL import Image

from guie.data.decode import decode_image, decode_pixels
from guie.data.errors import DataError, DataWarning
from guie.data.tfrecord import IMAGE_KEY, parse_example, read_record


def read_bytes(path: str, offset: int = -1, length: int = -1, verify_crc: bool = True) -> bytes:
    """Encoded image bytes: the whole file when offset < 0, else the JPEG inside the
    tf.train.Example record at `offset`."""
    if offset < 0:
        with open(path, "rb") as f:
            return f.read()
    record = read_record(path, offset, length, verify_crc)
    try:
        images = parse_example(record, (IMAGE_KEY,)).get(IMAGE_KEY)
    except DataError as e:
        raise DataError(f"{path}: record at byte offset {offset}: {e}") from None
    if not images:
        raise DataError(f"{path}: record at byte offset {offset} has no {IMAGE_KEY!r}")
    return images[0]


def decode_rgb(data: bytes, where: str, min_side: int = 0) -> Image.Image:
    """Decode to an RGB image; DataError naming `where` if it is corrupt or over the pixel cap
    (`guie.data.guarded_decode`).

    `min_side` > 0: a JPEG may be decoded at a reduced scale that keeps both sides >= min_side
    (the fast training path, `guie.data.decode`)."""
    return decode_image(data, where, min_side=min_side)


def pil_to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W] (what the Kaggle host feeds the model)."""
    arr = np.array(img.convert("RGB"), dtype=np.uint8)  # a copy: torch wants it writable
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class ImageDataset(torch.utils.data.Dataset):
    """Rows of a sources table (path, offset, length, label) as (image, label, row index,
    (H, W) of the decoded image before the transform: 5th place's aspect-ratio features).

    `transform` turns a PIL image into a tensor (default: uint8 [3, H, W] at its own size).
    Batching with `collate_skip_bad` stacks the tensors, so the transform must give them one
    shape (resize or crop); returning native sizes only works with batch size 1.

    The fast path (`guie.data.decode`, several times faster for a 224 target): a transform with
    a `decode_size` attribute receives uint8 [3, H, W] tensors instead of PIL images, with JPEGs
    decoded at a reduced scale keeping both sides >= decode_size. The `decode_size` argument
    overrides it (0: full size); given with a PIL transform, that transform gets PIL images
    decoded at the reduced scale. Transforms that must see full-resolution pixels (validation,
    the export's preprocessing) declare none.
    """

    def __init__(self, df: pd.DataFrame,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None,
                 verify_crc: bool = True, decode_size: int | None = None):
        # numpy arrays, not a DataFrame or lists of objects: forked workers then share the
        # pages instead of copying them as refcounts change.
        self.paths = df["path"].to_numpy(dtype=str)
        self.offsets = df["offset"].to_numpy(np.int64)
        self.lengths = df["length"].to_numpy(np.int64)
        self.labels = df["label"].to_numpy(np.int64)
        self.transform = transform or pil_to_uint8_tensor
        self.verify_crc = verify_crc
        hint = getattr(transform, "decode_size", None)
        self.pixels_in = hint is not None  # the transform takes uint8 [3, H, W] tensors
        self.decode_size = int(hint or 0) if decode_size is None else int(decode_size)

    def __len__(self) -> int:
        return len(self.labels)

    def where(self, i: int) -> str:
        off = int(self.offsets[i])
        return str(self.paths[i]) if off < 0 else f"{self.paths[i]} @ byte offset {off}"

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int, tuple[int, int]] | None:
        where = self.where(i)
        try:
            data = read_bytes(str(self.paths[i]), int(self.offsets[i]), int(self.lengths[i]),
                              self.verify_crc)
            if self.pixels_in:
                img = decode_pixels(data, where, min_side=self.decode_size)
            else:
                img = decode_rgb(data, where, self.decode_size)
        except (DataError, OSError) as e:
            # DataErrors already name the file and record; bare OSErrors may not.
            msg = str(e) if str(self.paths[i]) in str(e) else f"{where}: {e}"
            warnings.warn(f"skipping a bad image: {msg}", DataWarning, stacklevel=2)
            return None
        # PIL's size is (W, H); a pixel tensor is [3, H, W]. At a reduced decode scale this is
        # the reduced size: the same aspect ratio, to a pixel of rounding.
        size_hw = (img.size[1], img.size[0]) if isinstance(img, Image.Image) else \
            (int(img.shape[-2]), int(img.shape[-1]))
        return self.transform(img), int(self.labels[i]), int(i), size_hw


class Batch(NamedTuple):
    images: torch.Tensor  # [B, ...] as the transform made them
    labels: torch.Tensor  # int64 [B]
    indices: torch.Tensor  # int64 [B], rows of the dataset
    sizes_hw: torch.Tensor  # int64 [B, 2], each image's (H, W) before the transform
    n_bad: int  # items dropped as unreadable


def collate_skip_bad(batch) -> Batch:
    """Stack the readable items of a batch. An all-bad batch gives empty tensors (images of
    shape [0])."""
    good = [b for b in batch if b is not None]
    n_bad = len(batch) - len(good)
    if not good:
        empty = torch.empty(0, dtype=torch.int64)
        return Batch(torch.empty(0, dtype=torch.uint8), empty, empty.clone(),
                     torch.empty(0, 2, dtype=torch.int64), n_bad)
    shapes = {tuple(b[0].shape) for b in good}
    if len(shapes) > 1:
        raise ValueError(f"transform returned tensors of different shapes {sorted(shapes)}; "
                         "make it resize or crop to one size")
    images = torch.stack([b[0] for b in good])
    labels = torch.tensor([b[1] for b in good], dtype=torch.int64)
    indices = torch.tensor([b[2] for b in good], dtype=torch.int64)
    sizes_hw = torch.tensor([b[3] for b in good], dtype=torch.int64)
    return Batch(images, labels, indices, sizes_hw, n_bad)
