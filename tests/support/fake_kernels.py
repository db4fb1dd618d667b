"""The fake Kaggle's kernel and competition RPCs, mixed into `FakeKaggle` (fake_server.py).

Each pushed version of a kernel has its own session (statuses, output files, log). Reads name
a version the way the real service is asked to: by the raw `versionLabel` key of the request
(read from the JSON body itself, since `from_dict` would accept a missing or renamed key
silently). Without a label a read describes whichever session the server calls latest, and
`stale_reads_after_push` makes the first unversioned reads after a re-push answer with the
*previous* session, as the real service may (kaggle-cli PRs 1177 and 1201). `version_labels`
says which label format the server understands ("v": `v<N>`, "number": `N`, "ignore": labels
ignored, as if the service dropped them). The accelerator quota (GetAcceleratorQuotaStatistics)
is charged `session_charge_s` per pushed GPU session.

Without a `kernel_runner`, a new session does what every kit kernel does first: its output holds
`guie-push.json` with the `push_nonce` of the notebook's injected parameters (kept when a test
sets the session's outputs); `next_statuses` sets what the next pushed session answers.
"""
from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from support.fake_errors import ApiError, iso

COMPETITION = "google-universal-image-embedding"
PUSH_MARKER = "guie-push.json"  # guie.kaggle.inputs.PUSH_MARKER
# kaggle-cli docs/kernels.md, "Accelerators available as of Feb 2026" (field guide 5a), less the
# P100 that Kaggle retired in September 2026.
ACCEPTED_MACHINE_SHAPES = frozenset({
    "TpuV38", "NvidiaTeslaT4", "NvidiaTeslaT4Highmem", "Tpu1VmV38", "NvidiaTeslaA100", "NvidiaL4",
    "TpuV5E8", "NvidiaL4X1", "TpuV6E8", "NvidiaH100", "NvidiaRtxPro6000"})


@dataclass
class Session:
    statuses: list[tuple[str, str]] = field(
        default_factory=lambda: [("RUNNING", ""), ("COMPLETE", "")])
    outputs: dict[str, bytes] = field(default_factory=dict)
    log: str = ""


@dataclass
class Kernel:
    ref: str
    versions: list[dict] = field(default_factory=list)  # the raw SaveKernel bodies
    sessions: list[Session] = field(default_factory=list)  # one per pushed version, latest last
    stale_reads: int = 0  # unversioned reads still answered with the previous session

    # The latest session's, for tests written before sessions had versions.
    @property
    def statuses(self) -> list[tuple[str, str]]:
        return self.latest.statuses

    @statuses.setter
    def statuses(self, value: list[tuple[str, str]]) -> None:
        self.latest.statuses = value

    @property
    def outputs(self) -> dict[str, bytes]:
        return self.latest.outputs

    @outputs.setter
    def outputs(self, value: dict[str, bytes]) -> None:
        self.latest.outputs = value

    @property
    def log(self) -> str:
        return self.latest.log

    @log.setter
    def log(self, value: str) -> None:
        self.latest.log = value

    @property
    def latest(self) -> Session:
        if not self.sessions:
            self.sessions.append(Session())
        return self.sessions[-1]


