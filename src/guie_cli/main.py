"""`python submit.py COMMAND ...`: one parser, one sub-command module per command group.

Each module in COMMAND_MODULES exposes `register(subparsers)`, which adds its sub-commands and
sets `func` on them; `func(args) -> int` is the exit status.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ("local", "kaggle_cmds", "data_cmds", "search")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="submit.py", description="Google Universal Image Embedding submission kit")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"guie_cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return int(args.func(args) or 0)
