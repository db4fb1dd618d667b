"""Reduction of embeddings to the 64 dimensions the competition takes, as one affine map.

Every reduction here is y = W x + b, so it folds into the export's last Linear: the exported
model stays preprocess -> backbone -> one Linear -> L2 norm whatever the head's width (also for
the torch 1.11 export). PCA and whitening are fitted on the head's outputs before the L2 norm,
which is what that Linear produces.
"""
from __future__ import annotations

import torch
from torch import nn

from guie.errors import UserValueError

KINDS = ("pca", "whiten", "avg_pool")


def fit_reduction(kind: str, dim: int, embeddings: torch.Tensor | None = None,
                  input_dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [dim, D], b [dim]). pca/whiten need `embeddings` [N, D]; avg_pool only `input_dim`."""
    if kind == "avg_pool":
        if input_dim % dim:
            raise UserValueError(f"export.reduction=avg_pool: {input_dim} dimensions do not split "
                                 f"into {dim} equal groups")
        group = input_dim // dim
        # output j = mean of inputs j*group .. (j+1)*group - 1 (the notebook's 1D average pool)
        weight = torch.eye(dim).repeat_interleave(group, dim=1) / group
        return weight, torch.zeros(dim)
    if kind not in ("pca", "whiten"):
        raise UserValueError(f"export.reduction: unknown {kind!r} "
                             f"(known: none, {', '.join(KINDS)})")
    if embeddings is None or embeddings.shape[0] <= dim:
        n = 0 if embeddings is None else embeddings.shape[0]
        raise UserValueError(f"export.reduction={kind}: needs more than {dim} images, got {n} "
                             "(raise export.reduction_images or use more data)")
    if embeddings.shape[1] < dim:
        raise UserValueError(f"export.reduction={kind}: embeddings are {embeddings.shape[1]}-d, "
                             f"fewer than reduction_dim={dim}")
    x = embeddings.double()
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / (x.shape[0] - 1)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(eigvals, descending=True)[:dim]
    components = eigvecs[:, order].T  # [dim, D]
    # eigh's signs are arbitrary: fix each so its largest entry is positive, for reproducibility.
    signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
    components = components * signs
    if kind == "whiten":
        # Every direction to unit variance; eps keeps near-null directions from exploding.
        components = components / torch.sqrt(eigvals[order].clamp_min(0) + 1e-6).unsqueeze(1)
    return components.float(), (-(components @ mean)).float()


def fold_into_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """Linear(x) followed by W y + b, as one Linear."""
    folded = nn.Linear(linear.in_features, weight.shape[0]).to(linear.weight.device)
    w = weight.to(linear.weight.device, torch.float64)
    with torch.no_grad():
        folded.weight.copy_(w @ linear.weight.double())
        folded.bias.copy_(w @ linear.bias.double() + bias.to(w))
    return folded
