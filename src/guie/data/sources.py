"""Data sources -> one table of images, label filtering, and the held-out validation split.

Every image is a row: `path` (absolute), `offset`/`length` (the record payload inside a
TFRecord shard; -1 for image files), `label` (global: local label + the source's
label_offset), `domain` and `source`. Rows carry no pixels, so millions fit in memory.

Validation mimics Kaggle: held-out classes never seen in training are split into queries and
an index, and further unseen "distractor" classes pad the index with wrong answers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from guie.config import DataConfig, DataSource
from guie.data.errors import DataError
from guie.data.tfrecord import index_shard

__all__ = ["Split", "load_source", "merge_sources", "filter_classes", "split_heldout", "load_split",
           "describe", "COLUMNS"]

COLUMNS = ("path", "offset", "length", "label", "domain", "source")
_MAX_REPORTED_ERRORS = 5


@dataclass
class Split:
    train: pd.DataFrame
    query: pd.DataFrame
    index: pd.DataFrame  # has a bool column `distractor`


def _resolve(location: str, root: str | Path) -> Path:
    p = Path(location).expanduser()
    return (p if p.is_absolute() else Path(root).expanduser() / p).absolute()


def _frame(path, offset, length, label, domain, source: str) -> pd.DataFrame:
    n = len(path)
    return pd.DataFrame({
        "path": pd.Series(path, dtype=object),
        "offset": np.asarray(offset, np.int64).reshape(n),
        "length": np.asarray(length, np.int64).reshape(n),
        "label": np.asarray(label, np.int64).reshape(n),
        "domain": pd.Series(domain, dtype=object),
        "source": pd.Series([source] * n, dtype=object),
    })


def _load_tfrecord(src: DataSource, location: Path, verify_crc: bool) -> pd.DataFrame:
    if not location.is_dir():
        raise DataError(f"source {src.name!r}: shard folder {location} does not exist")
    shards = sorted(p for p in location.rglob(src.pattern) if p.is_file())
    if not shards:
        raise DataError(f"source {src.name!r}: no shards match {src.pattern!r} under {location}")
    parts = []
    for shard in tqdm(shards, desc=f"index {src.name}", unit="shard", disable=len(shards) < 8):
        idx = index_shard(shard, verify_crc=verify_crc)
        n = len(idx)
        domain = list(idx.domains) if idx.domains is not None else [src.domain] * n
        parts.append(_frame([idx.path] * n, idx.offsets, idx.lengths, idx.labels, domain,
                            src.name))
    return pd.concat(parts, ignore_index=True)


def _csv_error(csv: Path, errors: list[str], total: int) -> DataError:
    more = f" (and {total - len(errors)} more)" if total > len(errors) else ""
    return DataError(f"{csv}: " + "; ".join(errors) + more)


def _load_csv(src: DataSource, csv: Path) -> pd.DataFrame:
    if not csv.is_file():
        raise DataError(f"source {src.name!r}: CSV {csv} does not exist")
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    missing = [c for c in ("path", "label") if c not in table.columns]
    if missing:
        raise DataError(f"{csv}: header (row 0) lacks column(s) {missing}; expected path,label "
                        f"(found {list(table.columns)})")
    # Row numbers count data rows from 1; the file line is one more because of the header.
    errors: list[str] = []
    total = 0
    labels = pd.to_numeric(table["label"].str.strip(), errors="coerce")
    bad = ~labels.notna() | (labels < 0) | (labels != labels.round())
    for i in np.flatnonzero(bad.to_numpy()):
        total += 1
        if len(errors) < _MAX_REPORTED_ERRORS:
            errors.append(f"row {i + 1} (line {i + 2}), field 'label': "
                          f"{table['label'].iat[i]!r} is not a non-negative integer")
    base = csv.parent.absolute()
    paths = [os.path.normpath(base / p) for p in table["path"]]
    for i, (rel, p) in enumerate(zip(table["path"], paths, strict=True)):
        if not rel or not os.path.isfile(p):
            total += 1
            if len(errors) < _MAX_REPORTED_ERRORS:
                errors.append(f"row {i + 1} (line {i + 2}), field 'path': image {rel!r} "
                              f"not found ({p})")
    if total:
        raise _csv_error(csv, errors, total)
    if not len(table):
        raise DataError(f"{csv}: no rows")
    domain = table["domain"].tolist() if "domain" in table.columns else [src.domain] * len(table)
    n = len(table)
    return _frame(paths, np.full(n, -1), np.full(n, -1), labels.to_numpy(np.int64), domain,
                  src.name)


def load_source(src: DataSource, root: str | Path, verify_crc: bool = True) -> pd.DataFrame:
    """All images of one source; labels shifted by `src.label_offset`.

    Per-image domains come from the data when it has them (a CSV `domain` column, or an
    `image/domain` feature in every record of a shard), else `src.domain`."""
    location = _resolve(src.location, root)
    if src.kind == "tfrecord":
        df = _load_tfrecord(src, location, verify_crc)
    elif src.kind == "csv":
        df = _load_csv(src, location)
    else:
        raise DataError(f"source {src.name!r}: unknown kind {src.kind!r}")
    df["label"] += int(src.label_offset)
    return df


def merge_sources(sources, root: str | Path, verify_crc: bool = True) -> pd.DataFrame:
    """Concatenate sources; their global label ranges must not overlap."""
    sources = tuple(sources)
    if not sources:
        raise DataError("no data sources configured")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise DataError(f"data source names must be unique, got {names}")
    frames = [load_source(s, root, verify_crc) for s in sources]
    ranges = sorted((int(f["label"].min()), int(f["label"].max()), s.name)
                    for s, f in zip(sources, frames, strict=True))
    for (lo_a, hi_a, a), (lo_b, hi_b, b) in zip(ranges, ranges[1:], strict=False):
        if lo_b <= hi_a:
            raise DataError(
                f"label ranges overlap: source {a!r} has labels {lo_a}..{hi_a} and source "
                f"{b!r} has {lo_b}..{hi_b}; give {b!r} a label_offset that moves it past "
                f"{hi_a} (e.g. raise its label_offset by {hi_a - lo_b + 1})")
    return pd.concat(frames, ignore_index=True)


def _rank_in_class(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random 0-based rank of each row within its class (seeded, order-independent ties)."""
    order = np.lexsort((rng.random(len(labels)), labels))
    sorted_labels = labels[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_labels)) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(labels)]))
    rank = np.empty(len(labels), np.int64)
    rank[order] = np.arange(len(labels)) - group_start
    return rank


