"""Held-out evaluation: queries of unseen classes against an index with distractors, mP@5."""
from __future__ import annotations

import pandas as pd
import torch
from tqdm.auto import tqdm

from guie.data.augment import EvalTransform
from guie.data.dataset import ImageDataset
from guie.data.preprocess import Preprocess
from guie.metrics import evaluate_embeddings
from guie.model import EmbeddingModel
from guie.train.features import compute_features


class Evaluator:
    def __init__(self, query: pd.DataFrame, index: pd.DataFrame, preprocess: Preprocess,
                 batch_size: int, num_workers: int, device: torch.device):
        self.query, self.index = query.reset_index(drop=True), index.reset_index(drop=True)
        self.transform = EvalTransform(preprocess)
        self.batch_size, self.num_workers, self.device = batch_size, num_workers, device
        self._frozen_features = None

    def forget_features(self) -> None:
        """Drop the cached frozen-backbone features (the backbone or its input size changed)."""
        self._frozen_features = None

    def backbone_features(self, model: EmbeddingModel):
        """The head's inputs for queries and index (`compute_features`)."""
        q, q_ok = compute_features(model, self.query, self.transform, self.batch_size,
                                   self.num_workers, self.device, "eval queries")
        i, i_ok = compute_features(model, self.index, self.transform, self.batch_size,
                                   self.num_workers, self.device, "eval index")
        return q, q_ok, i, i_ok

    @torch.no_grad()
    def evaluate(self, model: EmbeddingModel, backbone_frozen: bool = False) -> dict:
        """mP@5 of the model; with a frozen backbone its features are computed only once."""
        if backbone_frozen and self._frozen_features is not None:
            q, q_ok, i, i_ok = self._frozen_features
        else:
            q, q_ok, i, i_ok = self.backbone_features(model)
            if backbone_frozen:
                self._frozen_features = (q, q_ok, i, i_ok)
        was_training = model.training
        model.eval()
        head_device = next(model.head.parameters()).device
        q_emb = model.embed_features(q[q_ok].to(head_device)).float().cpu()
        i_emb = model.embed_features(i[i_ok].to(head_device)).float().cpu()
        model.train(was_training)
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
