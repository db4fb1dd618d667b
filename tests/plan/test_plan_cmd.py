"""`submit.py plan`: the table, --json with the issue's keys, exit status, user errors."""
from __future__ import annotations

import json

from guie_cli.main import main

REQUIRED_STAGE_KEYS = {"name", "fits", "gpu_memory_gib", "gpu_memory_limit_gib", "max_batch",
                       "hours", "sessions"}
REQUIRED_KEYS = {"machine_shape", "stages", "output_gib", "output_limit_gib", "quota_share",
                 "scoring_hours"}


def test_plan_prints_every_stage_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", "smoke", "--machine-shape", "NvidiaL4",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "stage1: fits" in text and "stage2: fits" in text
    assert "[measured]" in text and "[estimate]" in text and "[counted]" in text
    assert "flash attention" in text  # the L4's attention backend is said
    data = json.loads(out.read_text())
    assert REQUIRED_KEYS <= set(data) and data["machine_shape"] == "NvidiaL4"
    assert [s["name"] for s in data["stages"]] == ["stage1", "stage2"]
    for stage in data["stages"]:
        assert REQUIRED_STAGE_KEYS <= set(stage)
        assert stage["gpu_memory_limit_gib"] == 22.5
    assert data["memory_limit"]["kind"] == "datasheet"  # no allocatable figure for an L4 yet


def test_two_gpus_show_ddp_and_fsdp_side_by_side_and_autos_pick(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", "smoke", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "GPU memory limit: 14.56 GiB per GPU" in text  # a T4: what PyTorch can allocate
    assert "DDP       FSDP" in text and "parallel: ddp (auto: DDP fits" in text
    stage2 = json.loads(out.read_text())["stages"][1]
    assert stage2["parallel"] == "ddp" and stage2["fsdp_gib"] < stage2["ddp_gib"]
    assert {t["name"] for t in stage2["fsdp_terms"]} >= {"unsharded blocks in flight",
                                                          "root + class centres unsharded"}
    assert "FSDP at an evaluation point" in text  # the plain model back on the device


def test_a_stage_that_does_not_fit_exits_1_and_prints_the_fix(capsys):
    assert main(["plan", "--config", "smoke", "stage2.batch_size=20000"]) == 1
    text = capsys.readouterr().out
    assert "stage2: DOES NOT FIT" in text
    assert "fix: model.grad_checkpointing=true" in text
    assert "no flash attention" in text  # a T4


def test_overrides_and_shapes_are_checked_like_every_command(capsys):
    assert main(["plan", "--config", "smoke", "stage2.batchsize=4"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["plan", "--config", "smoke", "--machine-shape", "NvidiaTeslaT5"]) == 2
    assert "did you mean" in capsys.readouterr().err
