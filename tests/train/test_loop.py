"""Resume equivalence: stopped after one step and resumed, a stage ends where it would have."""
from dataclasses import replace

import pytest
import torch

from guie.configs import get_config
from guie.pipeline import prepare
from guie.train.loop import run_stage


def _session(sample_data):
    root, sources = sample_data
    smoke = get_config("smoke")
    cfg = replace(smoke, data=replace(smoke.data, root=str(root), sources=tuple(sources),
                                      sample_instances=0, heldout_classes=0,
                                      distractor_classes=0, num_workers=0))
    return prepare(cfg)


def _run(sample_data, stage, out_dir, cache_dir, resume=True):
    s = _session(sample_data)
    ctx = replace(s.train_context(out_dir), evaluator=None, cache_dir=cache_dir)
    outcome = run_stage(ctx, stage, resume=resume)
    state = {**{f"m.{k}": v.clone() for k, v in s.model.state_dict().items()},
             **{f"l.{k}": v.clone() for k, v in s.loss_fn.state_dict().items()}}
    return outcome, state


@pytest.mark.parametrize("which", ["stage1", "stage2"])
def test_resumed_stage_ends_where_an_uninterrupted_one_does(sample_data, tmp_path, which):
    base = get_config("smoke").stage(which)
    # stage 2: a fraction of an epoch with gradient accumulation, to keep the test quick
    stage = replace(base, epochs=0.25, grad_accum=2) if which == "stage2" else \
        replace(base, epochs=1.5)
    cache = tmp_path / "cache"
    straight, want = _run(sample_data, stage, tmp_path / "a", cache)
    assert straight.status == "done"

    paused, _ = _run(sample_data, replace(stage, max_hours=1e-9, checkpoint_every_steps=1),
                     tmp_path / "b", cache)
    assert paused.status == "paused" and paused.checkpoint.name == "last.pt"
    resumed, got = _run(sample_data, stage, tmp_path / "b", cache)
    assert resumed.status == "done"
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    for key, value in want.items():
        assert torch.allclose(got[key], value, atol=1e-6), key
    if which == "stage1":  # a frozen stage leaves the backbone alone
        initial = _session(sample_data).model.visual.state_dict()
        assert all(torch.equal(initial[k], want[f"m.visual.{k}"]) for k in initial)


def test_finished_stage_is_not_rerun(sample_data, tmp_path):
    stage = replace(get_config("smoke").stage("stage1"), epochs=0.5)
    first, state = _run(sample_data, stage, tmp_path, tmp_path / "cache")
    again, state2 = _run(sample_data, stage, tmp_path, tmp_path / "cache")
    assert again.history == first.history
    assert all(torch.equal(state[k], state2[k]) for k in state)


def test_resume_under_a_different_data_order_is_refused(sample_data, tmp_path):
    stage = replace(get_config("smoke").stage("stage1"), epochs=1.0, max_hours=1e-9,
                    checkpoint_every_steps=1)
    paused, _ = _run(sample_data, stage, tmp_path, tmp_path / "cache")
    assert paused.status == "paused"
    with pytest.raises(ValueError, match="data order changed.*batch_size"):
        _run(sample_data, replace(stage, batch_size=32, max_hours=0.0), tmp_path,
             tmp_path / "cache")


def test_ema_stage_resumes_exactly_and_swaps_the_average_in(sample_data, tmp_path):
    stage = replace(get_config("smoke").stage("stage1"), epochs=1.5, ema_decay=0.9)
    cache = tmp_path / "cache"
    straight, want = _run(sample_data, stage, tmp_path / "a", cache)
    _run(sample_data, replace(stage, max_hours=1e-9, checkpoint_every_steps=1), tmp_path / "b",
         cache)
    resumed, got = _run(sample_data, stage, tmp_path / "b", cache)
    assert resumed.status == "done"
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    _, plain = _run(sample_data, replace(stage, ema_decay=0.0), tmp_path / "c", cache)
    head = [k for k in want if k.startswith("m.head.")]
    assert any(not torch.allclose(want[k], plain[k]) for k in head)  # the average, not the last


def test_skipped_steps_reach_the_history_the_curves_and_the_report(sample_data, tmp_path,
                                                                    monkeypatch):
    """A non-finite gradient norm at the second optimizer step: skipped, and counted in the
    stage's history rows (with every step's norm), curves.csv and the run report."""
    import pandas as pd

    from guie.pipeline import run_training
    from guie.train import step as step_module

    real, calls = step_module.grad_total_norm, []

    def norm_with_an_inf(params, clip_norm):
        calls.append(clip_norm)
        return torch.tensor(float("inf")) if len(calls) == 2 else real(params, clip_norm)
    monkeypatch.setattr(step_module, "grad_total_norm", norm_with_an_inf)
    s = _session(sample_data)
    stage = replace(get_config("smoke").stage("stage1"), epochs=1.0, grad_clip_norm=5.0)
    s = replace(s, cfg=replace(s.cfg, stages=(stage,)), evaluator=None)
    report = run_training(s, tmp_path / "out")
    assert report["status"] == "done" and report["skipped_steps_stage1"] == 1
    assert set(calls) == {5.0}
    curves = pd.read_csv(tmp_path / "out" / "curves.csv")
    steps = curves.dropna(subset=["grad_norm"])
    assert len(steps) == len(calls) and steps["skipped_steps"].tolist()[:3] == [0, 1, 1]
    norms = steps["grad_norm"].tolist()
    assert norms[0] > 0 and norms[1] == float("inf") and norms[2] > 0
