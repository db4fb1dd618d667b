"""Verification of fetched data: every record's CRC, every (or a sampled share of) image decoded,
labels inside the range the dataset's name promises and below the config's num_classes.

Shards and image batches are checked in a process pool; a failure names the files at fault.
"""
from __future__ import annotations

import os
import re
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from guie.config import DataSource
from guie.data.errors import DataError, DataWarning
from guie.data.guarded_decode import decode_guarded
from guie.data.sources import load_source
from guie.data.tfrecord import IMAGE_KEY, index_shard, parse_example

_RECORD_HEADER_BYTES = 12  # uint64 length + its CRC before each record's payload
_LABEL_RANGE = re.compile(r"label-(\d+)-(\d+)")
_FILES_PER_TASK = 256  # image files per verification task (CSV sources)
_LISTED_PROBLEMS = 20


class VerificationError(DataError):
    """Damaged data; `files` are the downloaded files at fault (deleted so they are fetched
    again)."""

    def __init__(self, message: str, files: set[str]):
        super().__init__(message)
        self.files = files



def expected_label_range(slug: str) -> tuple[int, int] | None:
    """The label range a motono-style dataset name promises (`...-label-1000-10690`)."""
    match = _LABEL_RANGE.search(slug)
    return (int(match.group(1)), int(match.group(2))) if match else None



def _check_image(data: bytes, where: str) -> None:
    """What `guie.data.dataset.decode_rgb` checks (the same guarded decode and pixel cap),
    decoding JPEGs at 1/8 scale: every entropy-coded byte is still read (a truncated or damaged
    stream fails) at a fraction of the cost of a full decode."""
    decode_guarded(data, where, draft_scale=lambda img: 8)


def _sample(n: int, fraction: float, key: str) -> np.ndarray:
    if fraction >= 1:
        return np.arange(n)
    rng = np.random.default_rng(zlib.crc32(key.encode()))  # the same sample on every run
    return np.sort(rng.permutation(n)[:int(np.ceil(n * max(fraction, 0.0)))])


def _check_shard(path: str, fraction: float) -> dict:
    """Index a shard from scratch (every record's CRCs) and decode its images."""
    out = {"files": [path], "bytes": os.path.getsize(path), "labels": np.empty(0, np.int64),
           "corrupt": [], "checked": 0, "error": None}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DataWarning)
            # no index cache: a sidecar could stand for an earlier copy of this file
            index = index_shard(path, verify_crc=True, use_cache=False)
    except DataError as e:
        out["error"] = str(e)
        return out
    out["corrupt"] = [(path, str(w.message)) for w in caught if issubclass(w.category, DataWarning)]
    out["labels"] = index.labels
    chosen = _sample(len(index), fraction, path)
    with open(path, "rb") as f:
        for i in chosen:
            offset = int(index.offsets[i])
            where = f"{path}: record at byte offset {offset - _RECORD_HEADER_BYTES}"
            try:
                f.seek(offset)
                image = parse_example(f.read(int(index.lengths[i])), [IMAGE_KEY]).get(IMAGE_KEY)
                if not image:
                    raise DataError(f"{where}: no {IMAGE_KEY!r}")
                _check_image(image[0], where)
            except DataError as e:
                out["corrupt"].append((path, str(e) if path in str(e) else f"{where}: {e}"))
    out["checked"] = len(chosen)
    return out


def _check_files(paths: list[str], fraction: float) -> dict:
    out = {"files": [], "bytes": sum(os.path.getsize(p) for p in paths), "corrupt": [],
           "checked": 0, "error": None}
    chosen = _sample(len(paths), fraction, paths[0] if paths else "")
    for i in chosen:
        try:
            _check_image(Path(paths[i]).read_bytes(), paths[i])
        except (DataError, OSError) as e:
            out["corrupt"].append((paths[i], str(e)))
    out["checked"] = len(chosen)
    return out


def _run(tasks: list, workers: int, total_bytes: int | None, desc: str,
         progress: bool) -> list[dict]:
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc,
               disable=None if progress else True)
    results = []
    if workers <= 1 or len(tasks) <= 1:
        for fn, *args in tasks:
            results.append(fn(*args))
            bar.update(results[-1]["bytes"])
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for future in as_completed([pool.submit(fn, *args) for fn, *args in tasks]):
                results.append(future.result())
                bar.update(results[-1]["bytes"])
    bar.close()
    return results


