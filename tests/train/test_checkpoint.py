"""Training output size: finished stages keep no optimizer state, superseded backbone copies go,
and `predict_output_bytes` predicts the real files of a smoke run from parameter counts."""
from dataclasses import replace

import pytest
import torch

from guie.configs import get_config
from guie.export.build import load_trained
from guie.pipeline import train
from guie.train.checkpoint import (CHECKPOINT_OVERHEAD_BYTES, load_checkpoint,
                                   predict_output_bytes)


def _cfg(sample_data, stages):
    root, sources = sample_data
    smoke = get_config("smoke")
    return replace(smoke, data=replace(smoke.data, root=str(root), sources=tuple(sources),
                                       sample_instances=0, heldout_classes=0,
                                       distractor_classes=0, num_workers=0),
                   stages=stages)


def _assert_predicted(predicted: int, path):
    """The prediction is an upper bound, off by at most the allowance for non-tensor content."""
    actual = path.stat().st_size
    assert predicted - CHECKPOINT_OVERHEAD_BYTES <= actual <= predicted, (path, actual, predicted)


def test_prediction_matches_a_smoke_runs_files_and_finished_stages_drop_last_pt(sample_data,
                                                                               tmp_path, capsys):
    smoke = get_config("smoke")
    cfg = _cfg(sample_data, (replace(smoke.stage("stage1"), epochs=0.5),
                             replace(smoke.stage("stage2"), epochs=0.1, checkpoint_every_steps=1)))
    out = tmp_path / "run"
    paused = replace(cfg, stages=(cfg.stages[0], replace(cfg.stages[1], max_hours=1e-9)))
    assert train(paused, str(out))["status"] == "paused"
    num_classes = load_checkpoint(out / "stage1" / "final.pt")["model"]["loss"]["weight"].shape[0]
    size = predict_output_bytes(cfg, num_classes)
    stage1, stage2 = size.stages
    _assert_predicted(stage1.final_pt, out / "stage1" / "final.pt")
    _assert_predicted(stage2.last_pt, out / "stage2" / "last.pt")  # weights + AdamW moments
    assert not (out / "stage1" / "last.pt").exists()  # finished: final.pt is all it needs

    capsys.readouterr()
    assert train(cfg, str(out))["status"] == "done"  # resumes stage 2 and finishes it
    said = capsys.readouterr().out
    assert f"stage1: complete, skipped ({out / 'stage1' / 'final.pt'}" in said
    assert "stage2: resumed at batch 1 of " in said and str(out / "stage2" / "last.pt") in said
    _assert_predicted(stage2.final_pt, out / "stage2" / "final.pt")
    assert not (out / "stage2" / "last.pt").exists()
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert total <= size.end_bytes <= total + 2 * CHECKPOINT_OVERHEAD_BYTES + 2**20
    assert size.peak_bytes >= stage1.final_pt + 2 * stage2.last_pt


def test_a_later_backbone_stage_supersedes_the_earlier_copy(sample_data, tmp_path):
    smoke = get_config("smoke")
    first = replace(smoke.stage("stage2"), name="b1", epochs=0.1)
    cfg = _cfg(sample_data, (first, replace(first, name="b2")))
    out = tmp_path / "run"
    train(cfg, str(out))
    b1 = load_checkpoint(out / "b1" / "final.pt")
    assert "visual" not in b1["model"] and b1["backbone_in"] == "b2"
    assert "visual" in load_checkpoint(out / "b2" / "final.pt")["model"]
    model, _ = load_trained(cfg, out)
    b2_visual = load_checkpoint(out / "b2" / "final.pt")["model"]["visual"]
    assert all(torch.equal(v, b2_visual[k]) for k, v in model.visual.state_dict().items())
    num_classes = b1["model"]["loss"]["weight"].shape[0]
    size = predict_output_bytes(cfg, num_classes)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert total <= size.end_bytes <= total + 2 * CHECKPOINT_OVERHEAD_BYTES + 2**20


def test_the_reference_recipes_stay_under_kaggles_cap():
    cap = 20 * 10**9
    for name in ("first_place", "third_place"):
        size = predict_output_bytes(get_config(name), 17691)
        assert size.fits(cap), (name, size.peak_bytes)
    with pytest.raises(ValueError, match="num_classes"):
        predict_output_bytes(get_config("smoke"))