def filter_classes(df: pd.DataFrame, min_per_class: int, max_per_class: int = 0,
                   resample_min_per_class: int = 0, seed: int = 0) -> pd.DataFrame:
    """Drop classes under `min_per_class` images, keep a seeded sample of at most
    `max_per_class` (0 = no cap), then repeat rows of classes under `resample_min_per_class`
    until they reach it (whole copies first, a seeded subset for the remainder)."""
    if not len(df):
        return df.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    labels = df["label"].to_numpy(np.int64)
    counts = pd.Series(labels).map(pd.Series(labels).value_counts()).to_numpy()
    keep = counts >= min_per_class
    if max_per_class > 0:
        keep &= _rank_in_class(labels, rng) < max_per_class
    df = df[keep].reset_index(drop=True)
    if resample_min_per_class <= 0 or not len(df):
        return df
    labels = df["label"].to_numpy(np.int64)
    counts = pd.Series(labels).map(pd.Series(labels).value_counts()).to_numpy()
    need = np.maximum(resample_min_per_class - counts, 0)
    rank = _rank_in_class(labels, rng)
    copies = 1 + need // counts + (rank < need % counts)
    # Repeats sit next to their original row, so the table stays in source order.
    return df.loc[np.repeat(np.arange(len(df)), copies)].reset_index(drop=True)


