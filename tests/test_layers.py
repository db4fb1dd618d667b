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


# Import cycles the kit accepts, each as the sorted tuple of its modules with the reason beside
# it. Empty: every cycle so far was broken by moving code to where it belongs.
ALLOWED_CYCLES: dict[tuple[str, ...], str] = {}


def import_graph(imports: tuple[Import, ...]) -> dict[str, set[str]]:
    """Module -> the kit's modules it imports. `from a import b` reaches the module `a.b` where
    there is one, else `a` (b is a name defined in a)."""
    modules = {i.importer for i in imports} | {
        module_name(p) for package in PACKAGES for p in (SRC / package).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for i in imports:
        base, *names = i.targets
        reached = [n for n in names if n in modules] if names else []
        if len(reached) < len(names) or not names:
            reached.append(base)
        graph[i.importer] |= {t for t in reached if t in modules and t != i.importer}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(tuple(sorted(component)))
    return found


def test_no_import_cycles():
    """A cycle, deferred imports included, means two modules each need the other: one of them
    holds code that belongs elsewhere."""
    graph = import_graph(all_imports())
    found = [c for c in cycles(graph) if c not in ALLOWED_CYCLES]
    if found:
        lines = []
        for cycle in found:
            members = set(cycle)
            lines += [f"{i.path}:{i.line} ({i.importer}): {i.statement}" for i in all_imports()
                      if i.importer in members and graph[i.importer] & members
                      and any(t in members for t in i.targets)]
        pytest.fail(f"import cycles {found}; the imports that close them:\n" + "\n".join(lines),
                    pytrace=False)


def test_the_cycle_check_finds_a_deferred_cycle():
    source_a = "def f():\n    from guie.b import g\n"
    source_b = "from guie import a\n"
    imports = (*imports_in(source_a, "guie.a", False), *imports_in(source_b, "guie.b", False))
    graph = import_graph(imports)
    assert graph["guie.a"] >= {"guie.b"} and graph["guie.b"] >= {"guie.a"}
    assert ("guie.a", "guie.b") in cycles(graph)
