"""The sample set's held-out split: whole source photos that training never sees.

Views of one photo's regions share its colours, light and texture, so holding out single regions
(the generic `guie.data.sources.split_heldout`) lets a model score by remembering the photo; here
whole photos are held out instead (`photo_split`), from the label ranges `guie.data.sample`
records per photo in the manifest.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from guie.data.errors import DataError
from guie.data.sample import build_sample_data
from guie.data.sources import Split, describe, filter_classes, merge_sources, split_classes
from guie.errors import UserValueError


def photo_label_ranges(out_dir: str | Path) -> list[dict]:
    """[{"photo", "domain", "labels": [first, end)}] of a built sample set (merged labels)."""
    manifest = json.loads((Path(out_dir) / "manifest.json").read_text())
    return manifest["photos"]


def photo_split(df, cfg, photos: list[dict]) -> tuple:
    """Held-out classes and distractors from whole source photos that training never sees.

    Views of one photo's regions share its colours, light and texture, so holding out single
    regions (the generic `split_heldout`) lets a model score by remembering the photo. Here the
    photos are shuffled (`split_seed`) and taken until their instances number at least
    `heldout_classes + distractor_classes`; among those instances `heldout_classes` become
    queries + index and `distractor_classes` pad the index; their remaining instances are used
    nowhere. Training keeps every instance of every other photo."""
    rng = np.random.default_rng(cfg.split_seed)
    need = cfg.heldout_classes + cfg.distractor_classes
    held_photos, held_labels = [], []
    for i in rng.permutation(len(photos)):
        if len(held_labels) >= need:
            break
        lo, hi = photos[i]["labels"]
        held_photos.append(photos[i]["photo"])
        held_labels.extend(range(lo, hi))
    if len(held_photos) == len(photos):
        raise UserValueError(f"data: holding out {need} classes takes every sample photo; lower "
                             "heldout_classes/distractor_classes or raise sample_instances")
    counts = df["label"].value_counts()
    held_counts = counts[counts.index.isin(held_labels)]
    split = split_classes(df, cfg, rng, held_counts, kept_out=np.asarray(held_labels),
                          where=f" in photos {held_photos}")
    return split, held_photos


def load_sample_split(cfg) -> tuple:
    """`guie.data.sources.load_split` for the sample set (`cfg.sample_instances > 0`): build or
    reuse it under `cfg.root`, then hold out whole photos (`photo_split`), then filter the
    training part. Returns (Split, the held-out photos' names)."""
    sources = build_sample_data(cfg.root, num_instances=cfg.sample_instances,
                                views_per_instance=cfg.sample_views)
    split, held_photos = photo_split(merge_sources(sources, cfg.root, cfg.verify_crc), cfg,
                                     photo_label_ranges(cfg.root))
    train = filter_classes(split.train, cfg.min_per_class, cfg.max_per_class,
                           cfg.resample_min_per_class, cfg.split_seed)
    if not len(train):
        raise DataError(f"no training images left after filtering (min_per_class="
                        f"{cfg.min_per_class}); before filtering: {describe(split.train)}")
    return Split(train=train, query=split.query, index=split.index), held_photos
