"""Which parallelism a stage runs (guie.train.fsdp.resolve_parallel), in one process."""
from dataclasses import replace

import torch

from guie.config import StageConfig
from guie.configs import get_config
from guie.train import dist, fsdp


def test_one_rank_trains_plainly_and_a_cached_stage_runs_ddp():
    stage = StageConfig(name="s", parallel="fsdp")
    assert fsdp.resolve_parallel(stage, world=1, from_cache=False) == "single"
    assert fsdp.resolve_parallel(stage, world=2, from_cache=True) == "ddp"
    assert fsdp.resolve_parallel(stage, world=2, from_cache=False) == "fsdp"
    assert fsdp.resolve_parallel(replace(stage, parallel="ddp"), 2, False) == "ddp"


def test_auto_asks_the_planners_rule_and_says_its_answer(capsys):
    stage = StageConfig(name="stage2", parallel="auto")
    assert fsdp.resolve_parallel(stage, 2, False, auto=lambda: "fsdp") == "fsdp"
    assert "stage2: parallel=auto -> fsdp" in capsys.readouterr().out
    assert fsdp.resolve_parallel(stage, 2, False) == "ddp"  # no rule given: DDP
    # on a CPU there is no GPU memory for the rule to budget: DDP
    cfg = get_config("smoke")
    assert fsdp.auto_parallel(cfg, cfg.stage("stage2"), 2, torch.device("cpu"), 10) == "ddp"


def test_fsdp_below_the_minimum_torch_falls_back_to_ddp_with_a_message(monkeypatch, capsys):
    monkeypatch.setattr(dist, "fsdp_supported",
                        lambda: (False, "torch 2.4.1 is older than 2.6: FSDP2 needs 2.6"))
    got = fsdp.resolve_parallel(StageConfig(name="stage2", parallel="fsdp"), 2, False)
    assert got == "ddp"
    said = capsys.readouterr().out
    assert "stage2.parallel=fsdp: torch 2.4.1 is older than 2.6" in said and "DDP" in said
    # auto's choice of FSDP falls back the same way
    got = fsdp.resolve_parallel(StageConfig(name="stage2"), 2, False, auto=lambda: "fsdp")
    assert got == "ddp"
