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
import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TypeVar

import requests

COMPETITION = "google-universal-image-embedding"
TERMINAL_KERNEL_STATES = ("COMPLETE", "ERROR", "CANCEL_ACKNOWLEDGED")
T = TypeVar("T")


class KaggleError(RuntimeError):
    """A Kaggle call failed; the message says which call, on what, and why."""


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


# ----------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class Credentials:
    username: str | None
    secrets: tuple[str, ...]  # key and tokens: nothing uploaded may contain these
    source: str  # where they were found, for error messages


def kaggle_config_dir() -> Path:
    """Where the client looks for kaggle.json (its own rule, re-evaluated now, not at import)."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return Path(os.environ["KAGGLE_CONFIG_DIR"])
    home_dir = Path(os.path.expanduser("~")) / ".kaggle"
    if sys.platform.startswith("linux") and not home_dir.exists():
        xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        return Path(xdg) / "kaggle"
    return home_dir


def find_credentials() -> Credentials:
    """Read the user's Kaggle credentials locally, without any network call."""
    secrets: list[str] = []
    username = os.environ.get("KAGGLE_USERNAME")
    source = "KAGGLE_USERNAME/KAGGLE_KEY" if username else "an access token"
    if os.environ.get("KAGGLE_KEY"):
        secrets.append(os.environ["KAGGLE_KEY"])
    config = kaggle_config_dir() / "kaggle.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text() or "{}")
        except json.JSONDecodeError:
            data = {}
        if data.get("key"):
            secrets.append(str(data["key"]))
        if not username and data.get("username"):
            username, source = str(data["username"]), str(config)
    for token_file in (Path(os.path.expanduser("~/.kaggle/access_token")),
                       Path(os.path.expanduser("~/.kaggle/access_token.txt"))):
        if token_file.is_file() and token_file.read_text().strip():
            secrets.append(token_file.read_text().strip())
    if os.environ.get("KAGGLE_API_TOKEN"):
        token = os.environ["KAGGLE_API_TOKEN"]
        secrets.append(Path(token).read_text().strip() if Path(token).is_file() else token)
    return Credentials(username, tuple(s for s in secrets if s), source)


def _import_kaggle_api() -> type:
    # `import kaggle` authenticates at import and prints a help text when credentials are missing;
    # that text would interleave with our own output, so it is swallowed here and we raise
    # our own clear error from `KaggleClient.connect` instead.
    with contextlib.redirect_stdout(io.StringIO()):
        from kaggle.api.kaggle_api_extended import KaggleApi
    return KaggleApi


# ----------------------------------------------------------------------------- answers


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


