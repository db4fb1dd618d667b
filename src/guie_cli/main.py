"""`python submit.py COMMAND ...`: one parser, one sub-command module per command group.

Each module in COMMAND_MODULES exposes `register(subparsers)`, which adds its sub-commands and
sets `func` on them; `func(args) -> int` is the exit status.

Errors. A mistake the user can fix (a config name or override, a path, a file of the wrong kind,
data that is missing, a Kaggle answer) ends in one line `error: ...` on stderr and exit status 2.
The message comes from where the mistake is found, as a `guie.errors.UserError` (`ConfigError`,
`DataError`, `KaggleError`, ... and the command line's own checks), or as an OS error about a
path the user gave. Anything else is a bug of the kit and keeps its traceback. `--debug` (before
or after the command) or GUIE_DEBUG=1 prints the traceback of a user error too. Exit statuses:
0 done, 1 a run that failed (a kernel in ERROR, a dataset that did not download), 2 a user
error, 3 a run stopped before it finished, 130 interrupted.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import importlib
import os
import re
import sys
import traceback
from pathlib import Path

from guie.errors import UserError

COMMAND_MODULES = ("local", "kaggle_cmds", "kaggle_run", "data_cmds", "search", "plan_cmd",
                   "eval_cmd")
USER_ERROR_STATUS = 2
# A path the user gave that is missing or of the wrong kind.
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
# A file of the kit itself that is missing (a notebook template) is a broken install, not a
# path the user gave.
_KIT_FILES = tuple(str(Path(__file__).resolve().parents[i] / name) + os.sep
                   for i, name in ((1, "guie"), (1, "guie_cli"), (2, "kernels")))


class HelpFormatter(argparse.HelpFormatter):
    """Every option with a default shows it (`(default: build/local)`), unless its help already
    states it in words; flags (default off) and options without a default show none."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _shows_default(action):
            action = copy.copy(action)
            action.help = "default: ''" if action.default == "" else "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or re.search(r"\(default\b", text) or not _shows_default(action):
            return text
        shown = "''" if action.default == "" else "%(default)s"
        return f"{text} (default: {shown})"


def _shows_default(action: argparse.Action) -> bool:
    return (action.default not in (None, argparse.SUPPRESS, [], ())
            and action.nargs != 0  # store_true / store_false / help
            and bool(action.option_strings or action.nargs in (argparse.OPTIONAL,
                                                               argparse.ZERO_OR_MORE)))


class CliParser(argparse.ArgumentParser):
    """The parser of submit.py and of every sub-command: defaults in --help, `--debug` accepted
    after any command, and usage mistakes ending in one `error:` line with the nearest choice."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        # SUPPRESS: a sub-command parser leaves `debug` alone unless given there.
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the traceback of an error (also: GUIE_DEBUG=1)")

    def error(self, message: str):
        self.print_usage(sys.stderr)
        choice = re.search(r"invalid choice: '(.*?)' \(choose from (.*)\)", message)
        if choice:
            close = difflib.get_close_matches(choice[1], re.findall(r"'([^']*)'", choice[2]), n=1)
            message += f"; did you mean `{close[0]}`?" if close else ""
        if "unrecognized arguments" in message and re.search(r"--\w+\.\S*=", message):
            message += "; config overrides take no leading `--` (write `stage2.epochs=3`)"
        self.exit(USER_ERROR_STATUS, f"error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="submit.py",
                       description="Google Universal Image Embedding submission kit")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                       parser_class=CliParser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"guie_cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_parsed(build_parser(), sys.argv[1:] if argv is None else argv)


def run_parsed(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """Parse `argv` and run the chosen command's `func`, user errors printed as one line.
    For any entry point with its own parser (`python -m guie_cli.kaggle_cmds`)."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error already printed by CliParser.error
        return 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1
    debug = getattr(args, "debug", False) or os.environ.get("GUIE_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - re-raised below unless it is a user error
        message = user_error_message(exc)
        if message is None:
            raise  # a bug of the kit: its traceback is what a report needs
        if debug:
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
        return USER_ERROR_STATUS


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message of an error the user can fix, or None for a bug of the kit."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, _PATH_ERRORS):
        if isinstance(exc.filename, (str, os.PathLike)) and os.path.realpath(
                exc.filename).startswith(_KIT_FILES):
            return None
        if exc.filename is not None and exc.strerror:  # from the OS: "[Errno 2] ..." reworded
            return f"{exc.filename}: {exc.strerror[0].lower()}{exc.strerror[1:]}"
        return str(exc) or None
    return None
