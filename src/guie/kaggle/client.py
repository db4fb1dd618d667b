"""A thin, typed wrapper over the official `kaggle` client (`KaggleApi`, kaggle==2.2.4).

Why a wrapper: the client reports many failures as a normal answer with an `error` field (the CLI
exits 0 on them), raises bare `HTTPError`s whose meaning depends on the call, and retries only
some calls. Every method here checks the answer, turns failures into `KaggleError` subclasses
that name the resource, and retries idempotent reads on 429/5xx/connection errors with
exponential backoff and jitter. What the client already retries by itself (kaggle 2.2.4):
StartBlobUpload, CreateDataset and CreateDatasetVersion on 429 and connection errors (not 5xx);
the blob PUT through urllib3 on connection errors; file downloads on connection errors. Nothing
else, and never a code submission: `submit_code` is sent once, whatever happens.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TypeVar

import requests

from guie.kaggle.credentials import (
    CREATE_TOKEN, Credentials, find_credentials, import_kaggle_api, kaggle_config_dir,
    where_credentials_are_read)
from guie.kaggle.dataset_host import DatasetHostCalls
from guie.kaggle.kernel_calls import KernelCalls
from guie.kaggle.results import (
    AuthError, ConflictError, DailyCapReached, DatasetPush, KaggleError, LeaderboardEntry,
    NotFoundError, RetryPolicy, Submission, SubmissionReceipt, SubmissionRejected, http_status,
    is_transient, parse_score, retry_after_s)

COMPETITION = "google-universal-image-embedding"
T = TypeVar("T")


# ----------------------------------------------------------------------------- the client


class KaggleClient(DatasetHostCalls, KernelCalls):
    def __init__(self, api: Any, credentials: Credentials, competition: str = COMPETITION,
                 retry: RetryPolicy = RetryPolicy(), sleep: Callable[[float], None] = time.sleep):
        self.api = api
        self.credentials = credentials
        self.competition = competition
        self.retry = retry
        self._sleep = sleep

    @classmethod
    def connect(cls, competition: str = COMPETITION, retry: RetryPolicy = RetryPolicy(),
                sleep: Callable[[float], None] = time.sleep) -> "KaggleClient":
        """Authenticate with the user's credentials; a clear `AuthError` when there are none."""
        api = import_kaggle_api()()
        config_dir = kaggle_config_dir()
        # The client fixes its config path when `kaggle` is first imported; use today's.
        api.config_dir, api.config = str(config_dir), str(config_dir / "kaggle.json")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                api.authenticate()
        except SystemExit:
            raise AuthError("No Kaggle credentials found. "
                            f"Looked at: {where_credentials_are_read()}. "
                            f"{CREATE_TOKEN}") from None
        credentials = find_credentials()
        username = api.config_values.get("username") or credentials.username
        return cls(api, Credentials(username, credentials.secrets, credentials.source),
                   competition, retry, sleep)

    @property
    def username(self) -> str:
        return str(self.credentials.username)

    # -- error handling ---------------------------------------------------------------------

    def _fail(self, error: BaseException, what: str) -> KaggleError:
        failure = self._failure(error, what)
        failure.http_status = http_status(error)
        return failure

    def _failure(self, error: BaseException, what: str) -> KaggleError:
        status = http_status(error)
        detail = str(error) or type(error).__name__
        if status == 401:
            return AuthError(
                f"{what}: Kaggle refused the credentials of user {self.credentials.username!r} "
                f"(HTTP 401, from {self.credentials.source}). Check the key, or create a "
                "new token at https://www.kaggle.com/settings/api.")
        if status == 403:
            return AuthError(
                f"{what}: user {self.credentials.username!r} may not do this (HTTP 403): {detail}. "
                "Is the owner in the id your user name? For submissions: are the competition's "
                "rules accepted on its page?")
        if status == 404:
            return NotFoundError(f"{what}: not found (HTTP 404): {detail}")
        if status == 409:
            return ConflictError(f"{what}: conflict (HTTP 409): {detail}")
        if status is not None:
            return KaggleError(f"{what}: HTTP {status}: {detail}")
        return KaggleError(f"{what}: {detail}")

    def read(self, what: str, fn: Callable[[], T]) -> T:
        """Run an idempotent read, retrying 429/5xx/connection errors with backoff + jitter."""
        for attempt in range(self.retry.max_attempts):
            try:
                return fn()
            except (requests.RequestException, ValueError) as e:
                if not is_transient(e) or attempt + 1 == self.retry.max_attempts:
                    raise self._fail(e, what) from e
                delay_s = self.retry.delay_s(attempt, retry_after_s(e))
                print(f"{what}: {e}; retrying in {delay_s:.1f} s", file=sys.stderr)
                self._sleep(delay_s)
        raise AssertionError("unreachable")

    def _write(self, what: str, fn: Callable[[], T]) -> T:
        """Run a call that changes state once (the client's own retries only)."""
        try:
            return fn()
        except (requests.RequestException, ValueError) as e:
            raise self._fail(e, what) from e

    # -- datasets -----------------------------------------------------------------------------

    def dataset_status(self, ref: str) -> str | None:
        """The dataset's processing status ('ready', ...), or None if it does not exist."""
        try:
            return self.read(f"dataset status {ref}", lambda: self.api.dataset_status(ref))
        except NotFoundError:
            return None

    def push_dataset(self, folder: Path, notes: str, public: bool = False, dir_mode: str = "skip",
                     progress: bool = False) -> DatasetPush:
        """Create the dataset described by folder/dataset-metadata.json, or version it.

        progress: the client's own per-file messages and upload bars (for big files).
        """
        ref = json.loads((Path(folder) / "dataset-metadata.json").read_text())["id"]
        if self.dataset_status(ref) is None:
            answer = self._write(f"create dataset {ref}", lambda: self.api.dataset_create_new(
                str(folder), public=public, quiet=not progress, dir_mode=dir_mode))
            created = True
        else:
            answer = self._write(
                f"new version of dataset {ref}", lambda: self.api.dataset_create_version(
                    str(folder), notes, quiet=not progress, dir_mode=dir_mode))
            created = False
        if answer is None or answer.error or (answer.status or "").lower() not in ("ok", ""):
            message = (answer.error if answer is not None else "") or "no answer"
            kind = ConflictError if "already in use" in message else KaggleError
            raise kind(f"{'create' if created else 'version'} dataset {ref}: {message}")
        return DatasetPush(ref, answer.url or f"https://www.kaggle.com/datasets/{ref}", created)

    def dataset_version(self, ref: str) -> int | None:
        """The dataset's current version number (GetDataset), or None if it does not exist."""
        try:
            answer = self._get_dataset(ref, f"dataset info {ref}")
            return int(answer.current_version_number) or None
        except NotFoundError:
            return None

    def wait_dataset_version(self, ref: str, previous: int | None, timeout_s: float = 1800,
                             poll_s: float = 5) -> int:
        """Poll until a version newer than `previous` is current and ready; its number.

        Right after CreateDatasetVersion the status can still read "ready" for the previous
        version (field guide 5a): a kernel pushed then mounts the old source and fails its hash
        check, so "ready" alone is not enough.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            version = self.dataset_version(ref)
            if version is not None and (previous is None or version > previous):
                self.wait_dataset_ready(ref, timeout_s=max(deadline - time.monotonic(), 1),
                                        poll_s=poll_s)
                return version
            if time.monotonic() > deadline:
                raise KaggleError(f"dataset {ref}: still at version {version} after "
                                  f"{timeout_s:.0f} s (expected a version after {previous})")
            self._sleep(poll_s)

    def wait_dataset_ready(self, ref: str, timeout_s: float = 1800, poll_s: float = 5,
                           missing_grace_polls: int = 6) -> None:
        """Poll until the dataset's newest version is processed (Kaggle mounts only ready ones).

        A just-created dataset can answer 404 for a short while; that is tolerated for
        `missing_grace_polls` polls before it counts as an error.
        """
        deadline, misses = time.monotonic() + timeout_s, 0
        while True:
            status = self.dataset_status(ref)
            if status == "ready":
                return
            if status in ("failed", "deleted"):
                raise KaggleError(f"dataset {ref}: processing ended in status {status!r}")
            misses = misses + 1 if status is None else 0
            if misses > missing_grace_polls:
                raise NotFoundError(f"dataset {ref}: still not found after creating it")
            if time.monotonic() > deadline:
                raise KaggleError(f"dataset {ref}: not ready after {timeout_s:.0f} s "
                                  f"(status {status})")
            self._sleep(poll_s)

    def _sdk_call(self, fn: Callable[[Any], T]) -> T:
        with self.api.build_kaggle_client() as kaggle:
            return fn(kaggle)

    def _download(self, url: str, dest: Path, name: str, what: str) -> Path:
        target = (dest / name).resolve()
        if dest.resolve() not in target.parents:
            raise KaggleError(f"{what}: refusing file name {name!r} outside {dest}")

        def get() -> None:
            with requests.get(url, stream=True, timeout=300) as response:
                response.raise_for_status()
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(target.name + ".part")
                with open(partial, "wb") as out:
                    for chunk in response.iter_content(1 << 20):
                        out.write(chunk)
                partial.replace(target)

        self.read(f"download {name} ({what})", get)
        return target

    # -- competition --------------------------------------------------------------------------

    def list_submissions(self, max_pages: int = 10) -> list[Submission]:
        from kagglesdk.competitions.types.competition_api_service import ApiListSubmissionsRequest

        result, token = [], ""
        for _ in range(max_pages):
            request = ApiListSubmissionsRequest()
            request.competition_name, request.page_size = self.competition, 100
            request.page_token = token or None
            answer = self.read("list submissions", lambda request=request: self._sdk_call(
                lambda k: k.competitions.competition_api_client.list_submissions(request)))
            for s in answer.submissions or []:
                date = s.date.replace(tzinfo=timezone.utc) if s.date else None
                result.append(Submission(s.ref, date, s.description or "", s.status.name,
                                         parse_score(s.public_score), parse_score(s.private_score),
                                         s.error_description or "", s.file_name or ""))
            token = answer.next_page_token
            if not token:
                break
        return result

    def remaining_today(self, daily_cap: int) -> int:
        """Submissions left today: the server's own count where it gives one, else ours."""
        today = datetime.now(timezone.utc).date()
        used = sum(1 for s in self.list_submissions() if s.date and s.date.date() == today)
        remaining = daily_cap - used
        try:
            limits = self.read(
                "submission limits",
                lambda: self.api.competition_get_submission_limits(self.competition))
            # All zeros means "not on a team yet" (the client's docs), not "no submissions left".
            if limits.num_total or limits.num_allowed_now:
                remaining = min(remaining, limits.num_allowed_now)
        except NotFoundError:
            pass  # older servers have no GetSubmissionLimits; the count above stands
        return max(remaining, 0)

    def submit_code(self, kernel_ref: str, version: int | None, message: str,
                    file_name: str = "submission.zip", daily_cap: int = 5) -> SubmissionReceipt:
        """One code-competition submission; never retried (a retry could count twice)."""
        remaining = self.remaining_today(daily_cap)
        if remaining <= 0:
            raise DailyCapReached(
                f"submit {kernel_ref}: the daily submission cap is reached ({daily_cap} per UTC "
                "day, or the limit Kaggle reports); nothing was sent. Try again after 00:00 UTC.")
        what = f"submit {kernel_ref} version {version or 'latest'} to {self.competition}"
        try:
            answer = self.api.competition_submit_code(file_name, message, self.competition,
                                                      kernel_ref, version, quiet=True)
        except (requests.RequestException, ValueError) as e:
            status = http_status(e)
            if status in (401, 403) or not isinstance(e, requests.RequestException):
                raise self._fail(e, what) from e  # refused, or invalid before sending
            if status is not None and 400 <= status < 500 and status != 429:
                raise SubmissionRejected(f"{what}: rejected by Kaggle: {e}") from e
            raise KaggleError(
                f"{what}: the answer was lost ({e}). The submission may or may not have been "
                "recorded: run `submit.py leaderboard` to check before submitting again.") from e
        if not answer.ref:
            raise SubmissionRejected(f"{what}: rejected by Kaggle: "
                                     f"{answer.message or 'no reason given'}")
        return SubmissionReceipt(answer.ref, answer.message or "", remaining - 1)

    def competition_facts(self) -> dict:
        """What Kaggle says of the competition now: its deadline, whether it has passed (a late
        submission is scored but not ranked), the daily cap, and today's submission limits."""
        from kagglesdk.competitions.types.competition_api_service import ApiGetCompetitionRequest

        request = ApiGetCompetitionRequest()
        request.competition_name = self.competition
        info = self.read(f"competition {self.competition}", lambda: self._sdk_call(
            lambda k: k.competitions.competition_api_client.get_competition(request)))
        deadline = info.deadline.replace(tzinfo=timezone.utc) if info.deadline else None
        facts = {"competition": self.competition,
                 "deadline": deadline.isoformat() if deadline else None,
                 "late": bool(deadline and deadline < datetime.now(timezone.utc)),
                 "max_daily_submissions": info.max_daily_submissions,
                 "submissions_disabled": info.submissions_disabled,
                 "kernels_only": info.is_kernels_submissions_only}
        try:
            limits = self.read("submission limits", lambda: (
                self.api.competition_get_submission_limits(self.competition)))
            facts["limits"] = {"today": limits.num_today, "total": limits.num_total,
                               "allowed_now": limits.num_allowed_now}
        except NotFoundError:
            facts["limits"] = None  # older services have no GetSubmissionLimits
        return facts

    def leaderboard(self, top: int = 20) -> list[LeaderboardEntry]:
        def view() -> list:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints the next page token
                return self.api.competition_leaderboard_view(self.competition, page_size=top) or []
        entries = self.read("leaderboard", view)
        return [LeaderboardEntry(i + 1, e.team_id, e.team_name or "",
                                 e.submission_date.replace(tzinfo=timezone.utc)
                                 if e.submission_date else None,
                                 parse_score(e.score)) for i, e in enumerate(entries[:top])]

    def download_leaderboard(self, dest: Path) -> Path:
        dest = Path(dest)
        self.read("download leaderboard", lambda: self.api.competition_leaderboard_download(
            self.competition, str(dest), quiet=True))
        return dest / f"{self.competition}.zip"