def _score(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _http_status(error: BaseException) -> int | None:
    # The client sometimes re-raises an HTTPError as a ValueError with a misleading text
    # (kernels_status calls every 401 a wrong slug): look at the chained cause too.
    for e in (error, error.__cause__, error.__context__):
        response = getattr(e, "response", None)
        if isinstance(e, requests.HTTPError) and response is not None:
            return response.status_code
    return None


def _retry_after_s(error: BaseException) -> float | None:
    response = getattr(error, "response", None)
    value = response.headers.get("Retry-After") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _is_transient(error: BaseException) -> bool:
    status = _http_status(error)
    if status is not None:
        return status == 429 or status >= 500
    return isinstance(error, (requests.ConnectionError, requests.Timeout))


# ----------------------------------------------------------------------------- the client


class KaggleClient:
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
        api = _import_kaggle_api()()
        config_dir = kaggle_config_dir()
        # The client fixes its config path when `kaggle` is first imported; use today's.
        api.config_dir, api.config = str(config_dir), str(config_dir / "kaggle.json")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                api.authenticate()
        except SystemExit:
            raise AuthError(
                "No Kaggle credentials found. Create an API token at "
                "https://www.kaggle.com/settings/api and either save kaggle.json to "
                f"{config_dir}/kaggle.json (chmod 600) or set KAGGLE_USERNAME and KAGGLE_KEY."
            ) from None
        credentials = find_credentials()
        username = api.config_values.get("username") or credentials.username
        return cls(api, Credentials(username, credentials.secrets, credentials.source),
                   competition, retry, sleep)

    @property
    def username(self) -> str:
        return str(self.credentials.username)

    # -- error handling ---------------------------------------------------------------------

    def _fail(self, error: BaseException, what: str) -> KaggleError:
        status = _http_status(error)
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

    def _read(self, what: str, fn: Callable[[], T]) -> T:
        """Run an idempotent read, retrying 429/5xx/connection errors with backoff + jitter."""
        for attempt in range(self.retry.max_attempts):
            try:
                return fn()
            except (requests.RequestException, ValueError) as e:
                if not _is_transient(e) or attempt + 1 == self.retry.max_attempts:
                    raise self._fail(e, what) from e
                delay_s = self.retry.delay_s(attempt, _retry_after_s(e))
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
            return self._read(f"dataset status {ref}", lambda: self.api.dataset_status(ref))
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
            answer = self._write(f"new version of dataset {ref}", lambda: self.api.dataset_create_version(
                str(folder), notes, quiet=not progress, dir_mode=dir_mode))
            created = False
        if answer is None or answer.error or (answer.status or "").lower() not in ("ok", ""):
            message = (answer.error if answer is not None else "") or "no answer"
            kind = ConflictError if "already in use" in message else KaggleError
            raise kind(f"{'create' if created else 'version'} dataset {ref}: {message}")
        return DatasetPush(ref, answer.url or f"https://www.kaggle.com/datasets/{ref}", created)

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
                raise KaggleError(f"dataset {ref}: not ready after {timeout_s:.0f} s (status {status})")
            self._sleep(poll_s)

    # -- kernels ------------------------------------------------------------------------------

    def push_kernel(self, folder: Path) -> KernelPush:
        """SaveKernel from folder/kernel-metadata.json (each push starts a new run)."""
        ref = json.loads((Path(folder) / "kernel-metadata.json").read_text())["id"]
        answer = self._write(f"push kernel {ref}", lambda: self.api.kernels_push(str(folder)))
        invalid = {name: getattr(answer, f"invalid_{name}_sources") for name in
                   ("dataset", "competition", "kernel", "model")}
        problems = [f"unknown {name} sources {items}" for name, items in invalid.items() if items]
        if answer.error or problems:
            raise KaggleError(f"push kernel {ref}: {'; '.join(filter(None, [answer.error, *problems]))}")
        url = answer.url or f"https://www.kaggle.com/code/{ref}"
        return KernelPush(ref, url, answer.version_number)

    def kernel_status(self, ref: str) -> KernelStatus:
        answer = self._read(f"kernel status {ref}", lambda: self.api.kernels_status(ref))
        return KernelStatus(ref, answer.status.name, answer.failure_message or "")

    def wait_kernel(self, ref: str, timeout_s: float = 13 * 3600, poll_s: float = 15,
                    max_poll_s: float = 300,
                    on_poll: Callable[[KernelStatus], None] | None = None) -> KernelStatus:
        """Poll with growing intervals until the kernel's run finishes."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.kernel_status(ref)
            if on_poll is not None:
                on_poll(status)
            if status.done:
                return status
            if time.monotonic() > deadline:
                raise KaggleError(f"kernel {ref}: still {status.state} after {timeout_s:.0f} s")
            self._sleep(poll_s)
            poll_s = min(poll_s * 1.5, max_poll_s)

    def download_kernel_output(self, ref: str, dest: Path) -> KernelOutput:
        """ListKernelSessionOutput, then GET every file url; writes the log as <slug>.log.

        Done here rather than with `kernels_output`, which writes an error page to disk as if it
        were the file when a url answers 4xx/5xx.
        """
        from kagglesdk.kernels.types.kernels_api_service import ApiListKernelSessionOutputRequest

        owner, slug = ref.split("/")[:2]
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        files, log_raw, token = [], "", ""
        while True:
            request = ApiListKernelSessionOutputRequest()
            request.user_name, request.kernel_slug, request.page_size = owner, slug, 100
            request.page_token = token or None
            answer = self._read(f"list output of kernel {ref}", lambda: self._sdk_call(
                lambda k: k.kernels.kernels_api_client.list_kernel_session_output(request)))
            log_raw = log_raw or (answer.log or "")
            for item in answer.files or []:
                files.append(self._download(item.url, dest, item.file_name, f"output of {ref}"))
            token = answer.next_page_token
            if not token:
                break
        log_path = None
        if log_raw:
            log_path = dest / f"{slug}.log"
            log_path.write_text(log_raw)
        return KernelOutput(tuple(files), log_path, render_log(log_raw))

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

        self._read(f"download {name} ({what})", get)
        return target

    # -- competition --------------------------------------------------------------------------

    def list_submissions(self, max_pages: int = 10) -> list[Submission]:
        from kagglesdk.competitions.types.competition_api_service import ApiListSubmissionsRequest

        result, token = [], ""
        for _ in range(max_pages):
            request = ApiListSubmissionsRequest()
            request.competition_name, request.page_size = self.competition, 100
            request.page_token = token or None
            answer = self._read("list submissions", lambda: self._sdk_call(
                lambda k: k.competitions.competition_api_client.list_submissions(request)))
            for s in answer.submissions or []:
                date = s.date.replace(tzinfo=timezone.utc) if s.date else None
                result.append(Submission(s.ref, date, s.description or "", s.status.name,
                                         _score(s.public_score), _score(s.private_score),
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
            limits = self._read("submission limits", lambda: self.api.competition_get_submission_limits(
                self.competition))
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
            status = _http_status(e)
            if status in (401, 403) or not isinstance(e, requests.RequestException):
                raise self._fail(e, what) from e  # refused, or invalid before sending
            if status is not None and 400 <= status < 500 and status != 429:
                raise SubmissionRejected(f"{what}: rejected by Kaggle: {e}") from e
            raise KaggleError(
                f"{what}: the answer was lost ({e}). The submission may or may not have been "
                "recorded: run `submit.py leaderboard` to check before submitting again.") from e
        if not answer.ref:
            raise SubmissionRejected(f"{what}: rejected by Kaggle: {answer.message or 'no reason given'}")
        return SubmissionReceipt(answer.ref, answer.message or "", remaining - 1)

    def leaderboard(self, top: int = 20) -> list[LeaderboardEntry]:
        def view() -> list:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints the next page token
                return self.api.competition_leaderboard_view(self.competition, page_size=top) or []
        entries = self._read("leaderboard", view)
        return [LeaderboardEntry(i + 1, e.team_id, e.team_name or "",
                                 e.submission_date.replace(tzinfo=timezone.utc) if e.submission_date else None,
                                 _score(e.score)) for i, e in enumerate(entries[:top])]

    def download_leaderboard(self, dest: Path) -> Path:
        dest = Path(dest)
        self._read("download leaderboard", lambda: self.api.competition_leaderboard_download(
            self.competition, str(dest), quiet=True))
        return dest / f"{self.competition}.zip"
