"""`--help` of every command, nested ones included, shows every default."""
from __future__ import annotations

import argparse

import pytest

from guie_cli.main import _shows_default, build_parser, main


def all_parsers(parser: argparse.ArgumentParser, name: str = "submit.py"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from all_parsers(sub, f"{name} {sub_name}")


PARSERS = dict(all_parsers(build_parser()))


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
    # argparse wraps to the terminal and breaks at hyphens ("build/data- stats"): no wrapping.
    monkeypatch.setenv("COLUMNS", "1000")


def test_every_command_is_reached():
    assert {"submit.py local", "submit.py train", "submit.py export", "submit.py search",
            "submit.py push", "submit.py data fetch", "submit.py data stats"} <= set(PARSERS)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_shows_every_default(name):
    parser = PARSERS[name]
    text = " ".join(parser.format_help().split())  # unwrapped
    for action in parser._actions:
        if not _shows_default(action) or "(default" in (action.help or ""):
            continue  # a flag, no default, or a help that states its default in words
        shown = "''" if action.default == "" else str(action.default)
        flag = action.option_strings[-1] if action.option_strings else action.dest
        assert f"default: {shown}" in text, f"{name} {flag}: default {shown!r} not in --help"


def test_some_defaults_as_users_see_them(capsys):
    assert main(["local", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: tiny)" in out and "(default: build/local)" in out
    assert "sets export.compat (torch1.11: an export a PyTorch 1.11 host loads; default: the " \
           "config's export.compat)" in out
    assert "default: False" not in out  # flags (off unless given) show none
    assert main(["search", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "neighbours per query (default: 5)" in out and "--device {cpu,cuda} default: cpu" in out