def _pick(classes: np.ndarray, k: int, rng: np.random.Generator, what: str) -> np.ndarray:
    if k > len(classes):
        raise DataError(f"need {k} {what} but only {len(classes)} classes qualify")
    return np.sort(rng.permutation(classes)[:k])


def split_heldout(df: pd.DataFrame, cfg: DataConfig) -> Split:
    """Seeded held-out split (see the module doc). Held-out classes need at least
    `queries_per_class + 1` images and distractor classes `distractors_per_class`; both
    sets are disjoint and absent from `train`."""
    rng = np.random.default_rng(cfg.split_seed)
    return split_classes(df, cfg, rng, df["label"].value_counts().sort_index())


def split_classes(df: pd.DataFrame, cfg: DataConfig, rng: np.random.Generator,
                  candidates: pd.Series, kept_out: np.ndarray | None = None,
                  where: str = "") -> Split:
    """Held-out classes and distractors picked (in this order, with `rng`) among `candidates`
    (label -> image count, in the order given); training is every row whose label is not in
    `kept_out` (default: the picked classes). The sample set's photo split passes the labels of
    whole held-out photos (`guie.data.sample_split.photo_split`)."""
    q = cfg.queries_per_class
    heldout = _pick(candidates.index[candidates >= q + 1].to_numpy(), cfg.heldout_classes, rng,
                    f"held-out classes (>= {q + 1} images each){where}")
    rest = candidates.drop(heldout)
    distract = _pick(rest.index[rest >= max(cfg.distractors_per_class, 1)].to_numpy(),
                     cfg.distractor_classes, rng,
                     f"distractor classes (>= {cfg.distractors_per_class} images each)")

    labels = df["label"].to_numpy()
    in_heldout = np.isin(labels, heldout)
    in_distract = np.isin(labels, distract)
    rank = _rank_in_class(labels, rng)
    is_query = in_heldout & (rank < q)
    is_index = (in_heldout & ~is_query) | (in_distract & (rank < cfg.distractors_per_class))

    index = df[is_index].reset_index(drop=True)
    index["distractor"] = np.isin(index["label"].to_numpy(), distract)
    out = (in_heldout | in_distract) if kept_out is None else np.isin(labels, kept_out)
    return Split(
        train=df[~out].reset_index(drop=True),
        query=df[is_query].reset_index(drop=True),
        index=index,
    )


def load_split(cfg: DataConfig) -> Split:
    """Merge the configured sources, split off validation, then filter the training part.

    With `cfg.sample_instances > 0` the kit's sample data set is built (or reused) under
    `cfg.root` and replaces `cfg.sources`."""
    sources = cfg.sources
    if cfg.sample_instances > 0:
        from guie.data.sample import build_sample_data  # PIL work only when asked for

        sources = build_sample_data(cfg.root, num_instances=cfg.sample_instances,
                                    views_per_instance=cfg.sample_views)
    split = split_heldout(merge_sources(sources, cfg.root, cfg.verify_crc), cfg)
    train = filter_classes(split.train, cfg.min_per_class, cfg.max_per_class,
                           cfg.resample_min_per_class, cfg.split_seed)
    if not len(train):
        raise DataError(f"no training images left after filtering (min_per_class="
                        f"{cfg.min_per_class}); before filtering: {describe(split.train)}")
    return Split(train=train, query=split.query, index=split.index)


def describe(df: pd.DataFrame) -> dict:
    """Counts for logs: images, classes, label range, and images/classes per source/domain."""
    def groups(col: str) -> dict:
        if col not in df.columns or not len(df):
            return {}
        g = df.groupby(col)["label"]
        return {str(k): {"images": int(n), "classes": int(c)}
                for (k, n), c in zip(g.size().items(), g.nunique(), strict=True)}

    empty = not len(df)
    return {
        "images": int(len(df)),
        "classes": int(df["label"].nunique()) if not empty else 0,
        "label_min": None if empty else int(df["label"].min()),
        "label_max": None if empty else int(df["label"].max()),
        "per_source": groups("source"),
        "per_domain": groups("domain"),
    }
