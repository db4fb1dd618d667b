"""Run the selected benchmarks at a given scale and collect one JSON-ready document."""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.common import BenchResult, torch_threads
from guie.plan.estimates import kaggle_estimates
from bench.machine import describe_machine
from bench.report import goals_summary

CPU_BENCHMARKS = ("decode", "stage1", "knn", "export")
ALL_BENCHMARKS = CPU_BENCHMARKS + ("gpu",)


@dataclass(frozen=True)
class Sizes:
    decode_images: int  # JPEGs 400-800 px
    loader_epochs: int
    stage1_images: int  # the tiny stage-1 epoch's images (classes: a quarter of that)
    reference_rows: int  # cache rows behind the 3rd-place schedule's timed steps
    reference_steps: int
    knn_queries: int
    knn_index: int
    repeats: int  # interleaved pairs per timed figure (knn and export: see below)
    knn_repeats: int
    export_repeats: int
    export_cases: tuple = ()  # () = export_bench.CASES


QUICK = Sizes(decode_images=64, loader_epochs=1, stage1_images=256, reference_rows=8192,
              reference_steps=4, knn_queries=5_000, knn_index=200_000, repeats=3,
              knn_repeats=3, export_repeats=9)
FULL = Sizes(decode_images=256, loader_epochs=3, stage1_images=1024, reference_rows=65536,
             reference_steps=40, knn_queries=5_000, knn_index=200_000, repeats=7,
             knn_repeats=7, export_repeats=41)


def _photo_table(workdir: Path, count: int):
    from bench.photos import photo_jpegs, write_shard

    return write_shard(photo_jpegs(count), workdir / "photos.tfrec", max(1, count // 4))


def _run_one(name: str, sizes: Sizes, workdir: Path, photos, quick: bool) -> BenchResult:
    # Figures 1, 2 and 4 are per core (one torch thread, like a DataLoader worker); the k-NN
    # figure gives both sides every core, as faiss takes them by default.
    if name == "decode":
        from bench import decode_bench

        with torch_threads(1):
            return decode_bench.run(photos.iloc[:sizes.decode_images].reset_index(drop=True),
                                    sizes.repeats, sizes.loader_epochs)
    if name == "stage1":
        from bench import stage1_bench

        with torch_threads(1):
            return stage1_bench.run(photos.iloc[:sizes.stage1_images].reset_index(drop=True),
                                    workdir, sizes.repeats, sizes.reference_rows,
                                    sizes.reference_steps)
    if name == "knn":
        from bench import knn_bench

        return knn_bench.run(sizes.knn_repeats, sizes.knn_queries, sizes.knn_index)
    if name == "export":
        from bench import export_bench

        with torch_threads(1):
            return export_bench.run(workdir, sizes.export_repeats,
                                    sizes.export_cases or export_bench.CASES)
    if name == "gpu":
        from bench import gpu_bench

        return gpu_bench.run(workdir, quick)
    raise ValueError(f"unknown benchmark {name!r} (known: {', '.join(ALL_BENCHMARKS)})")


def run_suite(names: tuple[str, ...], sizes: Sizes, quick: bool, log=print) -> tuple[dict, list]:
    started = time.perf_counter()
    document = {"suite": "bench", "mode": "quick" if quick else "full",
                "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": describe_machine(), "sizes": asdict(sizes), "benchmarks": {}}
    figures = []
    with tempfile.TemporaryDirectory(prefix="guie-bench-") as tmp:
        workdir = Path(tmp)
        photos = None
        if {"decode", "stage1"} & set(names):
            photos = _photo_table(workdir, max(sizes.decode_images, sizes.stage1_images))
        for name in names:
            log(f"[bench] {name} ...")
            start = time.perf_counter()
            result = _run_one(name, sizes, workdir, photos, quick)
            elapsed = time.perf_counter() - start
            figures += result.figures
            document["benchmarks"][name] = {
                "elapsed_s": round(elapsed, 2),
                "figures": [f.to_dict() for f in result.figures], "details": result.details}
    document["figures"] = [f.to_dict() for f in figures]
    document["goals"] = goals_summary(figures)
    document["kaggle_estimates"] = kaggle_estimates()
    document["elapsed_s"] = round(time.perf_counter() - started, 2)
    document["torch_threads_after"] = torch.get_num_threads()
    return document, figures
