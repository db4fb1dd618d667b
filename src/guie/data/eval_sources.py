"""Evaluation sources: retrieval benchmarks scored beside the held-out split, never trained on.

Held-out classes share their training sets' domains, while the competition's test covers eleven,
several in no training set; top teams therefore validated on a separate multi-domain set (the 5th
place on GPR1200) and on their own folders. An evaluation source is one of:

- `folders`: `<location>/<class>/<image>`, one sub-folder per class;
- `csv`: `path,label[,domain]` rows, paths relative to the CSV's folder;
- `gpr1200`: GPR1200 as its download unpacks (`images/<class>_<original name>.jpg`, 1,200 classes
  x 10 images). Its six domains are ranges of 200 class numbers, in the order of the dataset's
  README and of the per-part scores of its evaluation code (Visual-Computing/GPR1200,
  eval/GPR1200.py: images sorted by class, 2,000 per part): Google Landmarks v2, iNaturalist,
  ImageNet Sketch, INSTRE, Stanford Online Products, IMDB-WIKI faces.

Rows have the training table's columns (`path`, `offset` -1, `length` -1, `label` local to the
source, `domain`, `source`) plus `query`. A file whose bytes also appear in a training source is
dropped (compared by SHA-256, only among files of equal size), so nothing scored was trained on.
"""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from guie.config import EvalSource
from guie.data.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# (first class number, one past the last, domain): the six parts GPR1200 itself names.
GPR1200_DOMAINS = ((0, 200, "landmarks"), (200, 400, "nature"), (400, 600, "sketches"),
                   (600, 800, "objects (INSTRE)"), (800, 1000, "products"), (1000, 1200, "faces"))


def _resolve(location: str, root: str | Path) -> Path:
    p = Path(location).expanduser()
    return (p if p.is_absolute() else Path(root).expanduser() / p).absolute()


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _gpr1200_domain(class_number: int) -> str:
    for first, stop, domain in GPR1200_DOMAINS:
        if first <= class_number < stop:
            return domain
    return "other"


def _rows_folders(src: EvalSource, folder: Path) -> list[tuple[str, str, str]]:
    if not folder.is_dir():
        raise DataError(f"evaluation source {src.name!r}: folder {folder} does not exist")
    rows = [(str(p), p.relative_to(folder).parts[0], src.domain or src.name)
            for p in _images(folder) if len(p.relative_to(folder).parts) >= 2]
    if not rows:
        raise DataError(f"evaluation source {src.name!r}: no images in class sub-folders of "
                        f"{folder} (expected {folder}/<class>/<image>)")
    return rows


def _rows_csv(src: EvalSource, csv_path: Path) -> list[tuple[str, str, str]]:
    if not csv_path.is_file():
        raise DataError(f"evaluation source {src.name!r}: CSV {csv_path} does not exist")
    rows = []
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        for line_no, row in enumerate(csv.DictReader(f), start=2):
            path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
            if not path or not label:
                raise DataError(f"{csv_path}, row {line_no}: needs a path and a label "
                                f"(columns path,label[,domain]; got {row})")
            image = (csv_path.parent / path).absolute()
            if not image.is_file():
                raise DataError(f"{csv_path}, row {line_no}: {image} does not exist")
            rows.append((str(image), label, (row.get("domain") or "").strip()
                         or src.domain or src.name))
    return rows


def _rows_gpr1200(src: EvalSource, folder: Path) -> list[tuple[str, str, str]]:
    images = folder / "images" if (folder / "images").is_dir() else folder
    rows = []
    for p in _images(images):
        number = p.name.split("_", 1)[0]
        if "_" not in p.name or not number.isdigit():
            raise DataError(f"evaluation source {src.name!r}: {p} is not named "
                            "<class>_<name> as GPR1200's images are")
        rows.append((str(p), number, src.domain or _gpr1200_domain(int(number))))
    if not rows:
        raise DataError(f"evaluation source {src.name!r}: no images in {images} (GPR1200 unpacks "
                        "to images/<class>_<name>.jpg)")
    return rows


def load_eval_source(src: EvalSource, root: str | Path) -> pd.DataFrame:
    """The source's images as rows, with `query` marking the queries (all of them for
    leave-one-out, else the first `queries_per_class` of each class)."""
    location = _resolve(src.location, root)
    read = {"folders": _rows_folders, "csv": _rows_csv, "gpr1200": _rows_gpr1200}[src.kind]
    rows = read(src, location)
    names = sorted({label for _, label, _ in rows})
    ids = {name: i for i, name in enumerate(names)}
    frame = pd.DataFrame({
        "path": pd.Series([r[0] for r in rows], dtype=object),
        "offset": np.full(len(rows), -1, np.int64), "length": np.full(len(rows), -1, np.int64),
        "label": np.asarray([ids[r[1]] for r in rows], np.int64),
        "domain": pd.Series([r[2] for r in rows], dtype=object),
        "source": pd.Series([src.name] * len(rows), dtype=object),
        "class_name": pd.Series([r[1] for r in rows], dtype=object),
    }).sort_values("path", ignore_index=True)
    if src.queries_per_class > 0:
        rank = frame.groupby("label").cumcount()
        frame["query"] = rank < src.queries_per_class
    else:
        frame["query"] = True
    return frame


def _sha256_of(path: str, offset: int = -1, length: int = -1) -> str:
    with open(path, "rb") as f:
        if offset >= 0:
            f.seek(offset)
            return hashlib.sha256(f.read(length)).hexdigest()
        return hashlib.sha256(f.read()).hexdigest()


def drop_training_duplicates(frame: pd.DataFrame, train: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The evaluation rows whose bytes appear in no training row, and how many were dropped.

    Only files of a size some training image also has are hashed, so a benchmark beside tens of
    GB of shards costs a few reads, not a pass over the shards."""
    sizes = np.array([Path(p).stat().st_size for p in frame["path"]], np.int64)
    train_sizes = np.where(train["length"].to_numpy() >= 0, train["length"].to_numpy(),
                           [Path(p).stat().st_size if o < 0 else 0
                            for p, o in zip(train["path"], train["offset"], strict=True)])
    shared = np.isin(sizes, train_sizes)
    if not shared.any():
        return frame, 0
    candidates = train[np.isin(train_sizes, sizes[shared])]
    trained = {_sha256_of(p, int(o), int(n)) for p, o, n in
               zip(candidates["path"], candidates["offset"], candidates["length"], strict=True)}
    duplicate = np.zeros(len(frame), bool)
    for i in np.flatnonzero(shared):
        duplicate[i] = _sha256_of(frame["path"].iloc[i]) in trained
    return frame[~duplicate].reset_index(drop=True), int(duplicate.sum())
