"""A stage's micro-batches: rows of the feature cache, or decoded and augmented images."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from guie.config import StageConfig
from guie.data.augment import EvalTransform, TrainTransform
from guie.data.dataset import ImageDataset, collate_skip_bad
from guie.data.preprocess import Preprocess
from guie.train.features import FeatureCache
from guie.train.order import BatchOrder, BatchSampler, SeededDataset


def cache_transforms(stage: StageConfig, preprocess: Preprocess) -> list:
    """View 0: the plain preprocessing; further views: the stage's augmentations."""
    extra = [TrainTransform(stage.augment, preprocess)] * (stage.cache_views - 1)
    return [EvalTransform(preprocess)] + extra


def cached_batches(cache: FeatureCache, rows: np.ndarray, order: BatchOrder, start: int,
                   stop: int):
    """(features, None, labels) per micro-batch: each row's view picked by its batch seed (the
    sizes are in the features already: None)."""
    labels = torch.from_numpy(cache.labels)
    for b in range(start, stop):
        picks, seeds = order.batch(b)
        idx = rows[picks]
        views = seeds % cache.features.shape[0]
        feats = torch.from_numpy(np.asarray(cache.features[views, idx], dtype=np.float32))
        yield feats, None, labels[idx]


def image_batches(train_df: pd.DataFrame, order: BatchOrder, start: int, stop: int,
                  stage: StageConfig, preprocess: Preprocess, num_workers: int):
    """(images, sizes_hw, labels) per micro-batch: decoded and augmented, with the images'
    sizes before the transform."""
    dataset = SeededDataset(ImageDataset(train_df.reset_index(drop=True),
                                         TrainTransform(stage.augment, preprocess)))
    loader = DataLoader(dataset, batch_sampler=BatchSampler(order, start, stop),
                        num_workers=num_workers, collate_fn=collate_skip_bad,
                        generator=torch.Generator(),  # keep the global RNG untouched
                        pin_memory=torch.cuda.is_available(),
                        persistent_workers=num_workers > 0)
    for batch in loader:
        yield batch.images, batch.sizes_hw, batch.labels


def blank_batch(preprocess: Preprocess) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two black preprocessed images (two: a BatchNorm head rejects batches of one), label 0."""
    side = preprocess.image_size
    images = preprocess(torch.zeros(2, 3, side, side, dtype=torch.uint8))
    return images, torch.zeros(2, dtype=torch.int64), torch.full((2, 2), side)
