"""`submit.py run`: chain Kaggle sessions from a config to a scored submission.

A recipe's stage 2 can outlast one 12-hour session. The chain pushes a training kernel, waits,
reads from its output (`guie-run.json`) whether training finished or paused at `max_hours`, and
if paused pushes the next session's own kernel (`guie-train-<config>-s<n>`) resuming from the
previous one's output; then the inference kernel on the last training output, checks that its
`submission.zip` came from this run, and submits it (the daily cap checked first) and waits for
the score. Every push is recorded in `<workdir>/run-<config>.json` before anything waits on it,
so a stopped command, started again, waits on the pending kernel instead of pushing another.
A kernel that ends in ERROR stops the chain with its message and log tail: never a blind retry.

Every status and output read names the version the push returned, and the output must carry
this push's nonce (`guie.kaggle.sessions`): right after a re-push Kaggle can still describe the
previous session. Before each push the chain reads the GPU quota Kaggle reports and stops
(status "quota") before a session the remaining quota cannot finish, counting a session from its
push to its end (`guie.kaggle.preflight`); `max_quota_hours` caps what this chain spends on top.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Literal, Sequence

from guie.kaggle import preflight
from guie.kaggle.build import build_kernels, pin_dataset_sources, pinned_versions, upload_datasets
from guie.kaggle.inputs import RUN_MARKER
from guie.kaggle.notebooks import EXPORT_MARKER
from guie.kaggle.run_config import run_identity
from guie.kaggle.sessions import STALE_GRACE_S, wait_for_push

Until = Literal["trained", "exported", "submitted"]
UNTIL = ("trained", "exported", "submitted")
LOG_TAIL_LINES = 30


class ChainStopped(RuntimeError):
    """The chain cannot go on (a failed kernel, a foreign export); the message says why."""


@dataclass(frozen=True)
class ChainSettings:
    """How the chain runs; what it trains is the resolved config given to `Chain` (its
    `max_hours` is each training session's budget)."""
    config_name: str  # names the kernels and the state file
    overrides: tuple[str, ...]  # as typed, for the state file's reader
    owner: str
    workdir: Path
    secrets: tuple[str, ...]
    python_version: str
    until: Until = "submitted"
    max_quota_hours: float | None = None  # GPU hours this chain may spend (None: no own cap)
    machine_shape: str = "NvidiaTeslaT4"
    daily_cap: int = 5
    poll_s: float = 15.0
    stale_grace_s: float = STALE_GRACE_S  # see guie.kaggle.sessions


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ChainState:
    """The chain's record: its run, every kernel it pushed and what became of it."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"sessions": []}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)

    @property
    def sessions(self) -> list[dict]:
        return self.data["sessions"]

    def of_kind(self, kind: str) -> list[dict]:
        return [s for s in self.sessions if s["kind"] == kind]

    @property
    def hours_spent(self) -> float:
        return sum(s.get("hours") or 0.0 for s in self.sessions)


def _hours(run: dict, start: str = "session_started_at", end: str = "session_ended_at") -> float:
    try:
        started = datetime.fromisoformat(run[start])
        ended = datetime.fromisoformat(run[end])
    except (KeyError, TypeError, ValueError):
        return 0.0
    return max((ended - started).total_seconds() / 3600, 0.0)


def describe(settings: ChainSettings, cfg) -> list[str]:
    """The chain `run --dry-run` shows: what it would push, in order, with its limits."""
    cap = (f" or pass the chain's own cap of {settings.max_quota_hours:g} h"
           if settings.max_quota_hours is not None else "")
    num_stages = len([s for s in cfg.stages if s.enabled])
    lines = [f"1. training sessions of up to {cfg.max_hours:g} h each ({num_stages} stages), "
             "each resuming from the previous session's output, until the stages are done; "
             f"stops before a session (counted from push to end, up to "
             f"{preflight.session_bound_h(cfg.max_hours):.2f} h) that the GPU quota left "
             f"cannot finish{cap}"]
    if settings.until in ("exported", "submitted"):
        lines.append("2. the inference kernel on the last training output; its submission.zip "
                     "must come from this run")
    if settings.until == "submitted":
        lines.append(f"3. one code submission (daily cap {settings.daily_cap} checked first), "
                     "then waiting for its score")
    return lines


class Chain:
    def __init__(self, client, cfg, settings: ChainSettings,
                 download: Callable | None = None, log: Callable[[str], None] = print):
        self.client, self.cfg, self.s, self.log = client, cfg, settings, log
        self.download = download
        self.state = ChainState(Path(settings.workdir) / f"run-{settings.config_name}.json")
        self._source = None  # the source dataset as packed and uploaded by this process

    # -- building and pushing ------------------------------------------------------------------

    def _build(self, kinds: Sequence[str], session: int = 1, **options):
        build = build_kernels(self.cfg, self.s.config_name, self.s.owner, self.s.workdir,
                              self.s.secrets, kinds=kinds, source=self._source,
                              machine_shape=self.s.machine_shape, session=session, **options)
        self._source = build.source  # packed once: every session runs what the chain uploaded
        return build

    def _push(self, kind: str, build, **record) -> dict:
        folder = build.folders[kind]
        pin_dataset_sources(folder, pinned_versions(self.state.data.get("datasets", {})))
        result = self.client.push_kernel(folder)
        entry = {"kind": kind, "ref": result.ref, "version": result.version,
                 "nonce": build.plans[kind].parameters["push_nonce"],
                 "pushed_at": _now(), "outcome": None, **record}
        self.state.sessions.append(entry)
        self.state.save()  # before waiting: a restarted chain waits on it, never pushes again
        self.log(f"pushed {kind} kernel {result.ref} version {result.version}")
        return entry

    def _start(self) -> None:
        """The datasets, once per chain (again only if the source changed)."""
        build = self._build(["train"])
        # The same for every session of this run, whatever max_hours or compat it is run with.
        run = run_identity(self.cfg, build.source.content_hash)
        known = self.state.data.get("run")
        if known and known["run_id"] != run["run_id"] and self.state.sessions:
            raise ChainStopped(
                f"{self.state.path}: this chain trains run {known['run_id']} (source "
                f"{known['source_hash'][:12]}), but the config or the source now make run "
                f"{run['run_id']} (what may change between sessions, such as max_hours or "
                "export.compat, does not count); resuming it under another config or other code "
                "would not reproduce it. Move the state file away to start a new chain.")
        options = {"download": self.download} if self.download else {}
        datasets = upload_datasets(self.client, build, self.s.owner, self.s.secrets,
                                   self.s.python_version, self.state.data.get("datasets", {}),
                                   f"run {run['run_id']}", self.s.poll_s, log=self.log, **options)
        self.state.data.update(run=run, datasets=datasets, config=self.s.config_name,
                               overrides=list(self.s.overrides))
        self.state.save()

    # -- waiting ---------------------------------------------------------------------------------

    def _wait(self, entry: dict) -> None:
        dest = (Path(self.s.workdir) / "outputs"
                / f"{entry['ref'].split('/')[1]}-v{entry['version']}")
        wanted = [RUN_MARKER] if entry["kind"] == "train" else [EXPORT_MARKER, "submission.zip"]
        session = wait_for_push(self.client, entry["ref"], entry["version"], entry.get("nonce"),
                                dest, wanted, self.s.poll_s, self.s.stale_grace_s, self.log)
        status, output = session.status, session.output
        entry["state"], entry["finished_at"] = status.state, _now()
        entry["hours"] = _hours(entry, "pushed_at", "finished_at")  # as Kaggle charges it
        if status.state == "COMPLETE" and not session.ours:
            entry["outcome"] = "stale"
            self.state.save()
            raise ChainStopped(f"kernel {entry['ref']} version {entry['version']}: still reads "
                               f"the output of another push (nonce {session.found_nonce}, "
                               f"expected {entry['nonce']}) after {self.s.stale_grace_s:.0f} s; "
                               "check the kernel's page, then run again")
        if status.state != "COMPLETE":
            entry["outcome"] = "error"
            self.state.save()
            tail = "\n".join(output.log_text.splitlines()[-LOG_TAIL_LINES:])
            raise ChainStopped(f"kernel {entry['ref']} version {entry['version']} ended "
                               f"{status.state}: {status.failure_message or 'no message'}\n"
                               f"--- last {LOG_TAIL_LINES} log lines ---\n{tail}")
        marker = dest / (RUN_MARKER if entry["kind"] == "train" else EXPORT_MARKER)
        found = json.loads(marker.read_text()) if marker.is_file() else {}
        if found.get("run_id") != self.state.data["run"]["run_id"]:
            entry["outcome"] = "foreign"
            self.state.save()
            raise ChainStopped(f"kernel {entry['ref']}: its output holds run "
                               f"{found.get('run_id', 'none')}, "
                               f"not {self.state.data['run']['run_id']}")
        if entry["kind"] == "train":
            entry["outcome"], entry["notebook_hours"] = found["status"], _hours(found)
            entry["paused_in"] = found.get("paused_in")
        else:
            entry["outcome"] = "done"
            entry["submission_zip"] = str(dest / "submission.zip")
        self.state.save()
        self._progress(entry)

    def _progress(self, entry: dict) -> None:
        trains = self.state.of_kind("train")
        names = [st.name for st in self.cfg.stages if st.enabled]
        where = (f"paused in {entry['paused_in']} (stage {names.index(entry['paused_in']) + 1} "
                 f"of {len(names)})" if entry.get("paused_in") in names else entry["outcome"])
        left = ""
        if entry["kind"] == "train" and entry.get("paused_in") in names:
            done = names.index(entry["paused_in"]) + 0.5  # halfway through that stage, roughly
            rate = self.state.hours_spent / done
            left = f"; about {rate * (len(names) - done):.2f} h left (rough: stages done so far)"
        self.log(f"{entry['kind']} session {len(trains) if entry['kind'] == 'train' else 1}: "
                 f"{where}; {len(trains)} training sessions, {self.state.hours_spent:.3f} GPU "
                 f"hours spent (from push to end){left}")

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> dict:
        finished = self._finished()
        if finished:  # nothing to push: and not an error if the working tree moved on since
            self.log(f"chain already {finished}: {self.state.path}")
            return {"status": finished, **self.state.data}
        self._start()
        for entry in self.state.sessions:
            if entry["outcome"] is None:
                self.log(f"waiting on {entry['kind']} kernel {entry['ref']} version "
                         f"{entry['version']}, pushed at {entry['pushed_at']}")
                self._wait(entry)
            elif entry["outcome"] in ("error", "foreign", "stale"):
                what = {"error": "failed", "foreign": "wrote another run's output",
                        "stale": "never showed this push's output"}[entry["outcome"]]
                raise ChainStopped(f"kernel {entry['ref']} version {entry['version']} {what} "
                                   "before; fix the cause and move the state file away to retry")
        while True:
            trains = self.state.of_kind("train")
            if not trains or trains[-1]["outcome"] == "paused":
                if self._over_quota(f"session {len(trains) + 1}", self._train_bound()):
                    return {"status": "quota", **self.state.data}
                previous = trains[-1]["ref"] if trains else None
                build = self._build(["train"], session=len(trains) + 1, resume_kernel=previous)
                self._wait(self._push("train", build, session=len(trains) + 1))
                continue
            if self.s.until == "trained":
                return {"status": "trained", **self.state.data}
            infers = self.state.of_kind("infer")
            if not infers:
                if self._over_quota("the inference session", preflight.INFER_SESSION_H
                                    + preflight.SETUP_ALLOWANCE_H):
                    return {"status": "quota", **self.state.data}
                build = self._build(["infer"], checkpoint_kernel=trains[-1]["ref"],
                                    expected_run=self.state.data["run"])
                self._wait(self._push("infer", build))
                continue
            if self.s.until == "exported":
                return {"status": "exported", **self.state.data}
            return self._submit(infers[-1])

    def _train_bound(self) -> float:
        """The most the next training session can cost, from push to end: its budget plus the
        set-up time earlier sessions spent before their notebooks' clocks started."""
        setup = [t["hours"] - t.get("notebook_hours", 0.0) for t in self.state.of_kind("train")
                 if t.get("hours")]
        return preflight.session_bound_h(self.cfg.max_hours, setup)

    def _over_quota(self, what: str, bound_h: float) -> bool:
        """Whether `what` must not start: the quota Kaggle reports (read now) cannot finish it,
        or it would pass the chain's own cap."""
        quota = self.client.quota()
        for line in preflight.quota_lines(quota):
            self.log(line)
        refusal = preflight.quota_refusal(quota, bound_h, what)
        cap = self.s.max_quota_hours
        if not refusal and cap is not None and self.state.hours_spent + bound_h > cap:
            refusal = (f"{self.state.hours_spent:.3f} GPU hours spent and up to {bound_h:.3f} "
                       f"more for {what} would pass the chain's cap of {cap:g} "
                       "(--max-quota-hours)")
        if refusal:
            self.log(f"stopped before {what}: {refusal}; run again to go on")
        return bool(refusal)

    def _finished(self) -> str | None:
        """"submitted", "exported" or "trained" where the chain has reached `until` before."""
        trains, infers = self.state.of_kind("train"), self.state.of_kind("infer")
        trained = bool(trains) and trains[-1]["outcome"] == "done"
        exported = trained and bool(infers) and infers[-1]["outcome"] == "done"
        scored = (self.state.data.get("submission") or {}).get("status") in ("COMPLETE", "ERROR")
        reached = {"trained": trained, "exported": exported, "submitted": exported and scored}
        return self.s.until if reached[self.s.until] else None

    def _submit(self, infer: dict) -> dict:
        from guie.kaggle.history import submission_message

        submission = self.state.data.get("submission")
        if submission is None:
            message = submission_message(self.s.config_name, self.state.data["run"]["run_id"],
                                         infer["ref"], infer["version"])
            receipt = self.client.submit_code(infer["ref"], infer["version"], message,
                                              daily_cap=self.s.daily_cap)
            submission = self.state.data["submission"] = {"ref": receipt.ref, "message": message,
                                                          "submitted_at": _now()}
            self.state.save()
            self.log(f"submitted {infer['ref']} version {infer['version']}: ref {receipt.ref} "
                     f"({receipt.remaining_today} left today)")
        scored = self._wait_for_score(submission["ref"])
        submission.update(status=scored.status, public_score=scored.public_score)
        self.state.save()
        return {"status": "submitted", **self.state.data}

    def _wait_for_score(self, ref: int, timeout_s: float = 6 * 3600):
        import time

        from guie.kaggle.history import append_history, snapshot

        deadline, poll_s = time.monotonic() + timeout_s, self.s.poll_s
        while True:
            submissions = self.client.list_submissions()
            mine = next((s for s in submissions if str(s.ref) == str(ref)), None)
            if mine is not None and mine.status in ("COMPLETE", "ERROR"):
                append_history(Path(self.s.workdir) / "history.csv", snapshot(submissions, []))
                self.log(f"submission {ref}: {mine.status}, public score {mine.public_score}"
                         + (f" ({mine.error_description})" if mine.error_description else ""))
                return mine
            if time.monotonic() > deadline:
                raise ChainStopped(f"submission {ref}: not scored after {timeout_s:.0f} s; "
                                   "`submit.py leaderboard` shows it later")
            self.client._sleep(poll_s)  # the client's clock, so tests can drive it
            poll_s = min(poll_s * 1.5, 300)
