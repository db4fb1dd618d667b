"""The results table (printed, and in markdown for bench/README.md) and the JSON document."""
from __future__ import annotations

import json
from pathlib import Path

from bench.common import Figure

COLUMNS = ("figure", "ours", "baseline", "unit", "ratio", "goal", "pass")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def rows(figures: list[Figure]) -> list[list[str]]:
    return [[f.name, _cell(f.ours), _cell(f.baseline), f.unit, _cell(f.ratio), f.goal or "-",
             _cell(f.passed)] for f in figures]


def text_table(figures: list[Figure]) -> str:
    table = [list(COLUMNS)] + rows(figures)
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {f.name}: {f.note}" for f in figures if f.note]
    return "\n".join(lines + ["", "notes:"] + notes)


def markdown_table(figures: list[Figure]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(figures)]
    return "\n".join(lines)


def goals_summary(figures: list[Figure]) -> dict:
    judged = [f for f in figures if f.passed is not None]
    failed = [f.name for f in judged if not f.passed]
    return {"evaluated": len(judged), "passed": len(judged) - len(failed), "failed": failed,
            "all_passed": not failed}


def write_json(path: Path, document: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=2, default=str) + "\n")
    tmp.replace(path)
