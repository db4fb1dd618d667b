import json
from dataclasses import replace

import pytest

from guie.config import ExperimentConfig, apply_overrides, load_config, save_config, to_dict
from guie.configs import get_config, list_configs


def test_overrides_are_typed_and_nested():
    cfg = apply_overrides(ExperimentConfig(), ["stage2.lr_backbone=2e-6", "--model.dropout=0.1",
                                               "stage1.augment=[\"hflip\"]", "export.compat=torch1.11"])
    assert cfg.stage2.lr_backbone == 2e-6 and cfg.model.dropout == 0.1
    assert cfg.stage1.augment == ("hflip",) and cfg.export.compat == "torch1.11"


@pytest.mark.parametrize("bad, message", [
    ("stage1.lr_hed=1", "no field 'lr_hed'"),
    ("stage1.batch_size=abc", "expected an int"),
    ("export.compat=torch2", "not one of"),
    ("model=3", "expected a mapping"),
    ("stage1.lr_head", "key=value"),
])
def test_bad_overrides_are_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(ExperimentConfig(), [bad])


@pytest.mark.parametrize("name", list_configs())
def test_shipped_configs_round_trip(name, tmp_path):
    cfg = get_config(name)
    save_config(cfg, tmp_path / "c.json")
    assert load_config(tmp_path / "c.json") == cfg


def test_unknown_config_name():
    with pytest.raises(ValueError, match="shipped"):
        get_config("nope")


def test_stages_are_addressed_by_name():
    cfg = apply_overrides(get_config("smoke"), ["stage2.train=[\"head\", \"blocks:0-1\"]",
                                                "stage1.image_size_px=80"])
    assert cfg.stage2.train == ("head", "blocks:0-1") and cfg.stage("stage1").image_size_px == 80
    with pytest.raises(AttributeError, match="no field or stage 'stage9'"):
        cfg.stage9
    with pytest.raises(ValueError, match="must be unique"):
        replace(cfg, stages=(cfg.stage1, cfg.stage1))


def test_configs_saved_before_stage_schedules_still_load(tmp_path):
    old = to_dict(ExperimentConfig())
    stage1, stage2 = old.pop("stages")
    for stage, trains in ((stage1, False), (stage2, True)):
        del stage["train"]
        stage["train_backbone"] = trains
    old["stage1"], old["stage2"] = stage1, stage2
    (tmp_path / "old.json").write_text(json.dumps(old))
    cfg = load_config(tmp_path / "old.json")
    assert [s.train for s in cfg.stages] == [("head", "centres"), ("all",)]
