"""Held-out evaluation: queries of unseen classes against an index with distractors, mP@5; and
the evaluation sources (`data.eval_sources`: GPR1200, your folders), each per domain.

Under torchrun the evaluation is shared: every rank embeds a contiguous share of the images
with the plain, full-weight model and the features are gathered on all ranks, which then score
the same figures (so every rank keeps the same `select_by` point). No rank waits idle while
another evaluates, and no rank runs the model alone while its peers wait in a collective.
"""
from __future__ import annotations

import pandas as pd
import torch
import torch.distributed as torch_dist
from tqdm.auto import tqdm

from guie.benchmark import score_source
from guie.data.augment import EvalTransform
from guie.data.dataset import ImageDataset
from guie.data.preprocess import Preprocess
from guie.errors import UserValueError
from guie.metrics import evaluate_embeddings
from guie.model import EmbeddingModel
from guie.train import dist
from guie.train.features import compute_features


def evaluation_row(result: dict) -> dict:
    """The figures of one evaluation as history columns: `map5` (held-out) and `map5_<source>`."""
    row = {"map5": result["map5"]} if "map5" in result else {}
    row.update({f"map5_{name}": s["map5"] for name, s in result.get("sources", {}).items()})
    return row


def stage_report(stage_name: str, metrics: dict) -> dict:
    """A finished stage's figures as the run report's keys: `map5_<stage>` (held-out), its
    `_per_domain` breakdown, and `eval_<stage>` (the evaluation sources, per domain)."""
    report = {}
    if "map5" in metrics:
        report[f"map5_{stage_name}"] = metrics["map5"]
        report[f"map5_{stage_name}_per_domain"] = metrics.get("map5_per_domain", {})
    if "sources" in metrics:
        report[f"eval_{stage_name}"] = metrics["sources"]
    return report


