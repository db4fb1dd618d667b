"""The README's command lines, as they stand, are commands the kit's parser takes.

Every `python submit.py ...` in the README (code blocks and inline code) is parsed by the real
parser: a renamed option, a removed command or a stale choice fails here instead of in a
newcomer's first hour. Optional parts written `[--opt X]` are parsed with and without them.
Running them is the other tests' job (local, search, push against the local server).
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from guie_cli.main import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"
# A line of a code block, or an inline code span, that runs the command line.
COMMAND = re.compile(r"python submit\.py [^`\n]*")


def readme_commands() -> list[str]:
    found = []
    text = re.sub(r"\\\n\s*", " ", README.read_text())  # a command continued with a backslash
    for match in COMMAND.finditer(text):
        line = match.group(0).split("  #")[0].strip()  # an aligned comment after the command
        if "..." not in line:  # `local --config NAME KEY=VALUE ...` shows a form, not a command
            found.append(line)
    return sorted(set(found))


def variants(line: str) -> list[list[str]]:
    """The command without its `[optional parts]`, and with each of them (the first choice of
    an `a|b|c` alternative)."""
    optional = re.findall(r"\[([^\]]+)\]", line)
    bare = re.sub(r"\s*\[[^\]]+\]", "", line)
    argv = shlex.split(bare)[2:]
    out = [argv]
    for part in optional:
        out.append(argv + shlex.split(part.split("|")[0]))
    return out


def test_the_readme_shows_commands():
    assert len(readme_commands()) >= 20


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_parses(line):
    parser = build_parser()
    for argv in variants(line):
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"README: `{line}` does not parse as {argv} (exit {e.code})")
        assert callable(args.func)


REPO = README.parent
# The packages whose every module the Layout section names (configs/ holds one module per
# experiment and bench/ is described as a whole, so their modules are not listed one by one).
LISTED_PACKAGES = ("src/guie", "src/guie/data", "src/guie/train", "src/guie/export",
                   "src/guie/plan", "src/guie/kaggle", "src/guie/retrieval", "src/guie_cli")


def layout_block() -> str:
    section = README.read_text().split("## Layout\n", 1)[1]
    return section.split("```", 2)[1]


def test_the_layout_section_names_every_module_and_folder():
    words = set(re.findall(r"[\w.-]+", layout_block()))
    missing = []
    for package in LISTED_PACKAGES:
        for path in sorted((REPO / package).iterdir()):
            name = path.stem if path.suffix == ".py" else path.name
            if name.startswith(("_", ".")) or name.endswith(".egg-info") or (
                    path.is_file() and path.suffix not in (".py", ".json")):
                continue
            if name not in words and path.name not in words:
                missing.append(f"{package}/{path.name}")
    for top in ("bench", "kernels", "datasets-metadata", "docs", "scripts", "tests"):
        if not re.search(rf"^{re.escape(top)}/", layout_block(), re.MULTILINE):
            missing.append(f"{top}/")
    assert not missing, f"README's Layout section does not name: {missing}"
