import json
from dataclasses import replace

import pytest

from guie.config import ExperimentConfig, load_config, save_config
from guie.config_io import ConfigError, apply_overrides, from_dict, override_keys, to_dict
from guie.configs import get_config, list_configs, resolve_config


def test_overrides_are_typed_and_nested():
    cfg = apply_overrides(ExperimentConfig(), ["stage2.lr_backbone=2e-6", "--model.dropout=0.1",
                                               "stage1.augment=[\"hflip\"]",
                                               "export.compat=torch1.11"])
    assert cfg.stage("stage2").lr_backbone == 2e-6 and cfg.model.dropout == 0.1
    assert cfg.stage("stage1").augment == ("hflip",) and cfg.export.compat == "torch1.11"


@pytest.mark.parametrize("bad, message", [
    # A typo names the nearest key.
    ("stage1.lr_hed=1", "override `stage1.lr_hed=1`: stage `stage1` has no field `lr_hed`; "
                        "did you mean `stage1.lr_head`?"),
    ("modle.dropout=0.1", "the config has no section or stage `modle`; did you mean "
                          "`model.dropout`?"),
    # The right field in the wrong place names where it lives.
    ("epochs=2", "the config has no field `epochs`; did you mean `stage1.epochs` or "
                 "`stage2.epochs`?"),
    ("model.epochs=2", "section `model` has no field `epochs`; did you mean `stage1.epochs` or "
                       "`stage2.epochs`?"),
    # Nothing near: the fields (and stages) that exist.
    ("model.colour=1", "section `model` has no field `colour` (its fields: aspect_features, "),
    ("colour=1", "; stages: stage1, stage2)"),
    # Stages are addressed by name: the names there are.
    ("stage3.epochs=2", "override `stage3.epochs=2`: config `default` has no stage `stage3`; its "
                        "stages are `stage1`, `stage2` (e.g. `stage1.epochs=2`)"),
    ("stgae2.epochs=2", "its stages are `stage1`, `stage2`; did you mean `stage2.epochs=2`?"),
    # A value of the wrong type says what the field takes and what it holds now.
    ("stage1.batch_size=abc", "override `stage1.batch_size=abc`: `stage1.batch_size` takes an "
                              "integer, got 'abc' (currently `stage1.batch_size=64`)"),
    ("stage2.epochs=three", "`stage2.epochs` takes a number, got 'three' (currently "
                            "`stage2.epochs=1.0`)"),
    ("stage1.lr_centres=x", "`stage1.lr_centres` takes a number or null, got 'x'"),
    ("stage1.enabled=maybe", "takes true or false, got 'maybe' (currently `stage1.enabled=true`)"),
    ("export.compat=torch2", "`export.compat` takes one of none, torch1.11, got 'torch2'; did you "
                             "mean `torch1.11`? (currently `export.compat=none`)"),
    ("stage1.augment=hflip", "`stage1.augment` takes a JSON list, each item a string, got 'hflip' "
                             "(currently `stage1.augment='[\"random_resized_crop\", \"hflip\"]'`)"),
    ("preprocess.mean=[1,2]", "takes a JSON list of 3 items, each a number, got [1, 2] (2 items)"),
    ("model=3", "`model` is a section, not a value: set its fields one by one, e.g. "
                "`model.backbone=...`"),
    ("model.dropout.p=1", "`model.dropout` is a value, not a section: write `model.dropout=VALUE`"),
    # Not KEY=VALUE at all.
    ("stage1.lr_head", "override `stage1.lr_head` has no value: write `stage1.lr_head=VALUE`, "
                       "with no spaces around `=`"),
    ("stage2epochs", "override `stage2epochs` is not KEY=VALUE; did you mean "
                     "`stage2.epochs=VALUE`?"),
    ("=3", "override `=3` is not KEY=VALUE (e.g. `stage1.epochs=3`)"),
])
def test_bad_overrides_say_what_is_wrong_and_what_is_right(bad, message):
    with pytest.raises(ConfigError) as caught:
        apply_overrides(ExperimentConfig(), [bad])
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)  # printed as one `error:` line
    assert isinstance(caught.value, ValueError)  # callers catching ValueError still do


def test_a_config_name_among_the_overrides_suggests_config():
    with pytest.raises(ConfigError) as caught:
        resolve_config("tiny", ["stage1.epochs=2", "smoke"])
    assert str(caught.value) == ("override `smoke` is not KEY=VALUE; did you mean "
                                 "`--config smoke`?")


@pytest.mark.parametrize("name", list_configs())
def test_shipped_configs_round_trip(name, tmp_path):
    cfg = get_config(name)
    save_config(cfg, tmp_path / "c.json")
    assert load_config(tmp_path / "c.json") == cfg


@pytest.mark.parametrize("name, message", [
    ("tinyy", "unknown config `tinyy`; did you mean `tiny`? (shipped: "),
    ("third", "unknown config `third`; did you mean `third_place`?"),
    ("nope", "unknown config `nope` (shipped: "),
])
def test_unknown_config_name(name, message):
    with pytest.raises(ConfigError) as caught:
        get_config(name)
    assert str(caught.value).startswith(message)
    assert all(shipped in str(caught.value) for shipped in list_configs())


def test_override_keys_name_stages_by_name():
    keys = override_keys(get_config("smoke"))
    assert {"seed", "model.dropout", "stage1.epochs", "stage2.lr_backbone",
            "data.root"} <= set(keys)
    assert "stages" in keys and not any(k.startswith("stages.") for k in keys)


def test_a_saved_config_with_a_typo_names_the_key():
    with pytest.raises(ConfigError, match=r"unknown keys \['sead'\]; did you mean `seed`\?"):
        from_dict(ExperimentConfig, {"sead": 1})
    with pytest.raises(ConfigError, match=r"`ExperimentConfig.seed` takes an integer, got 'x'"):
        from_dict(ExperimentConfig, {"seed": "x"})


def test_stages_are_addressed_by_name():
    cfg = apply_overrides(get_config("smoke"), ["stage2.train=[\"head\", \"blocks:0-1\"]",
                                                "stage1.image_size_px=80"])
    assert cfg.stage("stage2").train == ("head", "blocks:0-1")
    assert cfg.stage("stage1").image_size_px == 80
    with pytest.raises(ConfigError, match=r"^no stage named 'stage9' \(stages: stage1, stage2\)$"):
        cfg.stage("stage9")
    with pytest.raises(ValueError, match="must be unique"):
        replace(cfg, stages=(cfg.stage("stage1"), cfg.stage("stage1")))


def test_resolve_config_applies_the_overrides_to_the_shipped_config():
    cfg = resolve_config("smoke", ["stage1.epochs=2", "stage1.epochs=3"])
    assert cfg.stage("stage1").epochs == 3 and cfg.name == "smoke"
    assert resolve_config("smoke") == get_config("smoke")
    with pytest.raises(ConfigError, match=r"^unknown config `smok`; did you mean `smoke`\?"):
        resolve_config("smok", ["stage1.epochs=2"])


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


def test_max_hours_is_a_config_field_and_older_configs_load_without_it(tmp_path):
    """The session's training budget is part of the resolved config (what `--max-hours` sets),
    so config.json records it; a config saved before it existed loads with no limit."""
    cfg = resolve_config("smoke", ["max_hours=2.5"])
    assert cfg.max_hours == 2.5 and "max_hours" in override_keys(cfg)
    save_config(cfg, tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == cfg
    older = to_dict(get_config("smoke"))
    del older["max_hours"]
    (tmp_path / "older.json").write_text(json.dumps(older))
    assert load_config(tmp_path / "older.json").max_hours == 0.0
