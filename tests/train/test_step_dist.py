"""The training step under DDP and FSDP2 equals one big batch in one process (issues 22, 24).

One torchrun of two gloo CPU processes (tests/train/dist_step_worker.py) serves every test here;
the one-process reference runs in this process over the same samples. fp32 tolerance: the two
runs differ only in the order of floating-point sums (the all-reduce's mean against one batch's
mean), measured at ~2e-9 in the gradients and ~2.5e-6 in the weights after 3 AdamW steps at
LR 1e-3; the bounds below leave an order of magnitude beyond that.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
SRC = HERE.parents[1] / "src"


def _worker():
    spec = importlib.util.spec_from_file_location("dist_step_worker", HERE / "dist_step_worker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _worker()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, list[dict]]:
    """{scenario: [rank 0's record, rank 1's]} from one torchrun."""
    out = tmp_path_factory.mktemp("ddp-step")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(HERE / "dist_step_worker.py"), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {name: [torch.load(out / f"{name}-rank{r}.pt", weights_only=False) for r in (0, 1)]
            for name in worker.SCENARIOS}


@pytest.fixture(scope="module")
def one_process() -> dict[str, dict]:
    return {name: worker.run_scenario(name, rank=0, world=1) for name in worker.SCENARIOS}


def _assert_close(got: dict, want: dict, atol: float, rtol: float, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key, value in want.items():
        assert torch.allclose(got[key], value, atol=atol, rtol=rtol), \
            f"{what} {key}: off by {(got[key] - value).abs().max().item():.3g}"


@pytest.mark.parametrize("scenario", ["equal", "fsdp", "fsdp_unsynced"])
def test_ddp_and_fsdp_with_accumulation_and_clipping_equal_one_big_batch(two_ranks, one_process,
                                                                        scenario):
    """DDP, FSDP2 reduce-scattering every micro-step, and FSDP2 once per window (with
    activation checkpointing through the sharded blocks)."""
    ranks, ref = two_ranks[scenario], one_process[scenario]
    want_parallel = "ddp" if scenario == "equal" else "fsdp"
    assert [r["parallel"] for r in ranks] == [want_parallel] * 2
    # every trained parameter sharded under FSDP (DTensors), none under DDP
    assert [r["sharded"] for r in ranks] == [want_parallel == "fsdp"] * 2
    assert len(ref["steps"]) == worker.OPTIMIZER_STEPS
    for rank in ranks:
        for i, (got, want) in enumerate(zip(rank["steps"], ref["steps"], strict=True)):
            # the clip threshold sits below every observed norm, so every step was clipped...
            assert want["grad_norm"] > 2 * worker.CLIP_NORM, want["grad_norm"]
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5), i
            clipped = torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in got["grads"].values()]))
            assert clipped.item() == pytest.approx(worker.CLIP_NORM, rel=1e-4), i
            # ...and the optimizer saw the same unscaled, clipped gradients of every tensor
            _assert_close(got["grads"], want["grads"], atol=1e-8, rtol=1e-4, what=f"step {i}")
        groups = {k.split(".")[1] for k in rank["params"]}
        assert {"visual", "head", "weight"} <= groups  # backbone, head, class centres
        _assert_close(rank["params"], ref["params"], atol=2e-5, rtol=0, what="weight")
        _assert_close({k: m[0] for k, m in rank["moments"].items()},
                      {k: m[0] for k, m in ref["moments"].items()}, atol=1e-8, rtol=1e-4,
                      what="exp_avg")
        _assert_close({k: m[1] for k, m in rank["moments"].items()},
                      {k: m[1] for k, m in ref["moments"].items()}, atol=1e-12, rtol=1e-4,
                      what="exp_avg_sq")
        # the plain model the pipeline reads holds the trained weights on every rank
        _assert_close(rank["plain"], ref["plain"], atol=2e-5, rtol=0, what="plain")
    # the ranks agree exactly
    _assert_close(ranks[1]["params"], ranks[0]["params"], atol=0, rtol=0, what="rank 1")


def test_one_gradient_allreduce_per_accumulation_window(two_ranks):
    """no_sync on the window's first micro-batch: DDP's buckets (however many) all-reduce
    during the last micro-batch's backward only, covering each gradient element once."""
    record = two_ranks["equal"][0]
    accum = worker.STAGE.grad_accum
    windows = {b // accum for b, _ in record["allreduces"]}
    assert windows == set(range(worker.OPTIMIZER_STEPS))
    for w in windows:
        in_window = [(b, n) for b, n in record["allreduces"] if b // accum == w]
        assert {b for b, _ in in_window} == {w * accum + accum - 1}, in_window
        assert sum(n for _, n in in_window) == record["trained_elements"], in_window


@pytest.mark.parametrize("scenario", ["inf", "fsdp_inf"])
def test_an_inf_on_one_rank_skips_the_step_on_every_rank_and_halves_the_scale(two_ranks,
                                                                               one_process,
                                                                               scenario):
    """fp16 autocast with the CPU grad scaler (under FSDP2 fp16 parameters and the sharded
    scaler, whose inf check all ranks agree on); rank 0's micro-batch 2 holds an inf."""
    init_scale = worker.SCENARIOS[scenario]["init_scale"]
    for record in [*two_ranks[scenario], one_process[scenario]]:
        first, skipped, after = record["steps"]
        assert first["changed"] and first["skipped_steps"] == 0
        assert first["scale"] == init_scale
        assert not skipped["changed"], "a non-finite step changed the weights"
        assert skipped["skipped_steps"] == 1 and skipped["scale"] == init_scale / 2
        assert after["changed"] and after["skipped_steps"] == 1
    ranks = two_ranks[scenario]
    _assert_close(ranks[1]["params"], ranks[0]["params"], atol=0, rtol=0, what="rank 1")
