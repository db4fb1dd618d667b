"""`data stats`: what a config's sources hold, per source and merged, before training on them.

Tables of images, classes, label ranges, disk, the images-per-class histogram and what the
config's per-class filtering (and a sweep of min_per_class) keeps; a PNG grid of sample images
per source. Sources are merged with `merge_sources`, so overlapping label ranges are an error
unless the config's label_offsets separate them.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from guie.config import DataConfig, DataSource
from guie.data.dataset import decode_rgb, read_bytes
from guie.data.fetch import format_bytes, load_manifest
from guie.data.sources import _resolve, filter_classes, merge_sources
from guie.data.errors import DataError

# Images per class, bins [edge, next edge); the last bin is open.
HISTOGRAM_EDGES = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500)
MIN_PER_CLASS_SWEEP = (1, 2, 3, 5, 10, 20)


def _bin_name(lo: int, hi: int | None) -> str:
    if hi is None:
        return f"{lo}+"
    return str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}"


def class_histogram(counts: np.ndarray) -> list[dict]:
    """Classes and images per bin of images-per-class."""
    rows = []
    for lo, hi in zip(HISTOGRAM_EDGES, HISTOGRAM_EDGES[1:] + (None,), strict=True):
        sel = (counts >= lo) & (counts < hi) if hi is not None else counts >= lo
        rows.append({"bin": _bin_name(lo, hi), "classes": int(sel.sum()),
                     "images": int(counts[sel].sum())})
    return rows


def filtering(df: pd.DataFrame, cfg: DataConfig) -> dict:
    """What the config's min/max/resample per class keeps, and a min_per_class sweep (with the
    config's cap)."""
    counts = df["label"].value_counts().to_numpy()
    kept = filter_classes(df, cfg.min_per_class, cfg.max_per_class, cfg.resample_min_per_class,
                          cfg.split_seed)
    capped = np.minimum(counts, cfg.max_per_class) if cfg.max_per_class > 0 else counts
    return {
        "config": {"min_per_class": cfg.min_per_class, "max_per_class": cfg.max_per_class,
                   "resample_min_per_class": cfg.resample_min_per_class,
                   "images": int(len(kept)), "classes": int(kept["label"].nunique())},
        "sweep": [{"min_per_class": m, "classes": int((counts >= m).sum()),
                   "images": int(capped[counts >= m].sum())} for m in MIN_PER_CLASS_SWEEP],
    }


def _disk_bytes(df: pd.DataFrame) -> int:
    return int(sum(os.path.getsize(p) for p in df["path"].unique()))


def _group(df: pd.DataFrame, cfg: DataConfig) -> dict:
    counts = df["label"].value_counts().to_numpy()
    return {
        "images": int(len(df)), "classes": int(len(counts)),
        "label_min": int(df["label"].min()), "label_max": int(df["label"].max()),
        "per_class_min": int(counts.min()), "per_class_median": float(np.median(counts)),
        "per_class_max": int(counts.max()), "disk_bytes": _disk_bytes(df),
        "histogram": class_histogram(counts), "filtering": filtering(df, cfg),
    }


def _manifest_summary(src: DataSource, root: Path) -> dict | None:
    parts = PurePosixPath(src.location).parts
    if Path(src.location).is_absolute() or not parts:
        return None
    manifest = load_manifest(root / parts[0])
    if manifest is None:
        return None
    return {"ref": manifest["kaggle"]["ref"], "version": manifest["kaggle"]["version"],
            "verified_at": manifest["verified_at"], "corrupt_records": manifest["corrupt_records"]}


def missing_sources(sources, root: str | Path) -> list[tuple[DataSource, Path]]:
    """The sources whose shard folder or CSV is not there, with the path looked for (resolved
    against `root` as loading resolves it)."""
    missing = []
    for src in sources:
        where = _resolve(src.location, root)
        if not (where.is_dir() if src.kind == "tfrecord" else where.is_file()):
            missing.append((src, where))
    return missing


def require_sources(sources, root: str | Path, fetch_hint: str) -> None:
    """A DataError naming what is missing and `fetch_hint` (how to get it) unless every source
    is there: with no data at all, one line says so instead of one source's missing folder."""
    sources = tuple(sources)
    missing = missing_sources(sources, root)
    if not missing:
        return
    names = ", ".join(src.name for src, _ in missing)
    folder = str(root).rstrip("/") + "/"
    what = (f"no data in {folder}: none of the {len(sources)} sources is there" if
            len(missing) == len(sources) else
            f"{len(missing)} of {len(sources)} sources missing in {folder} ({names})")
    raise DataError(f"{what} (looked for {missing[0][1]}{', ...' if len(missing) > 1 else ''}); "
                    f"download them with {fetch_hint}")


