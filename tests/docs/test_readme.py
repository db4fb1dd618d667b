"""The README and the pages under docs/, as they stand: their command lines are commands the
kit's parsers take, their links resolve, and the README is the way in to every page.

Every `python submit.py ...` and `python -m ...` in README.md and docs/*.md (code blocks and
inline code) is parsed by the real parser: a renamed option, a removed command or a stale choice
fails here instead of in a newcomer's first hour. Optional parts written `[--opt X]` are parsed
with and without them. Running them is the other tests' job (local, search, push against the
local server).
"""
from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from guie_cli.main import build_parser

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"
# A line of a code block, or an inline code span, that runs the kit's command line or a module.
COMMAND = re.compile(r"(?<![\w.-])python (?:submit\.py|-m [\w.]+)[^`\n]*")
# The words that tell a story of change instead of saying what is.
HISTORY = re.compile(r"\b(as before|no longer|previously|used to be|anymore)\b", re.IGNORECASE)


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def commands() -> list[tuple[str, str]]:
    """(page, command line) for every command shown, each line once per page."""
    found = set()
    for page in pages():
        text = re.sub(r"\\\n\s*", " ", page.read_text())  # a command continued with a backslash
        for match in COMMAND.finditer(text):
            line = match.group(0).split("  #")[0].strip()  # an aligned comment after the command
            if "..." not in line:  # `local --config NAME KEY=VALUE ...` shows a form, not a command
                found.add((page.relative_to(REPO).as_posix(), line))
    return sorted(found)


def variants(line: str) -> list[list[str]]:
    """The arguments after the program without the `[optional parts]`, and with each of them
    (the first choice of an `a|b|c` alternative)."""
    optional = re.findall(r"\[([^\]]+)\]", line)
    bare = re.sub(r"\s*\[[^\]]+\]", "", line)
    words = shlex.split(bare)
    argv = words[2:] if words[1] == "submit.py" else words[3:]
    out = [argv]
    for part in optional:
        out.append(argv + shlex.split(part.split("|")[0]))
    return out


def parse_module_args(module: str, argv: list[str]) -> None:
    """Parse `python -m MODULE ARGV` with that module's own parser; fails the test if it does
    not parse. A module without a parser known here must at least exist."""
    if module == "bench":
        from bench.__main__ import parse_args

        parse_args(argv)
    elif module == "pytest":
        from _pytest.config import get_config  # pytest's own option parser, plugins included

        try:
            get_config()._parser.parse(argv)
        except pytest.UsageError as e:
            raise SystemExit(f"pytest: {e}") from e
    else:
        assert importlib.util.find_spec(module) is not None, f"no module {module}"


def test_the_docs_show_commands():
    assert len(commands()) >= 40
    assert sum(page == "README.md" for page, _ in commands()) >= 15


@pytest.mark.parametrize("page,line", commands())
def test_command_parses(page, line):
    for argv in variants(line):
        try:
            if line.startswith("python submit.py"):
                assert callable(build_parser().parse_args(argv).func)
            else:
                parse_module_args(line.split()[2], argv)
        except SystemExit as e:
            pytest.fail(f"{page}: `{line}` does not parse as {argv} ({e.code})")


# --- links -----------------------------------------------------------------------------------

LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces
    as hyphens."""
    out = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_every_docs_page_is_linked_from_the_readme():
    linked = {target.split("#")[0] for target in LINK.findall(README.read_text())}
    unlinked = [p.relative_to(REPO).as_posix() for p in sorted(DOCS.glob("*.md"))
                if p.relative_to(REPO).as_posix() not in linked]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_every_link_between_the_pages_resolves():
    broken = []
    for page in pages():
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.name}: {target} (no heading #{anchor})")
    assert not broken, broken


def test_the_pages_say_what_is_not_how_it_changed():
    found = [f"{page.name}: {m.group(0)!r}" for page in pages()
             for m in HISTORY.finditer(page.read_text())]
    assert not found, f"history wording (say what is, in the present): {found}"


# --- the test command --------------------------------------------------------------------------

def test_ci_runs_the_readmes_test_command():
    """CI (.ci/run) runs the test command the README shows, slowest 20 tests printed."""
    shown = re.search(r"^python -m pytest([^#\n]*)", README.read_text(), re.MULTILINE)
    ci = re.search(r"^\.venv/bin/python -m pytest([^#\n]*)",
                   (REPO / ".ci" / "run").read_text(), re.MULTILINE)
    assert shown and ci
    assert shlex.split(shown.group(1)) == shlex.split(ci.group(1))
    assert "--durations=20" in shlex.split(ci.group(1))


# --- the layout ----------------------------------------------------------------------------------

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
