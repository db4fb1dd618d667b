"""The feature cache's augmented views do not depend on how the rows were split (chunks here;
ranks' shares are chunks too)."""
from dataclasses import replace

import numpy as np
import torch

from guie.configs import get_config
from guie.model import build_model
from guie.train.batches import cache_transforms
from guie.train.features import CacheRequest, build_feature_cache


def test_augmented_views_are_the_same_whatever_the_chunks(sample_data, tmp_path):
    root, sources = sample_data
    smoke = get_config("smoke")
    cfg = replace(smoke, data=replace(smoke.data, root=str(root), sources=tuple(sources)))
    model, preprocess = build_model(cfg)
    from guie.experiment import load_experiment_split

    rows = load_experiment_split(replace(cfg.data, sample_instances=0, heldout_classes=0,
                                         distractor_classes=0))[0].train.iloc[:10]
    stage = replace(cfg.stage("stage1"), cache_views=2)
    features = []
    for chunk_rows in (3, 100):
        request = CacheRequest(rows, cache_transforms(stage, preprocess), f"k{chunk_rows}",
                               tmp_path, 4, 0, torch.device("cpu"), chunk_rows=chunk_rows)
        features.append(np.asarray(build_feature_cache(model, request).features))
    assert features[0].shape == (2, 10, model.feature_dim)
    assert not np.array_equal(features[0][0], features[0][1])  # view 1 is augmented
    assert np.array_equal(features[0], features[1])