def compute_stats(sources, root: str | Path, cfg: DataConfig) -> tuple[dict, pd.DataFrame]:
    """(report, merged table). Raises DataError when label ranges overlap."""
    sources = tuple(sources)
    root = Path(root)
    df = merge_sources(sources, root, cfg.verify_crc)
    report = {"root": str(root), "sources": {}, "merged": _group(df, cfg)}
    for src in sources:
        entry = _group(df[df["source"] == src.name], cfg)
        entry.update(kind=src.kind, location=src.location, label_offset=src.label_offset,
                     kaggle=src.kaggle_slug, manifest=_manifest_summary(src, root))
        report["sources"][src.name] = entry
    return report, df


def sample_grid(df: pd.DataFrame, title: str, path: str | Path, n_images: int = 16,
                seed: int = 0) -> Path:
    """A PNG of up to n_images images of distinct classes (seeded), captioned with labels."""
    rng = np.random.default_rng(seed)
    labels = df["label"].unique()
    picked = rng.permutation(labels)[:n_images]
    rows = [df[df["label"] == label].iloc[int(rng.integers((df["label"] == label).sum()))]
            for label in picked]
    cols = min(len(rows), 8) or 1
    lines = max(1, -(-len(rows) // cols))
    fig = Figure(figsize=(1.6 * cols, 1.8 * lines + 0.4))
    axes = np.atleast_1d(fig.subplots(lines, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, row in zip(axes, rows, strict=False):  # the grid may have spare axes
        where = f"{row['path']}@{row['offset']}" if row["offset"] >= 0 else str(row["path"])
        try:
            ax.imshow(decode_rgb(read_bytes(row["path"], row["offset"], row["length"]), where))
            ax.set_title(f"label {row['label']}", fontsize=7)
        except (DataError, OSError):
            ax.set_title(f"label {row['label']}: unreadable", fontsize=7, color="red")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths, strict=True))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_stats(report: dict) -> str:
    groups = {**report["sources"], "merged": report["merged"]}
    summary = []
    for name, g in groups.items():
        manifest = g.get("manifest")
        verified = (f"v{manifest['version']} {manifest['verified_at'][:10]}" if manifest
                    else "-" if name == "merged" else "no manifest")
        summary.append([name, g["images"], g["classes"], f"{g['label_min']}..{g['label_max']}",
                        g.get("label_offset", "-"),
                        f"{g['per_class_min']}/{g['per_class_median']:g}/{g['per_class_max']}",
                        format_bytes(g["disk_bytes"]), verified])
    out = ["Sources (root " + report["root"] + ")",
           _table(["source", "images", "classes", "labels", "offset", "per class min/med/max",
                   "disk", "verified"], summary), "",
           "Classes (images) by images per class",
           _table(["images/class"] + list(groups), [
               [row["bin"]] + [f"{g['histogram'][i]['classes']} ({g['histogram'][i]['images']})"
                               for g in groups.values()]
               for i, row in enumerate(report["merged"]["histogram"])]), ""]
    cfg = report["merged"]["filtering"]["config"]
    out += [f"Kept by per-class filtering (max_per_class {cfg['max_per_class'] or 'none'}): "
            "classes / images",
            _table(["min_per_class"] + list(groups), [
                [row["min_per_class"]] + [f"{g['filtering']['sweep'][i]['classes']} / "
                                          f"{g['filtering']['sweep'][i]['images']}"
                                          for g in groups.values()]
                for i, row in enumerate(report["merged"]["filtering"]["sweep"])]),
            f"config (min {cfg['min_per_class']}, max {cfg['max_per_class']}, resample to "
            f"{cfg['resample_min_per_class']}): " + ", ".join(
                f"{name} {g['filtering']['config']['classes']} / "
                f"{g['filtering']['config']['images']}"
                for name, g in groups.items())]
    return "\n".join(out)


def write_stats(sources, root: str | Path, cfg: DataConfig, out_dir: str | Path,
                grid_images: int = 16) -> dict:
    """stats.json, stats.txt and samples-<source>.png under out_dir; returns the report."""
    report, df = compute_stats(sources, root, cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report["grids"] = {}
    if grid_images > 0:
        for name in report["sources"]:
            file_name = "samples-" + re.sub(r"[^\w.-]", "_", name) + ".png"
            png = sample_grid(df[df["source"] == name], f"{name}: {grid_images} random classes",
                              out / file_name, grid_images, cfg.split_seed)
            report["grids"][name] = str(png)
    (out / "stats.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "stats.txt").write_text(format_stats(report) + "\n")
    return report
