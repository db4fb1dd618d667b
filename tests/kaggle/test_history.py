"""The local submission/leaderboard history: CSV appends and the score-over-time plot."""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pandas as pd

from guie.kaggle.results import LeaderboardEntry, Submission
from guie.kaggle.history import (append_history, experiment_of, format_tables, plot_history,
                                 snapshot, submission_message)

T0 = datetime(2022, 9, 1, tzinfo=timezone.utc)


def submissions() -> list[Submission]:
    return [Submission(1, T0, submission_message("smoke", "abc123", "me/guie-infer-smoke", 2),
                       "COMPLETE", 0.41, None, "", "submission.zip"),
            Submission(2, T0 + timedelta(days=1), "exp=third_place commit=def v=1", "COMPLETE",
                       0.62, 0.61, "", "submission.zip"),
            Submission(3, T0 + timedelta(days=2), "exp=third_place commit=0a1 v=2", "PENDING",
                       None, None, "", "submission.zip")]


def board() -> list[LeaderboardEntry]:
    return [LeaderboardEntry(i + 1, 100 + i, f"team {i}", T0, 0.73 - 0.02 * i) for i in range(3)]


def test_message_names_experiment_and_commit():
    message = submission_message("smoke", "abc123-dirty", "me/guie-infer-smoke", None)
    assert message == "exp=smoke commit=abc123-dirty kernel=me/guie-infer-smoke v=latest"
    assert experiment_of(message) == "smoke" and experiment_of("hand-made") == "other"


def test_append_only_adds_changed_rows(tmp_path):
    csv = tmp_path / "history.csv"
    first = append_history(csv, snapshot(submissions(), board(), T0))
    assert len(first) == 6
    again = append_history(csv, snapshot(submissions(), board(), T0 + timedelta(hours=1)))
    assert len(again) == 6  # nothing changed
    scored = [*submissions()[:2], replace(submissions()[2], status="COMPLETE", public_score=0.65)]
    third = append_history(csv, snapshot(scored, board(), T0 + timedelta(hours=2)))
    assert len(third) == 7
    reread = pd.read_csv(csv, dtype={"ref": str})
    assert list(reread[reread["ref"] == "3"]["status"]) == ["PENDING", "COMPLETE"]
    assert set(reread["experiment"].dropna()) >= {"smoke", "third_place"}


def test_plot_and_tables(tmp_path):
    history = append_history(tmp_path / "h.csv", snapshot(submissions(), board(), T0))
    png = plot_history(history, tmp_path / "h.png", top_n=2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = format_tables(submissions(), board())
    assert "0.6200" in text and "team 0" in text and "PENDING" in text
    empty = append_history(tmp_path / "e.csv", snapshot([], [], T0))
    assert plot_history(empty, tmp_path / "e.png").exists()
