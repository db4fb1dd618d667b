"""The gate `push` and `run` pass before anything is sent: does the plan fit the chosen machine's
GPU memory (`guie.plan.gate.memory_refusals`), and can the GPU quota Kaggle reports finish the
next session? One gate, one override (`--skip-preflight`). It answers in seconds: shipped or
cached measurements and one quota read, never a measurement.

A session is counted from its push to its end, the way Kaggle charges it (queue and set-up
included, field guide 5a): the session's own budget (`--max-hours`) plus what a session spent
before its notebook's clock started, measured on the chain's earlier sessions or, before any,
`SETUP_ALLOWANCE_H` (an estimate). That is an upper bound: a session that finishes its stages
early costs less.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from guie.kaggle.kernel_calls import Quota
from guie.kaggle.platform import PlatformError

SETUP_ALLOWANCE_H = 0.25  # queue + image start + set-up before the notebook runs (estimate)
INFER_SESSION_H = 1.0  # an inference kernel: export and contract checks (estimate)
ESTIMATED_WEEKLY_H = 30.0  # Kaggle's floating weekly GPU quota, where Kaggle reports none
SKIP_FLAG = "--skip-preflight"


class PreflightRefused(PlatformError):
    """The plan does not fit the machine, or the quota cannot finish the session."""


def session_bound_h(max_hours: float, measured_setup_h: Sequence[float] = ()) -> float:
    """The most one training session can cost, from push to its end."""
    return max_hours + max([SETUP_ALLOWANCE_H, *measured_setup_h])


def quota_refusal(quota: Quota | None, bound_h: float, what: str = "the next session") -> str:
    """Why the remaining quota cannot finish a session of `bound_h` hours; "" where it can or
    where Kaggle reported no quota (then the estimate stands and nothing is refused)."""
    if quota is None or quota.remaining_h >= bound_h:
        return ""
    refresh = (f"; it refreshes {quota.refresh_at:%Y-%m-%d %H:%M} UTC" if quota.refresh_at
               else "")
    return (f"GPU quota: {quota.remaining_h:.2f} h left ({quota.total_h:.2f} allowed, "
            f"{quota.used_h:.2f} used, {quota.reserved_h:.2f} reserved), but {what} may take "
            f"{bound_h:.2f} h from push to end{refresh}; fix: wait for the refresh, or lower "
            "--max-hours")


def quota_lines(quota: Quota | None) -> list[str]:
    """What `run --dry-run`, `push --dry-run` and the chain show about the quota."""
    if quota is None:
        return [f"GPU quota: not reported by Kaggle; assuming about {ESTIMATED_WEEKLY_H:g} h a "
                "week (estimate: Kaggle's quota floats)"]
    return [f"GPU quota: {quota.describe()}"]


def memory_refusals(cfg, machine_shape: str, workdir: str | Path | None) -> list[str]:
    """The memory half of the gate, from the planner (issue 22's gate); nothing for a shape the
    kit does not know (Kaggle's answer decides) or one without a GPU."""
    from guie.kaggle.platform import MACHINE_SHAPES
    from guie.plan.gate import memory_refusals as refusals

    shape = MACHINE_SHAPES.get(machine_shape)
    if shape is None or not shape.gpus:
        return []
    return list(refusals(cfg, machine_shape, workdir=workdir))


def refuse(machine_shape: str, refusals: Sequence[str]) -> None:
    """PreflightRefused: one line, each refusal, and the override."""
    raise PreflightRefused(f"preflight on {machine_shape}: {'; '.join(refusals)}. Nothing was "
                           f"sent; pass {SKIP_FLAG} to send it anyway")
