"""Deterministic data order, so a resumed run sees exactly the batches an uninterrupted one would.

Micro-batch b of rank r covers global positions [b*B*W + r*B, b*B*W + (r+1)*B) of an endless
sequence of epoch permutations, each seeded by (seed, epoch). Every sample also gets its own seed
for augmentation, so the images are identical whichever worker (or resumed process) loads them.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset

from guie.errors import UserValueError


class BatchOrder:
    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if num_items <= 0:
            raise UserValueError("no training items: check the data sources and class filters")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world = world
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def global_batch_size(self) -> int:
        return self.batch_size * self.world

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(item indices, per-sample seeds) of this rank's micro-batch b."""
        start = b * self.global_batch_size() + self.rank * self.batch_size
        positions = np.arange(start, start + self.batch_size, dtype=np.int64)
        epochs = positions // self.num_items
        indices = np.empty_like(positions)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            indices[mask] = self._permutation(int(epoch))[positions[mask] % self.num_items]
        seeds = (positions * 2654435761 + self.seed * 97) % (2**31 - 1)
        return indices, seeds


class BatchSampler:
    """Yields [(index, seed), ...] for micro-batches start..stop of a BatchOrder."""

    def __init__(self, order: BatchOrder, start: int, stop: int):
        self.order, self.start, self.stop = order, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        for b in range(self.start, self.stop):
            indices, seeds = self.order.batch(b)
            yield list(zip(indices.tolist(), seeds.tolist(), strict=True))


class SeededDataset(Dataset):
    """Wraps a dataset so item (index, seed) is loaded under its own RNG seed."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state = random.getstate()
            random.seed(seed)
            try:
                return self.base[index]
            finally:
                random.setstate(state)
