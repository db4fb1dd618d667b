"""A local HTTP server that speaks the Kaggle wire protocol, for the real `kaggle` client.

Every RPC is `POST /v1/{Service}/{Method}` (or `/api/v1/...` in LOCALHOST mode, possibly as an
absolute-form proxy request line) with a camelCase JSON body. Each body is checked key by key
against its kagglesdk request type (`from_json` silently drops unknown keys, so that check is
ours), then parsed with `from_dict`; a malformed call gets a 400. The server keeps what arrived
(metadata, uploaded bytes, notebook sources) for the tests to assert on, and injects faults.

Dataset downloads follow Kaggle's shape: `DownloadDataset` answers a 302 to a storage URL (here
`GET /files/...`) that serves the bytes with `Accept-Ranges: bytes`, an ETag, Last-Modified and
an `x-goog-hash` (crc32c, md5), and honours `Range`/`If-Range`, so the client can resume. Every
GET of a file is logged in `downloads` with the byte range actually sent.

Point the client at it in-process by replacing the PROD entry of
`kagglesdk.kaggle_env._env_to_endpoint` with `server.url`, or from a subprocess with
KAGGLE_API_ENVIRONMENT=LOCALHOST and HTTP_PROXY=server.url (NO_PROXY cleared).
"""
from __future__ import annotations

import base64
import io
import json
import re
import threading
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import quote


from kagglesdk.blobs.types import blob_api_service as blobs
from kagglesdk.competitions.types import competition_api_service as comps
from kagglesdk.datasets.types import dataset_api_service as ds
from kagglesdk.kernels.types import kernels_api_service as kernels
from support.fake_errors import ApiError, check_keys, iso
from support.fake_http import make_handler
from support.fake_kernels import (  # noqa: F401 - re-exported for the tests
    COMPETITION, Kernel, KernelRpcs, Session, default_leaderboard)


@dataclass
class Fault:
    rpc: str  # Method name, e.g. "GetDatasetStatus"
    status: int
    times: int = 1
    message: str = "injected fault"
    headers: dict = field(default_factory=dict)
    body: dict | None = None  # answer this JSON instead of an error ({"code", "message"})


@dataclass
class Blob:
    name: str
    content_length: int
    data: bytearray = field(default_factory=bytearray)

    @property
    def complete(self) -> bool:
        return len(self.data) == self.content_length


@dataclass
class Dataset:
    ref: str
    title: str
    license_name: str
    is_private: bool
    versions: list[dict[str, bytes]] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)  # answered in turn; the last one sticks
    zip_files: bool = False  # serve each single-file download as <name>.zip, as Kaggle may
    created: list[datetime] = field(default_factory=list)  # per version, for Last-Modified
    # After a new version: GetDataset still reports the previous version number, and the status
    # still reads ready (the previous version's), for this many GetDataset polls (field guide 5a).
    stale_polls: int = 0


@dataclass
class DownloadBreak:
    """The next `times` GETs of a file whose name ends with `name` drop the connection once
    they have sent the bytes before absolute offset `at_byte`."""

    name: str
    at_byte: int
    times: int = 1


class Redirect(str):
    """A handler's answer that becomes a 302 to this URL."""




