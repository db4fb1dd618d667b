import pytest
import torch

from guie.metrics import evaluate_embeddings, knn, mean_precision_at_k


def test_duplicate_prediction_counts_once_and_does_not_widen_window():
    # n_q = 2 -> window of 2; the repeated r1 is skipped, r2 falls outside the window.
    assert mean_precision_at_k({"a": ["r1", "r1", "r2"]}, {"a": ["r1", "r2"]}) == 0.5


def test_window_is_min_of_relevant_count_and_k():
    solution = {"one": ["x"], "seven": [f"s{i}" for i in range(7)]}
    predictions = {"one": ["junk", "x"],  # the right answer is 2nd, window is 1 -> 0
                   "seven": ["s0", "s1", "junk", "s2", "s3", "s4"]}  # 4 of the first 5
    assert mean_precision_at_k(predictions, solution) == pytest.approx((0.0 + 4 / 5) / 2)


def test_perfect_and_missing_predictions():
    solution = {"a": ["r1", "r2", "r3"], "b": ["r4"]}
    assert mean_precision_at_k({"a": ["r3", "r1", "r2"], "b": ["r4"]}, solution) == 1.0
    # a query of the solution with no predictions scores 0 but still counts in the mean
    assert mean_precision_at_k({"a": ["r1", "r2", "r3"]}, solution) == 0.5


def test_errors_on_unknown_or_empty_queries():
    with pytest.raises(ValueError, match="not in the solution"):
        mean_precision_at_k({"zzz": ["r1"]}, {"a": ["r1"]})
    with pytest.raises(ValueError, match="no relevant"):
        mean_precision_at_k({"a": ["r1"]}, {"a": []})
    with pytest.raises(ValueError, match="empty"):
        mean_precision_at_k({}, {})


def test_knn_matches_brute_force_and_chunks():
    gen = torch.Generator().manual_seed(0)
    q, x = torch.randn(37, 8, generator=gen), torch.randn(101, 8, generator=gen)
    dist, idx = knn(q, x, k=5, chunk_size=10)
    brute = torch.cdist(q.double(), x.double())
    ref_d, ref_i = brute.topk(5, largest=False)
    assert torch.equal(idx, ref_i)
    assert torch.allclose(dist.double(), ref_d, atol=1e-4)


def test_knn_exclude_self():
    x = torch.randn(20, 4)
    _, idx = knn(x, x, k=3, exclude_self=True)
    assert not (idx == torch.arange(20)[:, None]).any()


def test_evaluate_embeddings_per_domain():
    index = torch.eye(4)  # four orthogonal index vectors, labels 0,0,1,1
    queries = torch.tensor([[1.0, 0.9, 0, 0], [0, 0, 0.2, 1.0]])
    result = evaluate_embeddings(queries, [0, 0], index, [0, 0, 1, 1], ["cars", "art"], k=5)
    # query 0 finds both label-0 images first (1.0); query 1 (label 0) finds label-1 first (0.0)
    assert result["map5"] == 0.5
    assert result["map5_per_domain"] == {"art": 0.0, "cars": 1.0}


def test_evaluate_embeddings_equals_the_official_dict_metric():
    gen = torch.Generator().manual_seed(3)
    index, queries = torch.randn(300, 8, generator=gen), torch.randn(60, 8, generator=gen)
    index_labels = torch.randint(0, 25, (300,), generator=gen).tolist()
    query_labels = [index_labels[i] for i in torch.randint(0, 300, (60,), generator=gen).tolist()]
    result = evaluate_embeddings(queries, query_labels, index, index_labels, k=5)
    _, nn_idx = knn(queries, index, 5)
    solution = {f"q{q}": [f"i{j}" for j, lab in enumerate(index_labels) if lab == label]
                for q, label in enumerate(query_labels)}
    predictions = {f"q{q}": [f"i{j}" for j in row] for q, row in enumerate(nn_idx.tolist())}
    assert result["map5"] == pytest.approx(mean_precision_at_k(predictions, solution))
    with pytest.raises(ValueError, match="no relevant image"):
        evaluate_embeddings(queries[:1], [999], index, index_labels)
