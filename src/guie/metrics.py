"""The competition metric (mean Precision@5) and the embedding-level evaluation built on it.

`mean_precision_at_k` follows the official `CalibratedPrecision(k=5)` exactly (field guide
section 2): for a query with n_q relevant images only the first min(n_q, k) predictions count, an
id repeated inside that window counts once and does not widen it, and the score is averaged over
the queries of the solution.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch


def mean_precision_at_k(
    predictions: Mapping[str, Sequence[str]],
    solution: Mapping[str, Sequence[str]],
    k: int = 5,
) -> float:
    if not solution:
        raise ValueError("solution is empty: no queries to score")
    unknown = set(predictions) - set(solution)
    if unknown:
        raise ValueError(f"predictions name queries not in the solution: {sorted(unknown)[:5]}")
    total = 0.0
    for query_id, relevant in solution.items():
        relevant_set = set(relevant)
        if not relevant_set:
            raise ValueError(f"query {query_id!r} has no relevant images in the solution")
        window = min(len(relevant_set), k)
        seen: set[str] = set()
        correct = 0
        for pred in list(predictions.get(query_id, ()))[:window]:
            if pred in seen:
                continue
            seen.add(pred)
            correct += pred in relevant_set
        total += correct / window
    return total / len(solution)


def knn(
    queries: torch.Tensor, index: torch.Tensor, k: int, chunk_size: int = 4096,
    exclude_self: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Euclidean k-NN: returns (distances [Q, k], indices [Q, k]), nearest first.

    Queries are processed in chunks so memory stays bounded at chunk_size x N floats.
    `exclude_self` drops the diagonal (leave-one-out when queries are the index itself).
    """
    if queries.ndim != 2 or index.ndim != 2 or queries.shape[1] != index.shape[1]:
        raise ValueError(f"knn: shapes {tuple(queries.shape)} and {tuple(index.shape)} do not match")
    k = min(k, index.shape[0] - int(exclude_self))
    queries = queries.float()
    index = index.float()
    index_sq = (index * index).sum(1)  # [N]
    all_d, all_i = [], []
    for start in range(0, queries.shape[0], chunk_size):
        q = queries[start:start + chunk_size]
        # ||q - x||^2 = ||q||^2 - 2 q.x + ||x||^2, as one matmul: [chunk, N]
        d2 = (q * q).sum(1, keepdim=True) - 2.0 * (q @ index.T) + index_sq
        if exclude_self:
            rows = torch.arange(q.shape[0])
            d2[rows, rows + start] = float("inf")
        dist, idx = torch.topk(d2, k, dim=1, largest=False)
        all_d.append(dist.clamp_min(0).sqrt())
        all_i.append(idx)
    return torch.cat(all_d), torch.cat(all_i)


def evaluate_embeddings(
    query_emb: torch.Tensor,
    query_labels: Sequence[int],
    index_emb: torch.Tensor,
    index_labels: Sequence[int],
    query_domains: Sequence[str] | None = None,
    k: int = 5,
) -> dict:
    """mP@k of queries against an index by label identity, overall and per domain."""
    query_labels = np.asarray(query_labels)
    index_labels = np.asarray(index_labels)
    _, nn_idx = knn(query_emb, index_emb, k)
    index_ids = [f"i{j}" for j in range(len(index_labels))]
    by_label: dict[int, list[str]] = {}
    for j, label in enumerate(index_labels.tolist()):
        by_label.setdefault(label, []).append(index_ids[j])
    solution, predictions = {}, {}
    for qi, label in enumerate(query_labels.tolist()):
        if label not in by_label:
            raise ValueError(f"query {qi} (label {label}) has no relevant image in the index")
        solution[f"q{qi}"] = by_label[label]
        predictions[f"q{qi}"] = [index_ids[j] for j in nn_idx[qi].tolist()]
    result = {"map5": mean_precision_at_k(predictions, solution, k), "num_queries": len(solution)}
    if query_domains is not None:
        per_domain = {}
        for domain in sorted(set(query_domains)):
            ids = [f"q{i}" for i, d in enumerate(query_domains) if d == domain]
            per_domain[domain] = mean_precision_at_k(
                {q: predictions[q] for q in ids}, {q: solution[q] for q in ids}, k)
        result["map5_per_domain"] = per_domain
    return result
