"""Labels for an index folder and the leave-one-out mP@5 they allow.

Labels come from one sub-folder per class (`cats/a.jpg` has label `cats`) or from a CSV of
`path,label` rows (paths relative to the index folder; a `path,label` header is optional).

Leave-one-out: every labelled image whose class has at least one other indexed image queries
all other indexed images (unlabelled ones stay in as distractors) with the official metric
(`guie.metrics.mean_precision_at_k`). Images alone in their class cannot be queries: they stay
in the index and their classes are counted and listed.
"""
from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from guie.errors import UserValueError
from guie.metrics import knn, mean_precision_at_k


def labels_from_folders(paths: Sequence[str]) -> dict[str, str] | None:
    """{path: first folder} when every path lies in a sub-folder and there are >= 2 of them."""
    parts = [p.split("/") for p in paths]
    if not parts or any(len(p) < 2 for p in parts):
        return None
    labels = {path: p[0] for path, p in zip(paths, parts, strict=True)}
    return labels if len(set(labels.values())) >= 2 else None


def labels_from_csv(csv_path: Path | str, root: Path | str) -> dict[str, str]:
    """{path relative to root: label} from `path,label` rows."""
    csv_path, root = Path(csv_path), Path(root).resolve()
    labels: dict[str, str] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise UserValueError(f"{csv_path}:{line_no}: expected 'path,label', got {row!r}")
            path, label = row[0].strip(), row[1].strip()
            if line_no == 1 and (path.lower(), label.lower()) == ("path", "label"):
                continue
            candidate = Path(path)
            if candidate.is_absolute():
                if not candidate.resolve().is_relative_to(root):
                    raise UserValueError(f"{csv_path}:{line_no}: {path} is not inside {root}")
                path = candidate.resolve().relative_to(root).as_posix()
            else:
                path = candidate.as_posix()
            if labels.get(path, label) != label:
                raise UserValueError(f"{csv_path}:{line_no}: {path} labelled both "
                                     f"{labels[path]!r} and {label!r}")
            labels[path] = label
    return labels


@dataclass(frozen=True)
class QueryScore:
    path: str
    label: str
    precision: float  # this query's precision@k as the official metric counts it
    neighbours: list[str]
    distances: list[float]


@dataclass(frozen=True)
class LeaveOneOut:
    map_at_k: float | None  # None where no class has two indexed images
    k: int
    queries: list[QueryScore]  # sorted worst first (ties by path)
    per_class: dict[str, tuple[float, int]]  # label -> (mean precision, number of queries)
    single_image_classes: list[str]  # classes with one indexed image: not queries
    unlabelled: int  # indexed images without a label (distractors only)
    labels_not_indexed: list[str]  # labelled paths missing from the index (skipped or absent)


def leave_one_out(embeddings: torch.Tensor, paths: Sequence[str], labels: Mapping[str, str],
                  k: int = 5) -> LeaveOneOut:
    """Each labelled image with a classmate queries all the other indexed images."""
    indexed = set(paths)
    by_label: dict[str, list[str]] = {}
    for path in paths:
        if path in labels:
            by_label.setdefault(labels[path], []).append(path)
    singles = sorted(label for label, members in by_label.items() if len(members) == 1)
    query_rows = [i for i, p in enumerate(paths) if p in labels and len(by_label[labels[p]]) > 1]
    missing = sorted(p for p in labels if p not in indexed)
    unlabelled = sum(p not in labels for p in paths)
    if not query_rows:
        return LeaveOneOut(None, k, [], {}, singles, unlabelled, missing)

    dist, idx = knn(embeddings, embeddings, k, exclude_self=True)
    solution, predictions, scores = {}, {}, []
    for i in query_rows:
        path, label = paths[i], labels[paths[i]]
        solution[path] = [p for p in by_label[label] if p != path]
        predictions[path] = [paths[j] for j in idx[i].tolist()]
        precision = mean_precision_at_k({path: predictions[path]}, {path: solution[path]}, k)
        scores.append(QueryScore(path, label, precision, predictions[path], dist[i].tolist()))
    per_class = {}
    for label in sorted({s.label for s in scores}):
        members = [s.path for s in scores if s.label == label]
        per_class[label] = (mean_precision_at_k({p: predictions[p] for p in members},
                                                {p: solution[p] for p in members}, k),
                            len(members))
    scores.sort(key=lambda s: (s.precision, s.path))
    return LeaveOneOut(mean_precision_at_k(predictions, solution, k), k, scores, per_class,
                       singles, unlabelled, missing)
