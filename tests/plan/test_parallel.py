"""guie.plan.parallel: auto's rule, FSDP's column, and its transient memory against the CPU
allocator under a real `fully_shard`."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from guie.config_io import apply_overrides
from guie.configs import get_config
from guie.kaggle.platform import MACHINE_SHAPES
from guie.plan import auto, parallel
from guie.plan.core import plan_stage
from guie.plan.measurements import Key
from guie.plan.parallel import DDP, FSDP, decide

T4 = MACHINE_SHAPES["NvidiaTeslaT4"]
REPO = Path(__file__).resolve().parents[2]


def test_auto_prefers_ddp_with_headroom_then_fsdp_then_reports_ddp():
    assert decide("auto", 2, False, 13.0, 9.0, 14.56).parallel == DDP  # 1.56 GiB to spare
    assert decide("auto", 2, False, 14.0, 9.0, 14.56).parallel == FSDP  # 0.56 < 5% of 14.56
    assert decide("auto", 2, False, 16.0, 15.0, 14.56).parallel == DDP  # neither fits
    assert decide("fsdp", 2, False, 1.0, 9.0, 14.56).parallel == FSDP  # the config decides
    assert decide("fsdp", 1, False, 1.0, 9.0, 14.56).parallel == DDP  # one GPU: plain
    assert decide("fsdp", 2, True, 1.0, None, 14.56).parallel == DDP  # a cached head stage


@pytest.mark.parametrize("limit_gib, expected", [(14.56, DDP), (13.0, FSDP), (8.0, DDP)])
def test_choose_parallel_for_third_place_stage2_on_two_gpus(limit_gib, expected):
    """DDP needs ~13.5 GiB, FSDP ~8.6: DDP on a T4 (1 GiB to spare), FSDP on a 13 GiB card,
    DDP (the reported failure) where neither fits."""
    import torch

    cfg = get_config("third_place")
    torch.manual_seed(0)
    expected_draw = torch.rand(1)
    torch.manual_seed(0)
    assert auto.choose_parallel(cfg, "stage2", 2, limit_gib) == expected
    assert torch.equal(torch.rand(1), expected_draw)  # the training's random stream untouched
    assert auto.choose_parallel(cfg, cfg.stage("stage2"), 1, limit_gib) == DDP


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


# ----------------------------------------------------------------------------- the allocator


def fsdp_transient(key: Key, batch: int, grad_accum: int, reduce_every: bool,
                   rendezvous: str) -> tuple[float, int]:
    """In this process, as rank 0 of a one-process gloo group: the plan's FSDP transient bytes
    for the tower, and the CPU allocator's (peak over an accumulation window, from a state
    where the sharded gradients already exist, so the window adds transients only)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from guie.plan import measurements, probe
    from guie.plan.memory import StageSetup
    from test_probe import allocator_peak_bytes_of  # this folder: the same profiler count

    torch.set_num_threads(1)  # every allocation on the profiled thread (test_probe's doc)
    dist.init_process_group("gloo", init_method=rendezvous, rank=0, world_size=1)
    m = measurements.get(key)  # the user's cache: ViT-B-32 measures once, in minutes when busy
    visual, backbone = measurements.build_tower(key)
    groups = backbone.layer_groups()
    blocks = [sum(p.numel() for p in g) for g in groups[1:-1]]
    total = sum(p.numel() for p in visual.parameters())
    setup = StageSetup("tower", batch, 1, False, True, key.checkpointing, key.amp, total, total,
                       False, 1.0, m, None, (0, 0), 0, 0.0, max(blocks), total - sum(blocks), 0,
                       grad_accum, reduce_every)
    predicted = parallel.fsdp_transient_bytes(setup, batch)
    # as guie.train.fsdp.shard_replica: each block a unit in the AMP dtype, the tower the root
    low = MixedPrecisionPolicy(param_dtype=probe.AMP_DTYPES[key.amp], reduce_dtype=torch.float32)
    mesh = init_device_mesh("cpu", (1,))
    for block in visual.transformer.resblocks:
        fully_shard(block, mesh=mesh, mp_policy=low)
    fully_shard(visual, mesh=mesh, mp_policy=low)
    gen = torch.Generator().manual_seed(1)
    images = [torch.randn(batch, 3, key.image_size_px, key.image_size_px, generator=gen)
              for _ in range(grad_accum)]

    def window():
        for i, x in enumerate(images):
            visual.set_requires_gradient_sync(reduce_every or i == grad_accum - 1)
            probe.train_step(visual, x, key.amp, "fused")
    window()  # the sharded gradients exist from here on; the measured window accumulates
    measured = allocator_peak_bytes_of(window)
    dist.destroy_process_group()
    return predicted, measured


def check_fsdp(key: Key, batch: int, reduce_every: bool, tmp_path, rel: float = 0.15):
    rendezvous = f"file://{tmp_path / 'rendezvous'}"
    args = json.dumps([asdict(key), batch, 2, reduce_every, rendezvous])
    proc = subprocess.run([sys.executable, __file__, args], capture_output=True, text=True,
                          timeout=1800, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    predicted, measured = json.loads(proc.stdout.strip().splitlines()[-1])
    assert predicted == pytest.approx(measured, rel=rel), (key.text(), predicted, measured)
    return predicted, measured


def test_tiny_fsdp_transient_matches_the_allocator(tmp_path):
    """grad_accum=2, reduce-scatter every micro-step (the default): within 15%."""
    check_fsdp(Key("guie-tiny-vit", 64, 0, "bf16", True), 4, True, tmp_path)


def test_tiny_fsdp_unsynced_accumulation_is_an_upper_bound(tmp_path):
    """grad_accum=2 reducing only at the window's end: the plan counts the whole unsharded fp32
    gradient beside the step's peak; the allocator's peak comes while the last micro-step's
    backward has already reduced (and freed) some blocks' gradients. Never under, within 20%."""
    predicted, measured = check_fsdp(Key("guie-tiny-vit", 64, 0, "bf16", True), 4, False,
                                     tmp_path, rel=0.2)
    assert predicted >= measured


@pytest.mark.slow
def test_vit_b_32_fsdp_transient_matches_the_allocator(tmp_path):
    predicted, _ = check_fsdp(Key("ViT-B-32", 224, 0, "bf16", True), 4, True, tmp_path)
    assert predicted > 50 * 2**20  # a real workload, not a rounding error


if __name__ == "__main__":  # one check in its own process: check_fsdp
    key, batch, accum, reduce_every, rendezvous = json.loads(sys.argv[1])
    print(json.dumps(fsdp_transient(Key(**key), batch, accum, reduce_every, rendezvous)))
