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

from guie.errors import UserValueError


def mean_precision_at_k(
    predictions: Mapping[str, Sequence[str]],
    solution: Mapping[str, Sequence[str]],
    k: int = 5,
) -> float:
    if not solution:
        raise UserValueError("solution is empty: no queries to score")
    unknown = set(predictions) - set(solution)
    if unknown:
        raise UserValueError(f"predictions name queries not in the solution: {sorted(unknown)[:5]}")
    total = 0.0
    for query_id, relevant in solution.items():
        relevant_set = set(relevant)
        if not relevant_set:
            raise UserValueError(f"query {query_id!r} has no relevant images in the solution")
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

    `exclude_self` drops the diagonal (leave-one-out when queries are the index itself). CPU
    tensors go through `_knn_cpu` (faster than faiss's IndexFlatL2 on the same data: figure
    `knn_time_ratio_vs_faiss` of `python -m bench`); CUDA tensors through a chunked matmul +
    topk on the device. Memory stays bounded: queries are processed at most `chunk_size` (CPU:
    256) at a time.
    """
    if queries.ndim != 2 or index.ndim != 2 or queries.shape[1] != index.shape[1]:
        raise ValueError(f"knn: shapes {tuple(queries.shape)} and {tuple(index.shape)} "
                         "do not match")
    k = min(k, index.shape[0] - int(exclude_self))
    if k <= 0 or queries.shape[0] == 0:
        return (torch.empty(queries.shape[0], max(k, 0), device=queries.device),
                torch.empty(queries.shape[0], max(k, 0), dtype=torch.int64, device=queries.device))
    if queries.device.type != "cpu" or index.device.type != "cpu":
        return _knn_torch(queries.float(), index.float(), k, chunk_size, exclude_self)
    dist, idx = _knn_cpu(queries.detach().float().numpy(), index.detach().float().numpy(), k,
                         max(1, min(chunk_size, _CPU_QUERY_CHUNK)), exclude_self)
    return torch.from_numpy(dist), torch.from_numpy(idx)


def _knn_torch(queries, index, k, chunk_size, exclude_self):
    index_sq = (index * index).sum(1)  # [N]
    all_d, all_i = [], []
    for start in range(0, queries.shape[0], chunk_size):
        q = queries[start:start + chunk_size]
        # ||q - x||^2 = ||q||^2 - 2 q.x + ||x||^2, as one matmul: [chunk, N]
        d2 = (q * q).sum(1, keepdim=True) - 2.0 * (q @ index.T) + index_sq
        if exclude_self:
            rows = torch.arange(q.shape[0], device=q.device)
            d2[rows, rows + start] = float("inf")
        dist, idx = torch.topk(d2, k, dim=1, largest=False)
        all_d.append(dist.clamp_min(0).sqrt())
        all_i.append(idx)
    return torch.cat(all_d), torch.cat(all_i)


# CPU k-NN. Brute force is BLAS-bound (a 64-d GEMM writes one score per 130 flops), so the rest
# must cost little and the cores must not wait on each other:
# - scores ||x||^2 - 2 q.x come from one GEMM per (index block, query chunk), the index norm
#   riding along as a 65th column; each block is reduced, while still in cache, to the minimum
#   of every group of G index rows (strided groups: the reduction is elementwise over slabs).
# - the k nearest neighbours lie in the k groups with the smallest minima (an element outside
#   them is beaten by k group minima), so only k*G candidates per query are rescored and sorted.
# - query chunks run in threads, each with single-threaded BLAS: a core that another process
#   takes stalls one chunk, not an OpenMP barrier every GEMM (faiss slows 3-5x on a busy
#   2-core machine, this path about 2x).
# Memory: the index once more as float32 with d+1 columns, plus per thread
# chunk x (block + N/G) floats.
_CPU_QUERY_CHUNK = 256
_CPU_INDEX_BLOCK = 4096
_CPU_GROUP = 32
_CPU_MAX_CANDIDATES = 256  # k * G per query


def _blas_threads_local():
    """numpy's OpenBLAS `openblas_set_num_threads_local` (sets the calling thread's BLAS
    threads), or None where numpy uses another BLAS: then one chunk runs at a time."""
    import ctypes
    import glob
    import os
    libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libs, "*openblas*"))):
        try:  # RTLD_NOLOAD: only the copy numpy already loaded, never a second one
            fn = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            fn = fn.openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    return None


_SET_BLAS_THREADS_LOCAL = _blas_threads_local()


def _smallest_groups(values: np.ndarray, k: int, fold: int = 16) -> np.ndarray:
    """Row indices [m, k] of the k smallest of each column of `values` [n, m] (any order), by
    the group trick once more: strided super-groups of `fold` rows, the k best super-groups,
    then the k best of their k * fold rows. (A full argpartition of the 6,400 group minima per
    query cost a tenth of the whole search.)"""
    n, m = values.shape
    if n % fold or n // fold < k:
        return np.argpartition(values, k - 1, axis=0)[:k].T
    stride = n // fold  # super-group j: rows j, j + stride, j + 2 * stride, ...
    best = np.argpartition(np.minimum.reduce(values.reshape(fold, stride, m), axis=0),
                           k - 1, axis=0)[:k]  # [k, m]
    rows = (best[:, None, :] + (np.arange(fold) * stride)[:, None]).reshape(k * fold, m)
    pick = np.argpartition(np.take_along_axis(values, rows, 0), k - 1, axis=0)[:k]
    return np.take_along_axis(rows, pick, 0).T


def _knn_cpu(q: np.ndarray, x: np.ndarray, k: int, chunk: int, exclude_self: bool):
    from concurrent.futures import ThreadPoolExecutor

    num_q, dim = q.shape
    n = x.shape[0]
    group = max(1, min(_CPU_GROUP, _CPU_MAX_CANDIDATES // k, n // k))
    block = min(-(-_CPU_INDEX_BLOCK // group), -(-n // group)) * group
    groups_per_block = block // group
    num_blocks = -(-n // block)
    # [-2x | ||x||^2], padding rows scoring huge: each block of rows is one GEMM's left operand.
    # (A finite stand-in for +inf: BLAS kernels may multiply the padding by 0, and inf * 0 = NaN.)
    xa = np.zeros((num_blocks * block, dim + 1), np.float32)
    np.multiply(x, -2.0, out=xa[:n, :dim])
    xa[:n, dim] = np.einsum("ij,ij->i", x, x)
    xa[n:, dim] = np.finfo(np.float32).max / 4
    qa = np.ones((num_q, dim + 1), np.float32)
    qa[:, :dim] = q
    q_sq = np.einsum("ij,ij->i", q, q)
    out_d = np.empty((num_q, k), np.float32)
    out_i = np.empty((num_q, k), np.int64)
    offsets = np.arange(group) * groups_per_block  # row t of group g: g + t * groups_per_block
    workers = torch.get_num_threads() if _SET_BLAS_THREADS_LOCAL else 1
    # Equal chunks, a whole number of them per worker: no worker idles at the end.
    rounds = -(-num_q // (workers * chunk))
    chunk = -(-num_q // (workers * rounds))

    def run(start: int) -> None:
        m = min(chunk, num_q - start)
        rows = np.arange(m)
        qa_t = np.ascontiguousarray(qa[start:start + m].T)
        # Index-major scores [block, m] (10% faster GEMM + reduction than query-major here).
        scores = np.empty((block, m), np.float32)
        group_min = np.empty((num_blocks, groups_per_block, m), np.float32)
        for b in range(num_blocks):
            np.matmul(xa[b * block:(b + 1) * block], qa_t, out=scores)
            if exclude_self:
                cols = start + rows - b * block
                inside = (cols >= 0) & (cols < block)
                scores[cols[inside], rows[inside]] = np.inf
            np.minimum.reduce(scores.reshape(group, groups_per_block, m), axis=0,
                              out=group_min[b])
        best = _smallest_groups(group_min.reshape(-1, m), k)  # [m, k] group ids
        first = (best // groups_per_block) * block + best % groups_per_block
        cand = (first[:, :, None] + offsets).reshape(m, -1)  # [m, k * group]
        cand_scores = np.matmul(xa[cand], qa[start:start + m, :, None])[:, :, 0]
        if exclude_self:
            cand_scores[cand == (start + rows)[:, None]] = np.inf
        top = np.argpartition(cand_scores, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(cand_scores, top, 1)
        order = np.argsort(top_scores, axis=1, kind="stable")
        top_scores = np.take_along_axis(top_scores, order, 1)
        out_i[start:start + m] = np.take_along_axis(np.take_along_axis(cand, top, 1), order, 1)
        out_d[start:start + m] = np.sqrt(np.maximum(top_scores + q_sq[start:start + m, None], 0))

    starts = range(0, num_q, chunk)
    workers = min(workers, len(starts))
    if workers <= 1:
        for start in starts:
            run(start)
    else:
        with ThreadPoolExecutor(workers, initializer=_SET_BLAS_THREADS_LOCAL,
                                initargs=(1,)) as pool:
            list(pool.map(run, starts))  # list(): re-raises a worker's exception here
    return out_d, out_i


def evaluate_embeddings(
    query_emb: torch.Tensor,
    query_labels: Sequence[int],
    index_emb: torch.Tensor,
    index_labels: Sequence[int],
    query_domains: Sequence[str] | None = None,
    k: int = 5,
) -> dict:
    """mP@k of queries against an index by label identity, overall and per domain.

    The same numbers as `mean_precision_at_k` (tested against it), computed as arrays: k-NN
    returns distinct ids, so only the window min(n_q, k) needs care, and 200k index ids need no
    Python dicts.
    """
    query_labels = np.asarray(query_labels)
    index_labels = np.asarray(index_labels)
    _, nn_idx = knn(query_emb, index_emb, k)
    classes, counts = np.unique(index_labels, return_counts=True)
    pos = np.searchsorted(classes, query_labels).clip(0, len(classes) - 1)
    missing = classes[pos] != query_labels
    if missing.any():
        qi = int(np.flatnonzero(missing)[0])
        raise UserValueError(f"query {qi} (label {query_labels[qi]}) "
                             "has no relevant image in the index")
    window = np.minimum(counts[pos], k)  # [Q]: min(n_q, k)
    hits = index_labels[nn_idx.numpy()] == query_labels[:, None]  # [Q, k]
    in_window = np.arange(hits.shape[1])[None, :] < window[:, None]
    precision = (hits & in_window).sum(1) / window
    result = {"map5": float(precision.mean()), "num_queries": len(query_labels)}
    if query_domains is not None:
        domains = np.asarray(query_domains)
        result["map5_per_domain"] = {str(d): float(precision[domains == d].mean())
                                     for d in sorted(set(query_domains))}
    return result
