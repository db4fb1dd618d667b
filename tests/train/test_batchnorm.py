"""BatchNorm wherever a layer is frozen: eval mode, running statistics unchanged (feature cache,
head-only stages, the frozen part of a partially unfrozen backbone, the reduction's fit, the
export); in the backbone's trained part too (guie.backbones says why). On the Lite0 trunk,
whose BatchNorms a training-mode forward would update."""
from dataclasses import replace

import pytest
import torch
from torch import nn

from guie.configs import get_config
from guie.data.augment import EvalTransform
from guie.export.build import fit_export_reduction
from guie.export.script import build_submission_model
from guie.pipeline import prepare
from guie.train.features import CacheRequest, build_feature_cache
from guie.train.loop import run_stage


@pytest.fixture(scope="module")
def lite0_session(sample_data):
    root, sources = sample_data
    smoke = get_config("smoke")
    cfg = replace(smoke, data=replace(smoke.data, root=str(root), sources=tuple(sources),
                                      sample_instances=0, heldout_classes=0,
                                      distractor_classes=0, num_workers=0),
                  preprocess=replace(smoke.preprocess, image_size=32),
                  model=replace(smoke.model, backbone="guie-lite0"),
                  export=replace(smoke.export, reduction="pca", reduction_images=80))
    return prepare(cfg)


def _bn_stats(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in module.named_buffers()
            if n.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def _context(s, out_dir):
    """The session's training context without an evaluator (no evaluation points)."""
    return replace(s.train_context(out_dir), evaluator=None)


def _changed(before: dict, after: dict) -> set[str]:
    return {n for n in before if not torch.equal(before[n], after[n])}


def _stage(s, **changes):
    return replace(s.cfg.stage("stage2"), epochs=0.2, batch_size=8, eval_every_epochs=10, **changes)


def test_a_head_only_stage_leaves_the_trunk_statistics_alone(lite0_session, tmp_path):
    s = lite0_session
    before = _bn_stats(s.model.visual)
    stage = _stage(s, train=("head", "centres"), use_feature_cache=False, name="headonly")
    run_stage(_context(s, tmp_path), stage, resume=False)
    assert not _changed(before, _bn_stats(s.model.visual))


def test_building_the_feature_cache_leaves_them_alone(lite0_session, tmp_path):
    s = lite0_session
    s.model.train()  # whatever mode it comes in
    before = _bn_stats(s.model.visual)
    build_feature_cache(s.model, CacheRequest(s.split.train.iloc[:24],
                                              [EvalTransform(s.preprocess)], "k", tmp_path, 8,
                                              0, s.device))
    assert not _changed(before, _bn_stats(s.model.visual))


def test_partially_unfrozen_trunk_trains_its_blocks_on_the_pretrained_statistics(
        lite0_session, tmp_path):
    s = lite0_session
    before = _bn_stats(s.model.visual)
    weights = {n: p.detach().clone() for n, p in s.model.visual.named_parameters()}
    stage = _stage(s, train=("head", "blocks:14-15"), name="partial", lr_backbone=1e-3)
    run_stage(_context(s, tmp_path), stage, resume=False)
    learnt = {n for n, p in s.model.visual.named_parameters() if not torch.equal(p, weights[n])}
    assert learnt and all(n.startswith(("trunk.blocks.5.3.", "trunk.blocks.6.0."))
                          for n in learnt), sorted(learnt)[:5]
    assert any(".bn" in n for n in learnt)  # the trained norms' scale and shift learn
    assert not _changed(before, _bn_stats(s.model.visual))  # but no statistics drift


def test_a_whole_backbone_stage_keeps_the_pretrained_statistics(lite0_session, tmp_path):
    s = lite0_session
    before = _bn_stats(s.model.visual)
    stage = _stage(s, train=("all",), name="all", lr_backbone=1e-3)
    run_stage(_context(s, tmp_path), stage, resume=False)
    assert not _changed(before, _bn_stats(s.model.visual))


def test_the_reduction_fit_and_the_export_run_in_eval_mode(lite0_session):
    s = lite0_session
    s.model.train()
    before = _bn_stats(s.model.visual)
    fit_export_reduction(s.cfg, s.model, s.preprocess)
    assert not _changed(before, _bn_stats(s.model.visual))
    export = build_submission_model(s.model.train(), s.preprocess)
    assert not any(m.training for m in export.modules())
    with torch.no_grad():
        export(torch.randint(0, 256, (2, 3, 40, 50), dtype=torch.uint8))
    assert not _changed(before, _bn_stats(export.visual))