class FakeKaggle(KernelRpcs):
    """State, fault injection and RPC handlers; `start()` serves it on 127.0.0.1 (the kernel and
    competition RPCs live in support.fake_kernels)."""

    def __init__(self, username: str = "fake-user", key: str = "fake-key-0123456789abcdef"):
        self.username, self.key = username, key
        self.calls: list[tuple[str, dict | None]] = []  # (Method or "PUT"/"GET" path, body)
        self.raw_bodies: list[bytes] = []  # every request body, for leak checks
        self.faults: list[Fault] = []
        self.blobs: dict[str, Blob] = {}
        self.datasets: dict[str, Dataset] = {}
        self._init_kernels()
        self.ready_after_polls = 1  # GetDatasetStatus answers "not yet" this many times first
        self.stale_version_polls = 0  # see Dataset.stale_polls
        self.upload_break: str | None = None  # "503" or "drop": the next blob PUT breaks midway
        self.downloads: list[dict] = []  # every file GET: path, range, status, start, sent
        self.download_breaks: list[DownloadBreak] = []
        self.corrupt_transfer: set[str] = set()  # file names served with one byte flipped
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._handlers: dict[str, tuple[type, Callable[[Any, dict], dict | bytes]]] = {
            "datasets.DatasetApiService/GetDatasetStatus":
                (ds.ApiGetDatasetStatusRequest, self._dataset_status),
            "datasets.DatasetApiService/CreateDataset":
                (ds.ApiCreateDatasetRequest, self._create_dataset),
            "datasets.DatasetApiService/CreateDatasetVersion":
                (ds.ApiCreateDatasetVersionRequest, self._create_version),
            "datasets.DatasetApiService/GetDataset":
                (ds.ApiGetDatasetRequest, self._get_dataset),
            "datasets.DatasetApiService/ListDatasetFiles":
                (ds.ApiListDatasetFilesRequest, self._list_dataset_files),
            "datasets.DatasetApiService/DownloadDataset":
                (ds.ApiDownloadDatasetRequest, self._download_dataset),
            "blobs.BlobApiService/StartBlobUpload":
                (blobs.ApiStartBlobUploadRequest, self._start_blob),
            "kernels.KernelsApiService/SaveKernel":
                (kernels.ApiSaveKernelRequest, self._save_kernel),
            "kernels.KernelsApiService/GetKernelSessionStatus":
                (kernels.ApiGetKernelSessionStatusRequest, self._kernel_status),
            "kernels.KernelsApiService/ListKernelSessionOutput":
                (kernels.ApiListKernelSessionOutputRequest, self._kernel_output),
            "kernels.KernelsApiService/GetAcceleratorQuotaStatistics":
                (kernels.ApiGetAcceleratorQuotaStatisticsRequest, self._quota_statistics),
            "competitions.CompetitionApiService/GetCompetition":
                (comps.ApiGetCompetitionRequest, self._get_competition),
            "competitions.CompetitionApiService/CreateCodeSubmission":
                (comps.ApiCreateCodeSubmissionRequest, self._submit),
            "competitions.CompetitionApiService/ListSubmissions":
                (comps.ApiListSubmissionsRequest, self._list_submissions),
            "competitions.CompetitionApiService/GetSubmissionLimits":
                (comps.ApiGetSubmissionLimitsRequest, self._limits),
            "competitions.CompetitionApiService/GetLeaderboard":
                (comps.ApiGetLeaderboardRequest, self._leaderboard),
            "competitions.CompetitionApiService/DownloadLeaderboard":
                (comps.ApiDownloadLeaderboardRequest, self._download_leaderboard),
        }

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "FakeKaggle":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- test helpers -----------------------------------------------------------------------------

    def fail(self, rpc: str, status: int, times: int = 1, message: str = "injected fault",
             retry_after_s: float | None = None, body: dict | None = None) -> None:
        """The next `times` calls of rpc (a Method name, or "GET" for output files) fail."""
        headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else {}
        self.faults.append(Fault(rpc, status, times, message, headers, body))

    def rpc_calls(self, method: str) -> list[dict]:
        return [body for name, body in self.calls if name == method]

    def add_dataset(self, ref: str, files: dict[str, bytes], title: str = "A test dataset",
                    zip_files: bool = False, is_private: bool = False) -> Dataset:
        """Publish `files` (path -> bytes) as the next version of dataset `ref`."""
        dataset = self.datasets.get(ref)
        if dataset is None:
            dataset = self.datasets[ref] = Dataset(ref, title, "CC0-1.0", is_private,
                                                   statuses=["READY"])
        dataset.zip_files = zip_files
        dataset.versions.append(dict(files))
        dataset.created.append(datetime(2022, 8, 1, tzinfo=timezone.utc)
                               + timedelta(days=len(dataset.versions)))
        return dataset

    def download_requests(self, name: str) -> list[dict]:
        """The logged GETs of files whose name ends with `name`."""
        return [d for d in self.downloads if d["path"].endswith("/" + name)]

    def received_files(self) -> dict[str, bytes]:
        """Every completed upload by file name, zip members expanded as name/member."""
        out: dict[str, bytes] = {}
        for blob in self.blobs.values():
            out[blob.name] = bytes(blob.data)
            if blob.name.endswith(".zip") and blob.complete:
                with zipfile.ZipFile(io.BytesIO(bytes(blob.data))) as z:
                    for member in z.namelist():
                        out[f"{blob.name}/{member}"] = z.read(member)
        return out

    # -- dispatch ---------------------------------------------------------------------------------

    def handle_rpc(self, name: str, raw: bytes, auth: str | None) -> tuple[int, dict, bytes]:
        method = name.rsplit("/", 1)[-1]
        with self._lock:
            self.raw_bodies.append(raw)
            try:
                body = json.loads(raw or b"{}")
            except json.JSONDecodeError:
                body = None
            self.calls.append((method, body))
            try:
                expected = base64.b64encode(f"{self.username}:{self.key}".encode()).decode()
                if auth != "Basic " + expected:
                    raise ApiError(401, "Unauthenticated")
                for fault in self.faults:
                    if fault.rpc == method and fault.times > 0:
                        fault.times -= 1
                        raise ApiError(fault.status, fault.message, fault.headers, fault.body)
                if name not in self._handlers:
                    raise ApiError(404, f"no such RPC {name}")
                if body is None:
                    raise ApiError(400, f"{method}: body is not JSON")
                request_type, handler = self._handlers[name]
                check_keys(request_type, body, method)
                result = handler(request_type.from_dict(body), body)
            except ApiError as e:
                payload = json.dumps(e.body if e.body is not None else
                                     {"code": e.status, "message": e.message}).encode()
                return e.status, {"Content-Type": "application/json", **e.headers}, payload
        if isinstance(result, Redirect):
            return 302, {"Location": str(result)}, b""
        if isinstance(result, bytes):
            return 200, {"Content-Type": "application/zip"}, result
        return 200, {"Content-Type": "application/json"}, json.dumps(result).encode()

    def handle_put(self, token: str, headers: Any, body: bytes) -> tuple[int, dict]:
        with self._lock:
            self.raw_bodies.append(body)
            self.calls.append(("PUT", {"token": token,
                                       "content_range": headers.get("Content-Range")}))
            blob = self.blobs.get(token)
            if blob is None:
                return 404, {}
            content_range = headers.get("Content-Range") or ""
            if content_range.startswith("bytes */"):  # "how much did you get?"
                if blob.complete:
                    return 200, {}
                return 308, ({"Range": f"bytes=0-{len(blob.data) - 1}"} if blob.data else {})
            start = int(content_range.split()[1].split("-")[0]) if content_range else 0
            if start != len(blob.data) and start != 0:
                return 400, {}
            if self.upload_break and len(body) > 1:
                self.upload_break, mode = None, self.upload_break
                blob.data[start:] = body[: len(body) // 2]  # only half of it arrived
                return (503, {}) if mode == "503" else (-1, {})
            blob.data[start:] = body
            return (200 if blob.complete else 308), {}

    # -- RPC handlers -----------------------------------------------------------------------------

    def _owner_check(self, owner: str, what: str) -> None:
        if owner != self.username:
            raise ApiError(403, f"{what}: {self.username} may not write as {owner}")

    def _dataset_status(self, req: Any, raw: dict) -> dict:
        dataset = self.datasets.get(f"{req.owner_slug}/{req.dataset_slug}")
        if dataset is None:
            raise ApiError(404, "Dataset not found")
        if dataset.stale_polls > 0:
            return {"status": "READY"}  # the previous version's
        status = dataset.statuses.pop(0) if len(dataset.statuses) > 1 else dataset.statuses[0]
        return {"status": status}

    def _files(self, files: list, what: str) -> dict[str, bytes]:
        out = {}
        for f in files:
            blob = self.blobs.get(f.token)
            if blob is None or not blob.complete:
                raise ApiError(400, f"{what}: blob {f.token!r} is unknown or incomplete")
            out[blob.name] = bytes(blob.data)
        if not out:
            raise ApiError(400, f"{what}: no files")
        return out

    def _new_statuses(self) -> list[str]:
        return ["BLOBS_RECEIVED"] * self.ready_after_polls + ["READY"]

    def _create_dataset(self, req: Any, raw: dict) -> dict:
        ref = f"{req.owner_slug}/{req.slug}"
        self._owner_check(req.owner_slug, "CreateDataset")
        if not req.title or not req.license_name:
            raise ApiError(400, "CreateDataset: title and licenseName are required")
        if ref in self.datasets:
            raise ApiError(409, f"The dataset slug {req.slug!r} is already in use")
        dataset = Dataset(ref, req.title, req.license_name, req.is_private)
        dataset.versions.append(self._files(req.files, "CreateDataset"))
        dataset.created.append(datetime.now(timezone.utc))
        dataset.statuses = self._new_statuses()
        self.datasets[ref] = dataset
        return {"ref": ref, "url": f"https://www.kaggle.com/datasets/{ref}", "status": "Ok"}

    def _create_version(self, req: Any, raw: dict) -> dict:
        ref = f"{req.owner_slug}/{req.dataset_slug}"
        self._owner_check(req.owner_slug, "CreateDatasetVersion")
        if ref not in self.datasets:
            raise ApiError(404, "Dataset not found")
        if req.body is None or not req.body.version_notes:
            raise ApiError(400, "CreateDatasetVersion: versionNotes are required")
        dataset = self.datasets[ref]
        dataset.versions.append(self._files(req.body.files, "CreateDatasetVersion"))
        dataset.created.append(datetime.now(timezone.utc))
        dataset.statuses = self._new_statuses()
        dataset.stale_polls = self.stale_version_polls
        return {"ref": ref, "url": f"https://www.kaggle.com/datasets/{ref}", "status": "Ok"}

    def _readable_dataset(self, owner: str, slug: str) -> Dataset:
        dataset = self.datasets.get(f"{owner}/{slug}")
        if (dataset is None or (dataset.is_private and owner != self.username)
                or not dataset.versions):
            raise ApiError(404, f"Dataset {owner}/{slug} not found")
        return dataset

    def _version(self, dataset: Dataset, number: int | None) -> int:
        if number is None:
            return len(dataset.versions)
        if not 1 <= number <= len(dataset.versions):
            raise ApiError(404, f"Dataset {dataset.ref} has no version {number}")
        return number

    def _get_dataset(self, req: Any, raw: dict) -> dict:
        dataset = self._readable_dataset(req.owner_slug, req.dataset_slug)
        files = dataset.versions[-1]
        current = len(dataset.versions)
        if dataset.stale_polls > 0:
            dataset.stale_polls -= 1
            current -= 1
        return {"ref": dataset.ref, "title": dataset.title, "licenseName": dataset.license_name,
                "isPrivate": dataset.is_private, "currentVersionNumber": current,
                "totalBytes": sum(len(b) for b in files.values()),
                "lastUpdated": iso(dataset.created[-1]),
                "url": f"https://www.kaggle.com/datasets/{dataset.ref}"}

    def _list_dataset_files(self, req: Any, raw: dict) -> dict:
        dataset = self._readable_dataset(req.owner_slug, req.dataset_slug)
        version = self._version(dataset, req.dataset_version_number)
        names = sorted(dataset.versions[version - 1])
        start, size = int(req.page_token or 0), req.page_size or 20
        page = [{"ref": name, "name": name, "datasetRef": dataset.ref,
                 "totalBytes": len(dataset.versions[version - 1][name]),
                 "creationDate": iso(dataset.created[version - 1])}
                for name in names[start:start + size]]
        more = start + size < len(names)
        return {"datasetFiles": page, **({"nextPageToken": str(start + size)} if more else {})}

    def _download_dataset(self, req: Any, raw: dict) -> Redirect:
        dataset = self._readable_dataset(req.owner_slug, req.dataset_slug)
        version = self._version(dataset, req.dataset_version_number)
        base = f"{self.url}/files/{dataset.ref}/{version}"
        if not req.file_name:
            return Redirect(f"{base}/archive/{quote(req.dataset_slug)}.zip")
        if req.file_name not in dataset.versions[version - 1]:
            raise ApiError(404, f"Dataset {dataset.ref} has no file {req.file_name!r}")
        if dataset.zip_files:
            return Redirect(f"{base}/zipped/{quote(req.file_name)}.zip")
        return Redirect(f"{base}/file/{quote(req.file_name)}")

    def file_object(self, path: str) -> tuple[bytes, datetime] | None:
        """What GET /files/{owner}/{slug}/{version}/{file|zipped|archive}/{name} serves."""
        match = re.fullmatch(r"/files/([^/]+/[^/]+)/(\d+)/(file|zipped|archive)/(.+)", path)
        dataset = self.datasets.get(match.group(1)) if match else None
        if dataset is None or not 1 <= int(match.group(2)) <= len(dataset.versions):
            return None
        version, kind, name = int(match.group(2)), match.group(3), match.group(4)
        files, created = dataset.versions[version - 1], dataset.created[version - 1]
        if kind == "file":
            return (files[name], created) if name in files else None
        members = files if kind == "archive" else {name[:-4]: files.get(name[:-4])}
        if None in members.values():
            return None
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
            for member, data in sorted(members.items()):  # fixed dates: the same bytes each time
                z.writestr(zipfile.ZipInfo(member, (2022, 8, 1, 0, 0, 0)), data)
        return buffer.getvalue(), created

    def _start_blob(self, req: Any, raw: dict) -> dict:
        if req.type.name != "DATASET" or not req.name or req.content_length <= 0:
            raise ApiError(400, "StartBlobUpload: type DATASET, a name and a length are required")
        token = f"blob{len(self.blobs):04d}"
        self.blobs[token] = Blob(req.name, req.content_length)
        return {"token": token, "createUrl": f"{self.url}/upload/{token}"}
