"""Backbone features of a set of images: computed in batches, or cached on disk (memory-mapped).

The cache serves the frozen-backbone stages (3rd place's stage 1: 20 passes over 885k images
would otherwise re-run ViT-H 20 times). Its key covers the data, the backbone and its weights,
and the preprocessing, so a stale cache is never reused. Building it is resumable: rows are
written in order and the count of finished rows is saved after every chunk.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from guie.data.dataset import ImageDataset, collate_skip_bad
from guie.errors import UserValueError
from guie.model import EmbeddingModel
from guie.train import dist
from guie.train.amp import inference_autocast
from guie.train.order import SeededDataset


@torch.no_grad()
def compute_features(model: EmbeddingModel, df: pd.DataFrame, transform, batch_size: int,
                     num_workers: int, device: torch.device, desc: str = "features",
                     seed: int | None = None, feature_dtype=torch.float32,
                     progress: bool = True, first_row: int = 0):
    """The head's inputs [N, D] of every row (`EmbeddingModel.features`: the backbone feature,
    plus the aspect-ratio features if the model takes them), with a validity mask [N]
    (corrupt images are False). Runs the backbone on `device`. With `seed`, row i's random
    transform draws from its own seed, a function of `seed` and its row number in the whole
    table (`first_row` + i), so a chunk or a rank's share gets what the whole table would."""
    dataset = ImageDataset(df, transform)
    if seed is not None:
        dataset = SeededDataset(dataset)
        items = [(i, (seed * 1_000_003 + first_row + i) % (2**31 - 1))
                 for i in range(len(df))]
    else:
        items = list(range(len(df)))
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                        collate_fn=collate_skip_bad, generator=torch.Generator())
    out: torch.Tensor | None = None
    valid = torch.zeros(len(df), dtype=torch.bool)
    model.visual.to(device).eval()
    autocast = inference_autocast(device)
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not progress):
        if len(batch.indices) == 0:
            continue
        with autocast:
            feats = model.features(batch.images.to(device, non_blocking=True),
                                   batch.sizes_hw).float().cpu()
        if out is None:
            out = torch.zeros(len(df), feats.shape[1], dtype=feature_dtype)
        out[batch.indices] = feats.to(feature_dtype)
        valid[batch.indices] = True
    if out is None:
        raise UserValueError(f"{desc}: not one of {len(df)} images could be read")
    return out, valid


def cache_key(parts: dict, df: pd.DataFrame) -> str:
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    h.update(pd.util.hash_pandas_object(df[["path", "offset", "label"]], index=False).values
             .tobytes())
    return h.hexdigest()[:20]


@dataclass
class FeatureCache:
    features: np.ndarray  # [views, N, D] float16, memory-mapped
    valid: np.ndarray  # [N] bool
    labels: np.ndarray  # [N] int64
    path: Path


@dataclass(frozen=True)
class CacheRequest:
    """What `build_feature_cache` caches: the head's inputs of `rows` under each of
    `transforms`, under `cache_dir/key`, computed `batch_size` images at a time."""

    rows: pd.DataFrame
    transforms: list  # view 0: the plain preprocessing
    key: str  # `cache_key`: a stale cache is never reused
    cache_dir: Path
    batch_size: int
    num_workers: int
    device: torch.device
    chunk_rows: int = 4096  # rows between two progress records (the resume granularity)


def build_feature_cache(model: EmbeddingModel, request: CacheRequest) -> FeatureCache:
    """Cache the head's inputs (`compute_features`) of every row under each transform (view 0 is
    the plain preprocessing)."""
    df, transforms, device = request.rows, request.transforms, request.device
    folder = Path(request.cache_dir) / request.key
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / "meta.json"
    if meta_path.exists():
        return _open_cache(folder)
    n, views = len(df), len(transforms)
    rank, world = dist.rank(), dist.world_size()
    feat_path = folder / "features.npy"
    if dist.is_main() and not feat_path.exists():
        probe, _ = compute_features(model, df.iloc[:1], transforms[0], 1, 0, device, "probe")
        dim = probe.shape[1]
        tmp = folder / "features.tmp.npy"
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(views, n, dim)).flush()
        os.replace(tmp, feat_path)
    dist.barrier()
    feats = np.load(feat_path, mmap_mode="r+")
    # Each rank fills a contiguous slice of rows, and records progress per view as it goes.
    lo, hi = rank * n // world, (rank + 1) * n // world
    progress_path = folder / f"progress-rank{rank}-of{world}.json"
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else {}
    valid_path = folder / f"valid-rank{rank}-of{world}.npy"
    valid = np.load(valid_path) if valid_path.exists() else np.zeros((views, n), dtype=bool)
    for view, transform in enumerate(transforms):
        done = progress.get(str(view), lo)
        bar = tqdm(total=hi - lo, initial=done - lo, desc=f"feature cache view {view}",
                   dynamic_ncols=True, disable=not dist.is_main())
        while done < hi:
            stop = min(done + request.chunk_rows, hi)
            # seeds by view and global row: the cache is the same whatever the chunks and ranks
            chunk, ok = compute_features(model, df.iloc[done:stop], transform,
                                         request.batch_size, request.num_workers, device,
                                         "chunk", seed=view, progress=False, first_row=done)
            feats[view, done:stop] = chunk.numpy().astype(np.float16)
            valid[view, done:stop] = ok.numpy()
            feats.flush()
            np.save(valid_path, valid)
            progress[str(view)] = done = stop
            progress_path.write_text(json.dumps(progress))
            bar.update(stop - bar.n - lo)
        bar.close()
    dist.barrier()
    if dist.is_main():
        merged = np.zeros(n, dtype=bool)
        for r in range(world):
            part = np.load(folder / f"valid-rank{r}-of{world}.npy")
            r_lo, r_hi = r * n // world, (r + 1) * n // world
            merged[r_lo:r_hi] = part[:, r_lo:r_hi].all(axis=0)
        np.save(folder / "valid.npy", merged)
        np.save(folder / "labels.npy", df["label"].to_numpy(dtype=np.int64))
        meta_path.write_text(json.dumps({"rows": n, "views": views, "dim": feats.shape[2]}))
    dist.barrier()
    return _open_cache(folder)


def _open_cache(folder: Path) -> FeatureCache:
    return FeatureCache(features=np.load(folder / "features.npy", mmap_mode="r"),
                        valid=np.load(folder / "valid.npy"),
                        labels=np.load(folder / "labels.npy"), path=folder)
