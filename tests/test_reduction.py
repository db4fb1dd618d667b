import pytest
import torch
import torch.nn.functional as F

from guie.reduction import fit_reduction, fold_into_linear


def test_pca_components_are_the_top_variance_directions():
    torch.manual_seed(0)
    x = torch.randn(500, 8) * torch.tensor([5.0, 1, 1, 1, 3, 1, 1, 1]) + 2.0
    w, b = fit_reduction("pca", 2, x)
    y = x @ w.T + b
    assert torch.allclose(y.mean(0), torch.zeros(2), atol=1e-4)  # centred
    assert set(w.abs().argmax(1).tolist()) == {0, 4}


def test_whitening_gives_unit_covariance():
    torch.manual_seed(0)
    x = torch.randn(400, 6) @ torch.randn(6, 6)
    w, b = fit_reduction("whiten", 4, x)
    y = x @ w.T + b
    assert torch.allclose(torch.cov(y.T), torch.eye(4), atol=1e-3)


def test_avg_pool_averages_neighbours_and_folds():
    w, b = fit_reduction("avg_pool", 2, input_dim=6)
    linear = torch.nn.Linear(4, 6)
    folded = fold_into_linear(linear, w, b)
    x = torch.randn(3, 4)
    want = linear(x).view(3, 2, 3).mean(2)
    assert torch.allclose(folded(x), want, atol=1e-6)
    with pytest.raises(ValueError, match="equal groups"):
        fit_reduction("avg_pool", 4, input_dim=6)


def test_too_few_images_is_a_clear_error():
    with pytest.raises(ValueError, match="needs more than 64 images"):
        fit_reduction("pca", 64, torch.randn(10, 128))
    with pytest.raises(ValueError, match="unknown 'lda'"):
        fit_reduction("lda", 4, torch.randn(10, 8))


def test_folded_pca_equals_linear_then_pca():
    torch.manual_seed(1)
    linear = torch.nn.Linear(16, 32)
    x = torch.randn(200, 16)
    w, b = fit_reduction("pca", 8, linear(x).detach())
    with torch.no_grad():
        eager = F.normalize(linear(x) @ w.T + b, dim=-1)
        assert torch.allclose(F.normalize(fold_into_linear(linear, w, b)(x), dim=-1), eager,
                              atol=1e-5)
