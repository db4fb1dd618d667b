"""What a call of the Kaggle wrapper results in: a typed result or a `KaggleError`; and the retry
policy, with the helpers that read an error's HTTP status and decide whether to try again."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import requests

from guie.errors import UserError

TERMINAL_KERNEL_STATES = ("COMPLETE", "ERROR", "CANCEL_ACKNOWLEDGED")
# GUIE's deadline was 2022-10-17; Kaggle still scores code submissions made after it.
LATE_NOTE = ("GUIE closed on 2022-10-17: a submission now is a late submission, scored (its "
             "public and private scores appear in your submissions) but not ranked: it never "
             "enters the leaderboard, whose rows are the teams' entries from before the deadline")


class KaggleError(UserError, RuntimeError):
    """A Kaggle call failed; the message says which call, on what, and why."""

    http_status: int | None = None  # the HTTP status Kaggle answered, where it answered one


class AuthError(KaggleError):
    """Missing or refused credentials."""


class NotFoundError(KaggleError):
    """HTTP 404."""


class ConflictError(KaggleError):
    """HTTP 409, or a slug/title already in use."""


class SubmissionRejected(KaggleError):
    """Kaggle answered the submission with a refusal."""


class DailyCapReached(KaggleError):
    """No submission left today; nothing was sent."""


@dataclass(frozen=True)
class DatasetPush:
    ref: str
    url: str
    created: bool  # False: a new version of an existing dataset


@dataclass(frozen=True)
class KernelPush:
    ref: str
    url: str
    version: int | None


@dataclass(frozen=True)
class KernelStatus:
    ref: str
    state: str  # KernelWorkerStatus name: QUEUED, RUNNING, COMPLETE, ERROR, ...
    failure_message: str

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_KERNEL_STATES


@dataclass(frozen=True)
class KernelOutput:
    files: tuple[Path, ...]
    log_path: Path | None
    log_text: str  # the log rendered as plain text


@dataclass(frozen=True)
class Submission:
    ref: int
    date: datetime | None  # UTC
    description: str
    status: str  # PENDING, COMPLETE, ERROR
    public_score: float | None
    private_score: float | None
    error_description: str
    file_name: str


@dataclass(frozen=True)
class LeaderboardEntry:
    rank: int
    team_id: int
    team_name: str
    submission_date: datetime | None
    score: float | None


@dataclass(frozen=True)
class SubmissionReceipt:
    ref: int
    message: str
    remaining_today: int  # after this submission


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    initial_delay_s: float = 1.0
    multiplier: float = 2.0
    max_delay_s: float = 60.0

    def delay_s(self, attempt: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            return min(retry_after_s, self.max_delay_s)
        ceiling = min(self.max_delay_s, self.initial_delay_s * self.multiplier ** attempt)
        return random.uniform(ceiling / 2, ceiling)  # jitter: concurrent clients spread out


def render_log(raw: str) -> str:
    """Kaggle logs are a JSON list of {stream_name, time, data}; anything else is shown as is."""
    try:
        events = json.loads(raw)
    except (json.JSONDecodeError, TypeError):
        return raw or ""
    if not isinstance(events, list):
        return raw
    return "".join(str(e.get("data", "")) for e in events if isinstance(e, dict))


def parse_score(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def http_status(error: BaseException) -> int | None:
    # The client sometimes re-raises an HTTPError as a ValueError with a misleading text
    # (kernels_status calls every 401 a wrong slug): look at the chained cause too.
    for e in (error, error.__cause__, error.__context__):
        response = getattr(e, "response", None)
        if isinstance(e, requests.HTTPError) and response is not None:
            return response.status_code
    return None


def retry_after_s(error: BaseException) -> float | None:
    response = getattr(error, "response", None)
    value = response.headers.get("Retry-After") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def is_transient(error: BaseException) -> bool:
    status = http_status(error)
    if status is not None:
        return status == 429 or status >= 500
    return isinstance(error, (requests.ConnectionError, requests.Timeout))
