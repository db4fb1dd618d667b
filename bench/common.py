"""What every benchmark shares: a result row, paired interleaved timing, the goal check.

Timing on a shared machine is noisy (other processes come and go), so ours and the baseline run
alternately (ABBA order: A first on even repeats, B first on odd ones) and each repeat yields a
paired ratio; a figure's ratio is the median of those pairs, its times the medians of each side.
"""
from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Figure:
    """One row of the table. The goal applies to `ratio`, or to `ours` where ratio is None."""

    name: str
    ours: float | None
    baseline: float | None = None
    ratio: float | None = None
    unit: str = ""  # of ours and baseline
    goal: str = ""  # ">= 2.5", "<= 1.05", or "" (reported only)
    note: str = ""

    @property
    def passed(self) -> bool | None:
        value = self.ratio if self.ratio is not None else self.ours
        if not self.goal or value is None:
            return None
        op, threshold = self.goal.split()
        return value >= float(threshold) if op == ">=" else value <= float(threshold)

    def to_dict(self) -> dict:
        return {"name": self.name, "ours": self.ours, "baseline": self.baseline,
                "ratio": self.ratio, "unit": self.unit, "goal": self.goal,
                "passed": self.passed, "note": self.note}


@dataclass
class BenchResult:
    figures: list[Figure]
    details: dict = field(default_factory=dict)


@dataclass
class Paired:
    ours_s: list[float]
    baseline_s: list[float]

    @property
    def ours_median_s(self) -> float:
        return statistics.median(self.ours_s)

    @property
    def baseline_median_s(self) -> float:
        return statistics.median(self.baseline_s)

    @property
    def time_ratio(self) -> float:
        """Median over repeats of ours / baseline time (< 1: ours is faster)."""
        return statistics.median(o / b for o, b in zip(self.ours_s, self.baseline_s, strict=True))

    @property
    def speedup(self) -> float:
        """Median over repeats of baseline / ours time (> 1: ours is faster)."""
        return statistics.median(b / o for o, b in zip(self.ours_s, self.baseline_s, strict=True))

    def to_dict(self) -> dict:
        return {"ours_s": self.ours_s, "baseline_s": self.baseline_s}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(ours: Callable[[], object], baseline: Callable[[], object], repeats: int,
                warmup: int = 1) -> Paired:
    """Time `ours` and `baseline` alternately, `repeats` pairs after `warmup` untimed pairs."""
    for _ in range(warmup):
        ours()
        baseline()
    ours_s, baseline_s = [], []
    for r in range(repeats):
        if r % 2 == 0:
            ours_s.append(timed(ours))
            baseline_s.append(timed(baseline))
        else:
            baseline_s.append(timed(baseline))
            ours_s.append(timed(ours))
    return Paired(ours_s, baseline_s)


def rounded(value: float | None, digits: int = 4) -> float | None:
    """Round to `digits` significant digits for the JSON and the table."""
    if value is None:
        return None
    return float(f"{value:.{digits}g}")


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def peak_rss_growth_bytes(fn: Callable[[], object], interval_s: float = 0.002) -> int | None:
    """How far the process's resident memory rose above its level at the start while `fn` ran
    (sampled; Linux only, else None)."""
    start = _rss_bytes()
    if start is None:
        return None
    peak = [start]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes() or 0)
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss_bytes() or 0) - start


class torch_threads:
    """Run a block with `n` torch intra-op threads, restoring the old count after.

    The per-core figures (decode, stage 1, export) use one thread, like a DataLoader worker: on a
    shared machine two OpenMP threads wait on each other at every op whenever another process
    takes a core, which made a tiny model's forward 4x slower here and the ratios noise.
    """

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        import torch

        self.previous = torch.get_num_threads()
        torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.previous)
        return False
