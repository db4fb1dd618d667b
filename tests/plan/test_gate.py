"""The memory preflight (`guie.plan.gate.memory_refusals`): one line per stage that does not
fit, with the GiB, the limit and the fix; nothing for a plan that fits; seconds, never a
measurement of a large backbone."""
from __future__ import annotations

import json
import time

import pytest

from guie.configs import get_config, resolve_config
from guie.plan import gate, measurements


@pytest.fixture
def no_measuring(tmp_path, monkeypatch):
    """An empty user cache and no measuring: only the shipped measurements are at hand."""
    monkeypatch.setenv("GUIE_CACHE_DIR", str(tmp_path / "cache"))

    def refuse(key):
        raise AssertionError(f"the gate measured {key.text()}")
    monkeypatch.setattr(measurements, "measure", refuse)


def test_third_place_passes_on_2xt4_in_seconds_from_shipped_measurements(no_measuring):
    started = time.monotonic()
    assert gate.memory_refusals(get_config("third_place"), "NvidiaTeslaT4") == []
    assert time.monotonic() - started < 60


def test_a_stage_that_does_not_fit_is_refused_with_its_gib_limit_and_fix(no_measuring):
    held = ["stage2.parallel=ddp", "stage2.batch_size=128"]
    (message,) = gate.memory_refusals(resolve_config("third_place", held), "NvidiaTeslaT4")
    assert message.startswith("stage2 needs ") and "at batch 128" in message
    needed = float(message.split("needs ")[1].split(" GiB")[0])
    assert needed > 14.56 and "over the 14.56 GiB limit on NvidiaTeslaT4" in message
    assert "fix: stage2.parallel=fsdp (the same training" in message
    assert "\n" not in message
    assert gate.memory_refusals(resolve_config("third_place", held + ["stage2.parallel=fsdp"]),
                                "NvidiaTeslaT4") == []
    # too large for either: the same effective batch through accumulation
    (message,) = gate.memory_refusals(resolve_config("third_place", ["stage2.batch_size=1024"]),
                                      "NvidiaTeslaT4")
    assert "fix: stage2.batch_size=" in message and "stage2.grad_accum=" in message


def test_a_probe_record_of_the_machine_sets_the_limit(no_measuring, tmp_path):
    """What `submit.py probe` recorded of this shape wins over the kit's table: a card with
    less to allocate than stage 2 needs under DDP (~13.5 GiB) or FSDP (~8.6) refuses it."""
    record = {"machine_shape": "NvidiaTeslaT4",
              "gpu": {"devices": [{"name": "Tesla T4", "memory_gib": 8.0,
                                   "allocatable_gib": 8.0}] * 2}}
    (tmp_path / "platform.json").write_text(json.dumps(record))
    (message,) = gate.memory_refusals(get_config("third_place"), "NvidiaTeslaT4",
                                      workdir=tmp_path)
    assert "over the 8 GiB limit" in message and "submit.py probe" in message
    # a record of another shape says nothing about this one
    record["machine_shape"] = "NvidiaL4X1"
    (tmp_path / "platform.json").write_text(json.dumps(record))
    assert gate.memory_refusals(get_config("third_place"), "NvidiaTeslaT4",
                                workdir=tmp_path) == []


def test_what_the_plan_cannot_judge_in_seconds_is_let_through(no_measuring):
    # ViT-B-32 (88M parameters) has no shipped measurement: measuring it is not the gate's job
    big = resolve_config("third_place", ["model.backbone=ViT-B-32"])
    assert gate.memory_refusals(big, "NvidiaTeslaT4") == []
    assert gate.memory_refusals(get_config("third_place"), "TpuV5E8") == []
    assert gate.memory_refusals(get_config("third_place"), "NvidiaTeslaT5") == []


def test_a_small_backbone_is_measured_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("GUIE_CACHE_DIR", str(tmp_path))
    cfg = resolve_config("tiny", ["stage2.batch_size=65536"])
    (message,) = gate.memory_refusals(cfg, "NvidiaTeslaT4")
    assert message.startswith("stage2 needs ") and "fix: " in message
    assert measurements.cache_path().is_file()  # measured here, in seconds
