"""A local history of the user's submissions and the leaderboard, as a CSV and a PNG.

Each `submit.py leaderboard` appends a snapshot; rows that did not change since the previous
snapshot are not repeated. The plot shows public score over submission time per experiment
(named in the submission message), with the leaderboard's top scores as reference lines.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import pandas as pd

from guie.errors import UserValueError
from guie.kaggle.results import LeaderboardEntry, Submission

COLUMNS = ["fetched_at", "kind", "ref", "date", "experiment", "description", "status",
           "public_score", "private_score", "rank", "team_name"]
_IDENTITY = ["kind", "ref", "status", "public_score", "private_score", "rank"]


def submission_message(experiment: str, commit: str, kernel_ref: str, version: int | None) -> str:
    return f"exp={experiment} commit={commit} kernel={kernel_ref} v={version or 'latest'}"


def experiment_of(description: str) -> str:
    match = re.search(r"\bexp=(\S+)", description or "")
    return match.group(1) if match else "other"


def snapshot(submissions: Sequence[Submission], leaderboard: Sequence[LeaderboardEntry],
             fetched_at: datetime | None = None) -> pd.DataFrame:
    fetched = (fetched_at or datetime.now(timezone.utc)).isoformat(timespec="seconds")
    rows = [{"fetched_at": fetched, "kind": "own", "ref": str(s.ref),
             "date": s.date.isoformat() if s.date else "",
             "experiment": experiment_of(s.description),
             "description": s.description, "status": s.status, "public_score": s.public_score,
             "private_score": s.private_score, "rank": None, "team_name": ""}
            for s in submissions]
    rows += [{"fetched_at": fetched, "kind": "leaderboard", "ref": str(e.team_id),
              "date": e.submission_date.isoformat() if e.submission_date else "", "experiment": "",
              "description": "", "status": "", "public_score": e.score, "private_score": None,
              "rank": e.rank, "team_name": e.team_name} for e in leaderboard]
    return pd.DataFrame(rows, columns=COLUMNS)


def append_history(csv_path: str | Path, new: pd.DataFrame) -> pd.DataFrame:
    """Append the snapshot's changed rows to the CSV; returns the whole history."""
    csv_path = Path(csv_path)
    old = (pd.read_csv(csv_path, dtype={"ref": str}) if csv_path.exists()
           else pd.DataFrame(columns=COLUMNS))
    missing = set(COLUMNS) - set(old.columns)
    if missing:
        raise UserValueError(f"{csv_path}: not a submission history "
                         f"(missing columns {sorted(missing)})")
    new = new.astype({"ref": str})
    if len(old):
        seen = set(map(_key, old[_IDENTITY].itertuples(index=False)))
        new = new[[_key(r) not in seen for r in new[_IDENTITY].itertuples(index=False)]]
    frames = [f for f in (old[COLUMNS], new[COLUMNS]) if len(f)]
    history = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    history.to_csv(csv_path, index=False)
    return history


def _key(row: tuple) -> tuple:
    # CSV round trips turn None into NaN and ints into floats: compare on a normal form.
    return tuple("" if pd.isna(v)
                 else (f"{float(v):.6g}" if isinstance(v, (int, float)) else str(v))
                 for v in row)


def plot_history(history: pd.DataFrame, png_path: str | Path, top_n: int = 3) -> Path:
    """Public score over time per experiment, with the latest top-n leaderboard scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png_path = Path(png_path)
    own = history[(history["kind"] == "own") & history["public_score"].notna()].copy()
    own = own.drop_duplicates("ref", keep="last")
    own["date"] = pd.to_datetime(own["date"], utc=True, format="ISO8601")
    fig, ax = plt.subplots(figsize=(9, 5))
    for experiment, group in own.sort_values("date").groupby("experiment"):
        ax.plot(group["date"], group["public_score"].astype(float), marker="o", label=experiment)
    board = history[history["kind"] == "leaderboard"]
    if len(board):
        latest = board[board["fetched_at"] == board["fetched_at"].max()]
        for _, row in latest.sort_values("rank").head(top_n).iterrows():
            ax.axhline(float(row["public_score"]), linestyle="--", linewidth=0.8, color="grey")
            ax.annotate(f"#{int(row['rank'])} {row['team_name']} {float(row['public_score']):.4f}",
                        (0.01, float(row["public_score"])), xycoords=("axes fraction", "data"),
                        fontsize=8, va="bottom", color="grey")
    ax.set(xlabel="submitted (UTC)", ylabel="public mP@5", title="GUIE submissions")
    if len(own):
        ax.legend(loc="lower right")
    fig.autofmt_xdate()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def format_tables(submissions: Sequence[Submission],
                  leaderboard: Sequence[LeaderboardEntry]) -> str:
    def score(value: float | None) -> str:
        return "" if value is None else f"{value:.4f}"

    own = pd.DataFrame([{"date": s.date.strftime("%Y-%m-%d %H:%M") if s.date else "",
                         "status": s.status, "public": score(s.public_score),
                         "private": score(s.private_score), "message": s.description,
                         "error": s.error_description} for s in submissions])
    board = pd.DataFrame([{"rank": e.rank, "team": e.team_name, "score": score(e.score)}
                          for e in leaderboard])
    parts = ["Your submissions:", own.to_string(index=False) if len(own) else "  (none)",
             "", "Leaderboard:", board.to_string(index=False) if len(board) else "  (empty)"]
    return "\n".join(parts)
