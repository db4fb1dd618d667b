"""Time estimates: consistent with guie.plan.estimates, replaced by a committed GPU run."""
from __future__ import annotations

import json

import pytest

from guie.plan import estimates
from guie.plan import gpus, timing

VIT_H_FLOP = estimates.VIT_H_FORWARD_GFLOP * 1e9


def test_t4_rates_reproduce_the_published_anchors():
    rate = timing.rate_for(gpus.GPUS["T4"])
    reference = estimates.kaggle_estimates()
    assert timing.scoring_hours(VIT_H_FLOP, 1, rate) == pytest.approx(
        reference["T4"]["test_pass_205k_h"], abs=0.01)
    one_epoch = timing.backbone_stage_time(estimates.TRAIN_IMAGES, 1.0, VIT_H_FLOP, 1.0, False,
                                           rate, 1, 4)
    assert one_epoch.hours == pytest.approx(reference["T4"]["stage2_one_epoch_885k_h"], rel=0.01)
    two = timing.backbone_stage_time(estimates.TRAIN_IMAGES, 1.0, VIT_H_FLOP, 1.0, False,
                                     rate, 2, 4)
    assert two.hours == pytest.approx(reference["2xT4"]["stage2_one_epoch_885k_h"], rel=0.01)


def test_checkpointing_and_frozen_blocks_change_the_training_flops():
    rate = timing.rate_for(gpus.GPUS["L4"])
    args = (10**5, 1.0, VIT_H_FLOP)
    full = timing.backbone_stage_time(*args, 1.0, False, rate, 1, 4).hours
    ckpt = timing.backbone_stage_time(*args, 1.0, True, rate, 1, 4).hours
    half = timing.backbone_stage_time(*args, 0.5, False, rate, 1, 4).hours
    assert ckpt == pytest.approx(full * 4 / 3) and half == pytest.approx(full * 2 / 3)


def test_a_small_model_is_bound_by_jpeg_decoding():
    rate = timing.rate_for(gpus.GPUS["H100"])
    st = timing.backbone_stage_time(10**5, 1.0, 1e8, 1.0, False, rate, 1, 2)
    assert st.train_img_s == timing.loader_img_s(2) and "data loading-bound" in st.basis


def test_a_committed_gpu_run_replaces_the_estimate(tmp_path):
    run = {"benchmarks": {"gpu": {
        "details": {"device": "NVIDIA L4"},
        "figures": [{"name": "gpu_train_img_s", "ours": 30.0},
                    {"name": "gpu_inference_fp16_img_s", "ours": 120.0}]}}}
    (tmp_path / "l4.json").write_text(json.dumps(run))
    rate = timing.bench_measurement(gpus.GPUS["L4"], tmp_path)
    assert rate.measured and "l4.json" in rate.source
    assert rate.train_tflops == pytest.approx(30.0 * 3 * VIT_H_FLOP / 1e12)
    assert timing.bench_measurement(gpus.GPUS["T4"], tmp_path) is None
    # the repository's own bench/ holds CPU runs only so far: estimates stand
    assert not timing.rate_for(gpus.GPUS["T4"]).measured


def test_sessions_pack_stages_back_to_back():
    assert timing.sessions_needed([0.5, 10.0], 11.0) == 1
    assert timing.sessions_needed([0.5, 11.0], 11.0) == 2
    assert timing.sessions_needed([23.0], 11.0) == 3
    assert timing.sessions_needed([], 11.0) == 0


def test_every_gpu_shape_the_plan_offers_has_its_facts():
    """`submit.py plan --machine-shape` offers every GPU shape of guie.kaggle.platform."""
    from guie.kaggle.platform import MACHINE_SHAPES

    missing = [n for n, s in MACHINE_SHAPES.items() if s.gpus and gpus.gpu_of(s) is None]
    assert not missing