class KernelRpcs:
    """SaveKernel, session status and output, the accelerator quota, competition calls."""

    def _init_kernels(self) -> None:
        self.kernels: dict[str, Kernel] = {}
        self.submissions: list[dict] = []
        self.leaderboard: list[dict] = []
        self.missing_datasets: set[str] = set()  # dataset sources SaveKernel reports as invalid
        self.reject_submission: str | None = None  # CreateCodeSubmission answers 400 with this
        self.daily_cap = 5
        self.kernel_runner = None  # set: SaveKernel hands each pushed version to it (runs it)
        self.score_pending: str | None = None  # set: a listed PENDING submission gets this score
        self.limits_endpoint = True  # False: GetSubmissionLimits answers 404
        self.stale_reads_after_push = 0
        self.version_labels = "v"  # "v", "number" or "ignore" (see the module docstring)
        self.machine_shapes = set(ACCEPTED_MACHINE_SHAPES)
        self.slug_renames: dict[str, str] = {}  # SaveKernel stores (and answers) another slug
        self.next_statuses: list[tuple[str, str]] | None = None  # the next pushed session's
        # GetAcceleratorQuotaStatistics; None: the RPC answers 404 (an older service).
        self.quota: dict | None = None
        self.session_charge_s = 0.0
        self.competition_deadline = datetime(2022, 10, 17, 23, 59, tzinfo=timezone.utc)

    # -- test helpers -----------------------------------------------------------------------------

    def set_quota(self, total_h: float, used_h: float = 0.0, reserved_h: float = 0.0,
                  minimum_h: float = 30.0, charge_h: float = 0.0) -> None:
        self.quota = {"total_s": total_h * 3600, "used_s": used_h * 3600,
                      "reserved_s": reserved_h * 3600, "minimum_s": minimum_h * 3600}
        self.session_charge_s = charge_h * 3600

    def add_kernel_run(self, ref: str, statuses: list[tuple[str, str]], outputs: dict[str, bytes],
                       log: str, version: int | None = None) -> None:
        """Set the session of `version` (default: the latest) of kernel `ref`."""
        kernel = self.kernels.setdefault(ref, Kernel(ref))
        while version is not None and len(kernel.sessions) < version:
            kernel.sessions.append(Session())
        session = kernel.sessions[version - 1] if version else kernel.latest
        marker = {k: v for k, v in session.outputs.items() if k == PUSH_MARKER}
        session.statuses, session.outputs, session.log = list(statuses), {**marker, **outputs}, log

    def add_submission(self, description: str, status: str = "COMPLETE", public: str = "",
                       private: str = "", date: datetime | None = None) -> None:
        self.submissions.append({
            "ref": 1000 + len(self.submissions), "date": iso(date or datetime.now(timezone.utc)),
            "description": description, "status": status, "publicScore": public,
            "privateScore": private, "fileName": "submission.zip", "teamName": self.username})

    def kernel_reads(self, method: str) -> list[dict]:
        """The bodies of GetKernelSessionStatus / ListKernelSessionOutput calls, as sent."""
        return [body for name, body in self.calls if name == method]

    # -- kernels ----------------------------------------------------------------------------------

    def _save_kernel(self, req: Any, raw: dict) -> dict:
        if (not req.slug or not req.text or req.language != "python"
                or req.kernel_type != "notebook"):
            raise ApiError(400, "SaveKernel: slug, text, language python, "
                                "kernelType notebook required")
        self._owner_check(req.slug.split("/")[0], "SaveKernel")
        if json.loads(req.text).get("nbformat") != 4:
            raise ApiError(400, "SaveKernel: text is not an nbformat 4 notebook")
        shape = raw.get("machineShape")
        if shape is not None and shape not in self.machine_shapes:
            raise ApiError(400, f"Machine shape '{shape}' is not available.")
        invalid = [s for s in req.dataset_data_sources if not self._dataset_source_ok(s)]
        slug = self.slug_renames.get(req.slug, req.slug)
        kernel = self.kernels.setdefault(slug, Kernel(slug))
        kernel.versions.append(raw)
        kernel.stale_reads = self.stale_reads_after_push if kernel.sessions else 0
        kernel.sessions.append(Session(outputs=_push_marker(req.text)))
        if self.next_statuses is not None:
            kernel.sessions[-1].statuses, self.next_statuses = list(self.next_statuses), None
        if self.quota is not None and (raw.get("enableGpu") or shape):
            self.quota["used_s"] += self.session_charge_s
        if self.kernel_runner is not None:  # really run it (tests/kaggle/kernel_runner.py)
            kernel.sessions[-1].statuses = [("QUEUED", "")]
            self.kernel_runner(kernel, raw)
        return {"ref": f"/code/{slug}", "url": f"https://www.kaggle.com/code/{slug}",
                "versionNumber": len(kernel.versions), "invalidDatasetSources": invalid}

    def _dataset_source_ok(self, source: str) -> bool:
        """owner/slug, or owner/slug/N naming a version that exists (kaggle 2.2.4 sends both)."""
        parts = source.split("/")
        ref = "/".join(parts[:2])
        if ref in self.missing_datasets:
            return False
        if len(parts) == 3:
            dataset = self.datasets.get(ref)
            return dataset is not None and 1 <= int(parts[2]) <= len(dataset.versions)
        return True

    def _session(self, req: Any, raw: dict) -> tuple[Kernel, int]:
        """(kernel, 1-based session number) that a status or output read describes."""
        kernel = self.kernels.get(f"{req.user_name}/{req.kernel_slug}")
        if kernel is None or not kernel.sessions:
            raise ApiError(404, "Kernel not found")
        label = raw.get("versionLabel")
        if label is not None and self.version_labels != "ignore":
            prefix = "v" if self.version_labels == "v" else ""
            digits = label[len(prefix):] if label.startswith(prefix) else ""
            if not digits.isdigit():
                raise ApiError(400, f"Invalid version label '{label}'")
            if not 1 <= int(digits) <= len(kernel.sessions):
                raise ApiError(404, f"Kernel {kernel.ref} has no version {label}")
            return kernel, int(digits)
        if kernel.stale_reads > 0 and len(kernel.sessions) > 1:
            kernel.stale_reads -= 1
            return kernel, len(kernel.sessions) - 1
        return kernel, len(kernel.sessions)

    def _kernel_status(self, req: Any, raw: dict) -> dict:
        kernel, number = self._session(req, raw)
        statuses = kernel.sessions[number - 1].statuses
        state, failure = statuses.pop(0) if len(statuses) > 1 else statuses[0]
        return {"status": state, **({"failureMessage": failure} if failure else {})}

    def _kernel_output(self, req: Any, raw: dict) -> dict:
        kernel, number = self._session(req, raw)
        session = kernel.sessions[number - 1]
        files = [{"fileName": name, "url": f"{self.url}/output/{kernel.ref}/{number}/{name}"}
                 for name in sorted(session.outputs)]
        return {"files": files, "log": session.log}

    def output_file(self, path: str) -> bytes | None:
        """What GET /output/{owner}/{slug}/{version}/{name} serves."""
        owner, slug, number, name = path.split("/", 3)
        kernel = self.kernels.get(f"{owner}/{slug}")
        if kernel is None or not number.isdigit() or not 1 <= int(number) <= len(kernel.sessions):
            return None
        return kernel.sessions[int(number) - 1].outputs.get(name)

    def _quota_statistics(self, req: Any, raw: dict) -> dict:
        if self.quota is None:
            raise ApiError(404, "no such RPC")
        q = self.quota
        refresh = datetime.now(timezone.utc) + timedelta(days=3)

        def seconds(value: float) -> str:  # google.protobuf.Duration's JSON form
            return f"{int(value)}s"
        return {"quotaRefreshTime": iso(refresh),
                "gpuQuota": {"timeUsed": seconds(q["used_s"]),
                             "timeReserved": seconds(q["reserved_s"]),
                             "totalTimeAllowed": seconds(q["total_s"]),
                             "minimumTimeAllowed": seconds(q["minimum_s"]),
                             "hasEverRun": True},
                "tpuQuota": {"timeUsed": "0s", "timeReserved": "0s",
                             "totalTimeAllowed": "72000s", "minimumTimeAllowed": "72000s"}}

    # -- competition ------------------------------------------------------------------------------

    def _today_count(self) -> int:
        today = datetime.now(timezone.utc).date().isoformat()
        return sum(1 for s in self.submissions if s["date"].startswith(today))

    def _get_competition(self, req: Any, raw: dict) -> dict:
        if req.competition_name != COMPETITION:
            raise ApiError(404, f"Competition {req.competition_name!r} not found")
        return {"id": 39347, "ref": COMPETITION, "title": "Google Universal Image Embedding",
                "deadline": iso(self.competition_deadline), "maxDailySubmissions": self.daily_cap,
                "isKernelsSubmissionsOnly": True, "submissionsDisabled": False,
                "teamCount": 1022, "hostName": "google"}

    def _submit(self, req: Any, raw: dict) -> dict:
        if req.competition_name != COMPETITION:
            raise ApiError(404, f"Competition {req.competition_name!r} not found")
        ref = f"{req.kernel_owner}/{req.kernel_slug}"
        kernel = self.kernels.get(ref)
        if kernel is None or not kernel.versions:
            raise ApiError(404, f"Kernel {ref} not found")
        if req.kernel_version is not None and not 1 <= req.kernel_version <= len(kernel.versions):
            raise ApiError(400, f"Kernel {ref} has no version {req.kernel_version}")
        if not req.file_name:
            raise ApiError(400, "CreateCodeSubmission: fileName is required")
        if self._today_count() >= self.daily_cap:
            raise ApiError(400, "Daily submission limit reached")
        if self.reject_submission:
            raise ApiError(400, self.reject_submission)
        self.add_submission(req.submission_description or "", status="PENDING")
        return {"message": "Your submission was successfully saved",
                "ref": self.submissions[-1]["ref"]}

    def _list_submissions(self, req: Any, raw: dict) -> dict:
        if req.competition_name != COMPETITION:
            raise ApiError(404, "Competition not found")
        for submission in self.submissions:
            if submission["status"] == "PENDING" and self.score_pending is not None:
                submission.update(status="COMPLETE", publicScore=self.score_pending)
        ordered = sorted(self.submissions, key=lambda s: s["date"], reverse=True)
        start = int(req.page_token or 0)
        size = req.page_size or 20
        page = ordered[start:start + size]
        next_token = str(start + size) if start + size < len(ordered) else ""
        return {"submissions": page, "nextPageToken": next_token}

    def _limits(self, req: Any, raw: dict) -> dict:
        if not self.limits_endpoint:
            raise ApiError(404, "no such RPC")
        used = self._today_count()
        return {"numToday": used, "numTotal": len(self.submissions),
                "numAllowedNow": max(0, self.daily_cap - used)}

    def _leaderboard(self, req: Any, raw: dict) -> dict:
        size = req.page_size or 20
        return {"submissions": self.leaderboard[:size],
                "nextPageToken": "next" if len(self.leaderboard) > size else ""}

    def _download_leaderboard(self, req: Any, raw: dict) -> bytes:
        lines = ["TeamId,TeamName,LastSubmissionDate,Score"] + [
            f"{e['teamId']},{e['teamName']},{e['submissionDate']},{e['score']}"
            for e in self.leaderboard]
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as z:
            z.writestr(f"{COMPETITION}-publicleaderboard.csv", "\n".join(lines) + "\n")
        return buffer.getvalue()


def _push_marker(notebook_text: str) -> dict[str, bytes]:
    """{guie-push.json: the nonce} from the notebook's injected parameters, as its first cell
    writes it (nothing for a notebook without one)."""
    notebook = json.loads(notebook_text)
    for cell in notebook.get("cells", []):
        if "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            namespace: dict = {}
            source = cell["source"]
            exec("".join(source) if isinstance(source, list) else source, namespace)
            if "push_nonce" in namespace:
                return {PUSH_MARKER: json.dumps({"push_nonce": namespace["push_nonce"]}).encode()}
    return {}


def default_leaderboard(n: int = 5) -> list[dict]:
    start = datetime(2022, 10, 10, tzinfo=timezone.utc)
    return [{"teamId": 100 + i, "teamName": f"team {i}", "score": f"{0.73 - 0.02 * i:.3f}",
             "submissionDate": iso(start - timedelta(days=i))} for i in range(n)]
