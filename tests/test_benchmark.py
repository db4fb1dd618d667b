"""Scoring an evaluation source, against the official metric computed independently."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from guie.benchmark import score_source
from guie.metrics import mean_precision_at_k


def frame_of(labels: list[int], domains: list[str], queries: list[bool]) -> pd.DataFrame:
    return pd.DataFrame({"path": [f"img{i:03d}" for i in range(len(labels))], "label": labels,
                         "domain": domains, "class_name": [str(x) for x in labels],
                         "query": queries})


def official(frame, embeddings, query_rows, index_rows):
    """Brute-force distances, top 5, the competition's metric per query; then per domain."""
    e = embeddings.double().numpy()
    per_query = {}
    for q in query_rows:
        candidates = [i for i in index_rows if i != q]
        order = sorted(candidates, key=lambda i: (float(((e[i] - e[q]) ** 2).sum()), i))[:5]
        relevant = [frame.path[i] for i in candidates if frame.label[i] == frame.label[q]]
        if relevant:
            per_query[q] = mean_precision_at_k({frame.path[q]: [frame.path[i] for i in order]},
                                               {frame.path[q]: relevant})
    domains = {}
    for q, p in per_query.items():
        domains.setdefault(frame.domain[q], []).append(p)
    return (float(np.mean(list(per_query.values()))),
            {d: float(np.mean(v)) for d, v in domains.items()})


def test_leave_one_out_equals_the_official_metric():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, 90).tolist()
    domains = ["landmarks" if x < 6 else "faces" for x in labels]
    frame = frame_of(labels, domains, [True] * 90)
    noise = torch.randn(90, 16, generator=torch.Generator().manual_seed(1))
    embeddings = torch.nn.functional.normalize(noise + torch.tensor(labels)[:, None] * 0.05, dim=1)
    score = score_source("b", frame, embeddings)
    overall, per_domain = official(frame, embeddings, range(90), range(90))
    assert abs(score.map5 - overall) < 1e-12
    assert score.map5_per_domain.keys() == per_domain.keys()
    for d, v in per_domain.items():
        assert abs(score.map5_per_domain[d] - v) < 1e-12
    assert [q.precision for q in score.worst] == sorted(q.precision for q in score.worst)


def test_queries_against_the_rest_equal_the_official_metric():
    labels = [c for c in range(8) for _ in range(4)]
    frame = frame_of(labels, ["d"] * 32, [i % 4 == 0 for i in range(32)])
    embeddings = torch.nn.functional.normalize(
        torch.randn(32, 8, generator=torch.Generator().manual_seed(2)), dim=1)
    score = score_source("b", frame, embeddings)
    queries = [i for i in range(32) if i % 4 == 0]
    overall, _ = official(frame, embeddings, queries, [i for i in range(32) if i % 4])
    assert score.num_queries == 8 and abs(score.map5 - overall) < 1e-12


def test_a_class_of_one_is_not_a_query():
    frame = frame_of([0, 0, 1], ["d"] * 3, [True] * 3)
    score = score_source("b", frame, torch.eye(3))
    assert score.num_queries == 2
