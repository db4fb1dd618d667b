"""The package layers, checked on the source: which modules may import which.

Every module under src/guie and src/guie_cli is parsed (not imported) and every import statement
is read, those inside functions too, since a deferred import is still a dependency. Each rule
names the importing modules and the modules they must not reach; a failure lists every offending
import as `path:line module imports target`.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import NamedTuple

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGES = ("guie", "guie_cli")


class Import(NamedTuple):
    path: str  # relative to src/
    line: int
    importer: str  # the importing module's dotted name
    statement: str  # as written
    targets: tuple[str, ...]  # the modules it may import, absolute


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_in(source: str, module: str, is_package: bool, path: str = "") -> list[Import]:
    """Every import statement in `source` (a module named `module`), its targets made absolute.
    `from a import b` targets both `a` and `a.b`, since `b` may be a submodule."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from ..kaggle import inputs` in guie.data.fetch
                parts = package.split(".")
                anchor = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.append(Import(path, node.lineno, module, ast.unparse(node), tuple(targets)))
    return found


@functools.cache
def all_imports() -> tuple[Import, ...]:
    found = []
    for package in PACKAGES:
        for path in sorted((SRC / package).rglob("*.py")):
            found += imports_in(path.read_text(), module_name(path), path.name == "__init__.py",
                                str(path.relative_to(SRC)))
    return tuple(found)


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


class Rule(NamedTuple):
    why: str
    importers: tuple[str, ...]  # packages or modules the rule applies to
    forbidden: tuple[str, ...]


RULES = [
    Rule("the data layer runs anywhere, not only against Kaggle", ("guie.data",), ("guie.kaggle",)),
    Rule("model and training code come before the export and the pipeline that drive them",
         ("guie.model", "guie.backbones", "guie.train"), ("guie.export", "guie.pipeline")),
    Rule("the library is never shaped by its command line", ("guie",), ("guie_cli",)),
    Rule("the benchmark suite lives outside the library (bench/)", PACKAGES,
         ("bench", "guie.bench")),
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{'+'.join(r.importers)}-x-"
                                                       f"{'+'.join(r.forbidden)}")
def test_layer_rule(rule):
    offending = [f"{i.path}:{i.line} ({i.importer}): {i.statement}" for i in all_imports()
                 if within(i.importer, rule.importers)
                 # a forbidden package's own modules may import each other
                 and not within(i.importer, rule.forbidden)
                 and any(within(t, rule.forbidden) for t in i.targets)]
    if offending:
        pytest.fail(f"{rule.why}; offending imports:\n" + "\n".join(offending), pytrace=False)


def test_imports_are_found_at_any_depth_and_made_absolute():
    source = ("import os\n"
              "def f():\n"
              "    from ..kaggle import inputs\n"
              "    if True:\n"
              "        import guie.export.script as s\n"
              "from . import sources\n")
    found = {(i.line, i.targets) for i in imports_in(source, "guie.data.fetch", is_package=False)}
    assert found == {(1, ("os",)), (3, ("guie.kaggle", "guie.kaggle.inputs")),
                     (5, ("guie.export.script",)), (6, ("guie.data", "guie.data.sources"))}
    assert imports_in("from . import x\n", "guie.data", is_package=True)[0].targets[0] == \
        "guie.data"