def verify_source(src: DataSource, root: str | Path, image_fraction: float = 1.0,
                  workers: int = 1, max_corrupt_records: int = 0, num_classes: int = 0,
                  expected_range: tuple[int, int] | None = None, progress: bool = True) -> dict:
    """Check every record (CRCs), images (all, or a seeded share) and the label range of one
    source; a summary for the manifest. VerificationError names the damaged files."""
    location = (Path(root) / src.location).absolute()
    if src.kind == "tfrecord":
        shards = sorted(p for p in location.rglob(src.pattern) if p.is_file()
                        ) if location.is_dir() else []
        if not shards:
            raise DataError(f"source {src.name!r}: no shards match {src.pattern!r} "
                            f"under {location}")
        tasks = [(_check_shard, str(p), image_fraction) for p in shards]
        labels = None
    else:
        table = load_source(src, root, verify_crc=False)  # every row's path exists, labels parse
        paths = table["path"].tolist()
        tasks = [(_check_files, paths[i:i + _FILES_PER_TASK], image_fraction)
                 for i in range(0, len(paths), _FILES_PER_TASK)]
        labels = table["label"].to_numpy(np.int64) - src.label_offset
    total = sum(os.path.getsize(t[1]) for t in tasks) if labels is None else None
    results = sorted(_run(tasks, workers, total, f"verify {src.name}", progress),
                     key=lambda r: r["files"][:1])
    errors = [r for r in results if r["error"]]
    if errors:
        raise VerificationError("; ".join(r["error"] for r in errors[:5]),
                                {f for r in errors for f in r["files"]})
    if labels is None:
        labels = np.concatenate([r["labels"] for r in results])
    corrupt = [c for r in results for c in r["corrupt"]]
    if len(corrupt) > max_corrupt_records:
        raise VerificationError(
            f"source {src.name!r}: {len(corrupt)} corrupt record(s) or image(s), more than the "
            f"{max_corrupt_records} accepted (--max-corrupt N accepts them): "
            + "; ".join(msg for _, msg in corrupt[:5]), {f for f, _ in corrupt})
    _check_labels(src, labels, expected_range, num_classes)
    report = {
        "source": asdict(src),
        "records": int(len(labels)),
        "classes": int(np.unique(labels).size),
        "label_min": int(labels.min()) + src.label_offset,
        "label_max": int(labels.max()) + src.label_offset,
        "expected_label_range": list(expected_range) if expected_range else None,
        "bytes": int(sum(r["bytes"] for r in results)) + (
            location.stat().st_size if src.kind == "csv" else 0),
        "corrupt_records": len(corrupt),
        "corrupt": [msg for _, msg in corrupt[:_LISTED_PROBLEMS]],
        "images_checked": int(sum(r["checked"] for r in results)),
        "image_fraction": image_fraction,
    }
    if src.kind == "tfrecord":
        report["shards"] = [{"file": Path(r["files"][0]).relative_to(
                                 Path(root).absolute()).as_posix(),
                             "bytes": r["bytes"], "records": int(len(r["labels"])),
                             "corrupt_records": len(r["corrupt"])} for r in results]
    return report


def _check_labels(src: DataSource, labels: np.ndarray, expected: tuple[int, int] | None,
                  num_classes: int) -> None:
    if not len(labels):
        raise DataError(f"source {src.name!r}: no records")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise DataError(f"source {src.name!r}: negative labels (down to {lo})")
    if expected and (lo < expected[0] or hi > expected[1]):
        outside = int(((labels < expected[0]) | (labels > expected[1])).sum())
        raise DataError(f"source {src.name!r}: {outside} record(s) have labels outside "
                        f"{expected[0]}..{expected[1]}, the range its dataset's name promises "
                        f"(found {lo}..{hi}): a different or damaged dataset?")
    top = hi + src.label_offset
    if num_classes and top >= num_classes:
        raise DataError(f"source {src.name!r}: label {hi} + label_offset {src.label_offset} = "
                        f"{top} is not below the config's num_classes {num_classes}")
