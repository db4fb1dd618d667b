"""The flags that stand for config fields: each sets its field, given or not, one knob each."""
from __future__ import annotations

import pytest

from guie_cli.local import config_from_args
from guie_cli.main import build_parser


def resolved(*argv: str):
    return config_from_args(build_parser().parse_args(list(argv)))


@pytest.mark.parametrize("command", [["local"], ["export", "--checkpoint", "x"],
                                     ["push"], ["run"]])
def test_compat_none_overrides_a_config_that_says_torch1_11(command):
    assert resolved(*command, "export.compat=torch1.11").export.compat == "torch1.11"
    assert resolved(*command, "export.compat=torch1.11", "--compat", "none").export.compat == \
        "none"
    assert resolved(*command, "--compat", "torch1.11").export.compat == "torch1.11"
    assert resolved(*command).export.compat == "none"  # not given: the config's own


def test_max_hours_and_data_root_flags_set_their_fields():
    assert resolved("train", "max_hours=3").max_hours == 3.0
    assert resolved("train", "max_hours=3", "--max-hours", "0").max_hours == 0.0
    assert resolved("push", "--data-root", "/kaggle/input").data.root == "/kaggle/input"
    assert resolved("push").data.root == resolved("local", "--config", "smoke").data.root