def _head_embeddings(model: EmbeddingModel, *features: torch.Tensor) -> list[torch.Tensor]:
    """The head's unit embeddings of backbone features, in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    head_device = next(model.head.parameters()).device
    out = [model.embed_features(f.to(head_device)).float().cpu() for f in features]
    model.train(was_training)
    return out


def shared_features(model: EmbeddingModel, df: pd.DataFrame, transform, batch_size: int,
                    num_workers: int, device: torch.device, desc: str):
    """`compute_features` of `df`, each rank embedding a contiguous share; every rank gets
    all rows (one collective under torchrun). A share without one readable image is not an
    error on its own: all ranks fail together only where no share has any."""
    world, rank = dist.world_size(), dist.rank()
    if world == 1:
        return compute_features(model, df, transform, batch_size, num_workers, device, desc)
    lo, hi = rank * len(df) // world, (rank + 1) * len(df) // world
    try:
        part = compute_features(model, df.iloc[lo:hi], transform, batch_size, num_workers,
                                device, desc) if hi > lo else None
    except ValueError:  # every image of this share unreadable
        part = None
    parts: list = [None] * world
    torch_dist.all_gather_object(parts, part)
    dims = {p[0].shape[1] for p in parts if p is not None}
    if not dims:
        raise UserValueError(f"{desc}: not one of {len(df)} images could be read")
    (dim,) = dims
    features = torch.zeros(len(df), dim)
    valid = torch.zeros(len(df), dtype=torch.bool)
    for r, p in enumerate(parts):
        if p is not None:
            r_lo, r_hi = r * len(df) // world, (r + 1) * len(df) // world
            features[r_lo:r_hi], valid[r_lo:r_hi] = p
    return features, valid


class Evaluator:
    def __init__(self, query: pd.DataFrame, index: pd.DataFrame, preprocess: Preprocess,
                 batch_size: int, num_workers: int, device: torch.device,
                 sources: tuple[tuple[str, pd.DataFrame, int], ...] = ()):
        """sources: (name, rows, duplicates dropped) of each evaluation source."""
        self.query, self.index = query.reset_index(drop=True), index.reset_index(drop=True)
        self.sources = sources
        self.transform = EvalTransform(preprocess)
        self.batch_size, self.num_workers, self.device = batch_size, num_workers, device
        self._frozen_features = None
        self._frozen_source_features: dict[str, tuple] = {}

    def forget_features(self) -> None:
        """Drop the cached frozen-backbone features (the backbone or its input size changed)."""
        self._frozen_features = None
        self._frozen_source_features = {}

    def backbone_features(self, model: EmbeddingModel):
        """The head's inputs for queries and index (`compute_features`)."""
        q, q_ok = shared_features(model, self.query, self.transform, self.batch_size,
                                  self.num_workers, self.device, "eval queries")
        i, i_ok = shared_features(model, self.index, self.transform, self.batch_size,
                                  self.num_workers, self.device, "eval index")
        return q, q_ok, i, i_ok

    @torch.no_grad()
    def evaluate(self, model: EmbeddingModel, backbone_frozen: bool = False) -> dict:
        """mP@5 of the model on the held-out split (`map5`, `map5_per_domain`) and on each
        evaluation source (`sources`); with a frozen backbone features are computed once."""
        result = self._evaluate_heldout(model, backbone_frozen) if len(self.query) else {}
        if self.sources:
            result["sources"] = {name: self._evaluate_source(model, name, rows, dropped,
                                                             backbone_frozen)
                                 for name, rows, dropped in self.sources}
        return result

    def _evaluate_source(self, model: EmbeddingModel, name: str, rows: pd.DataFrame,
                         dropped: int, backbone_frozen: bool) -> dict:
        cached = self._frozen_source_features.get(name) if backbone_frozen else None
        if cached is None:
            cached = shared_features(model, rows, self.transform, self.batch_size,
                                     self.num_workers, self.device, f"eval {name}")
            if backbone_frozen:
                self._frozen_source_features[name] = cached
        features, ok = cached
        (embeddings,) = _head_embeddings(model, features[ok])
        return score_source(name, rows[ok.numpy()].reset_index(drop=True), embeddings,
                            dropped_duplicates=dropped).report()

    def _evaluate_heldout(self, model: EmbeddingModel, backbone_frozen: bool) -> dict:
        if backbone_frozen and self._frozen_features is not None:
            q, q_ok, i, i_ok = self._frozen_features
        else:
            q, q_ok, i, i_ok = self.backbone_features(model)
            if backbone_frozen:
                self._frozen_features = (q, q_ok, i, i_ok)
        q_emb, i_emb = _head_embeddings(model, q[q_ok], i[i_ok])
        return self._score(q_emb, q_ok, i_emb, i_ok)

    def _score(self, q_emb, q_ok, i_emb, i_ok) -> dict:
        query, index = self.query[q_ok.numpy()], self.index[i_ok.numpy()]
        result = evaluate_embeddings(q_emb, query["label"].tolist(), i_emb,
                                     index["label"].tolist(), query["domain"].tolist())
        result["skipped_images"] = int((~q_ok).sum() + (~i_ok).sum())
        return result

    @torch.no_grad()
    def evaluate_exported(self, module: torch.jit.ScriptModule) -> dict:
        """Feed the export as the host does: one uint8 image per call, at its original size."""
        q_emb, q_ok = self._embed_one_by_one(module, self.query, "export queries")
        i_emb, i_ok = self._embed_one_by_one(module, self.index, "export index")
        return self._score(q_emb, q_ok, i_emb, i_ok)

    def _embed_one_by_one(self, module, df: pd.DataFrame, desc: str):
        from torchvision.transforms.v2.functional import pil_to_tensor

        dataset = ImageDataset(df, pil_to_tensor)
        rows, ok = [], torch.zeros(len(df), dtype=torch.bool)
        for i in tqdm(range(len(df)), desc=desc, leave=False, dynamic_ncols=True):
            item = dataset[i]
            if item is None:
                continue
            pixels = item[0].unsqueeze(0)  # [1, 3, H, W] uint8, original size
            rows.append(module(pixels.to(self.device)).float().cpu())
            ok[i] = True
        return torch.cat(rows), ok
