"""guie.plan.parallel: auto's rule, FSDP's column, and its transient memory against the CPU
allocator under a real `fully_shard`."""
from __future__ import annotations

from dataclasses import replace

import pytest

from guie.config_io import apply_overrides
from guie.configs import get_config
from guie.kaggle.platform import MACHINE_SHAPES
from guie.plan import parallel
from guie.plan.core import plan_stage
from guie.plan.parallel import DDP, FSDP, decide

T4 = MACHINE_SHAPES["NvidiaTeslaT4"]


def test_auto_prefers_ddp_with_headroom_then_fsdp_then_reports_ddp():
    assert decide("auto", 2, False, 13.0, 9.0, 14.56).parallel == DDP  # 1.56 GiB to spare
    assert decide("auto", 2, False, 14.0, 9.0, 14.56).parallel == FSDP  # 0.56 < 5% of 14.56
    assert decide("auto", 2, False, 16.0, 15.0, 14.56).parallel == DDP  # neither fits
    assert decide("fsdp", 2, False, 1.0, 9.0, 14.56).parallel == FSDP  # the config decides
    assert decide("fsdp", 1, False, 1.0, 9.0, 14.56).parallel == DDP  # one GPU: plain
    assert decide("fsdp", 2, True, 1.0, None, 14.56).parallel == DDP  # a cached head stage


@pytest.mark.parametrize("limit_gib, expected", [(14.56, DDP), (13.0, FSDP), (9.0, DDP)])
def test_choose_parallel_for_third_place_stage2_on_two_gpus(limit_gib, expected):
    """DDP needs ~13.5 GiB, FSDP ~9.7: DDP on a T4 (1 GiB to spare), FSDP on a 13 GiB card,
    DDP (the reported failure) where neither fits."""
    cfg = get_config("third_place")
    assert parallel.choose_parallel(cfg, "stage2", 2, limit_gib) == expected
    assert parallel.choose_parallel(cfg, cfg.stage("stage2"), 1, limit_gib) == DDP


def test_fsdp_column_shards_the_state_and_counts_unsynced_accumulation():
    cfg = get_config("tiny")
    sp = plan_stage(cfg, cfg.stage("stage2"), T4, 600, 0, 11.0)
    ddp = {t.name: t.gib for t in sp.terms}
    fsdp = {t.name: t.gib for t in sp.fsdp_terms}
    for name in ("gradients", "optimizer state"):
        assert fsdp[name] == pytest.approx(ddp[name] / 2)
    assert "autocast weight copies" not in fsdp and "unsharded blocks in flight" in fsdp
    assert sp.fsdp_gib == pytest.approx(sum(fsdp.values()), rel=0.05)
    four = replace(T4, gpus=4)
    wide = {t.name: t.gib for t in plan_stage(cfg, cfg.stage("stage2"), four, 600, 0,
                                              11.0).fsdp_terms}
    assert wide["optimizer state"] == pytest.approx(fsdp["optimizer state"] / 2)
    unsynced = apply_overrides(cfg, ["stage2.grad_accum=2",
                                     "stage2.fsdp_reduce_every_micro_step=false"])
    terms = {t.name: t.gib for t in plan_stage(unsynced, unsynced.stage("stage2"), T4, 600, 0,
                                               11.0).fsdp_terms}
    assert terms["unsynced accumulation gradient"] == pytest.approx(ddp["gradients"])
    assert sp.parallel == DDP and plan_stage(
        cfg, cfg.stage("stage1"), T4, 600, 0, 11.0).fsdp_gib is None  # cached: not sharded


def test_fsdp_time_adds_only_its_traffic_beyond_ddps():
    cfg = get_config("tiny")
    same = plan_stage(cfg, cfg.stage("stage2"), T4, 600, 10**5, 11.0)
    # two GPUs, one micro-step: two AMP all-gathers + one fp32 reduce-scatter = one all-reduce
    assert same.fsdp_hours == pytest.approx(same.hours)
    accum = apply_overrides(cfg, ["stage2.grad_accum=4", "stage2.parallel=fsdp"])
    sp = plan_stage(accum, accum.stage("stage2"), T4, 600, 10**5, 11.0)
    assert sp.parallel == FSDP and sp.hours == sp.fsdp_hours > same.hours
    assert "GB/s" in sp.comm_basis
