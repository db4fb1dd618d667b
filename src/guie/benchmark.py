"""Scoring an evaluation source: mP@5 overall and per domain, and the worst queries.

Leave-one-out where the source says so (every image queries all the others, GPR1200's protocol),
else its queries against the rest. Each query is scored with the official metric
(`guie.metrics.mean_precision_at_k`: window min(n_q, 5)) over exact Euclidean k-NN.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from guie.metrics import knn, mean_precision_at_k


@dataclass(frozen=True)
class ScoredQuery:
    path: str
    domain: str
    class_name: str
    precision: float
    neighbours: tuple[str, ...]
    distances: tuple[float, ...]


@dataclass(frozen=True)
class SourceScore:
    name: str
    map5: float | None  # None where no query has a relevant image
    map5_per_domain: dict[str, float]
    num_queries: int
    dropped_duplicates: int = 0  # images also in a training source, not scored
    worst: tuple[ScoredQuery, ...] = field(default=())  # worst first

    def report(self) -> dict:
        return {"map5": self.map5, "map5_per_domain": self.map5_per_domain,
                "num_queries": self.num_queries, "dropped_duplicates": self.dropped_duplicates}


def score_source(name: str, frame: pd.DataFrame, embeddings: torch.Tensor, k: int = 5,
                 worst: int = 20, dropped_duplicates: int = 0) -> SourceScore:
    """embeddings[i] is frame row i's embedding; frame has path, label, domain, class_name,
    query."""
    if len(frame) != embeddings.shape[0]:
        raise ValueError(f"{name}: {len(frame)} rows but {embeddings.shape[0]} embeddings")
    labels = frame["label"].to_numpy()
    paths = frame["path"].tolist()
    leave_one_out = bool(frame["query"].all())
    queries = np.flatnonzero(frame["query"].to_numpy())
    index = np.arange(len(frame)) if leave_one_out else np.flatnonzero(~frame["query"].to_numpy())
    # A query with no relevant image left in the index cannot be scored (a class of one).
    members: dict[int, list[int]] = {}
    for i in index.tolist():
        members.setdefault(int(labels[i]), []).append(i)
    relevant = {int(q): [paths[i] for i in members.get(int(labels[q]), []) if i != q]
                for q in queries}
    queries = np.array([q for q in queries if relevant[int(q)]], np.int64)
    if len(queries) == 0:
        return SourceScore(name, None, {}, 0, dropped_duplicates)
    if leave_one_out:  # every row queries all the others: k-NN of the set against itself
        dist, nn = knn(embeddings, embeddings, k, exclude_self=True)
        dist, nn = dist[torch.from_numpy(queries)], nn[torch.from_numpy(queries)]
    else:
        dist, nn = knn(embeddings[torch.from_numpy(queries)],
                       embeddings[torch.from_numpy(index)], k)
        nn = torch.from_numpy(index)[nn]  # [Q, k]: back to frame rows
    scored = []
    for row, q in enumerate(queries.tolist()):
        predictions = [paths[j] for j in nn[row].tolist()]
        precision = mean_precision_at_k({paths[q]: predictions}, {paths[q]: relevant[q]}, k)
        scored.append(ScoredQuery(paths[q], str(frame["domain"].iloc[q]),
                                  str(frame["class_name"].iloc[q]), precision, tuple(predictions),
                                  tuple(float(d) for d in dist[row].tolist())))
    per_domain: dict[str, list[float]] = {}
    for s in scored:
        per_domain.setdefault(s.domain, []).append(s.precision)
    ordered = sorted(scored, key=lambda s: (s.precision, s.path))
    return SourceScore(name, float(np.mean([s.precision for s in scored])),
                       {d: float(np.mean(v)) for d, v in sorted(per_domain.items())},
                       len(scored), dropped_duplicates, tuple(ordered[:worst]))
