"""`data fetch`: download the Kaggle datasets a config names, unpack, verify and record them.

Dataset owner/slug lands in `<dest>/<slug>/`, the folder Kaggle mounts under /kaggle/input, so a
config's source locations resolve the same way locally (`data.root=<dest>`) and on Kaggle.

Per dataset:
1. GetDataset (its current version) and ListDatasetFiles of that version. A dataset whose files
   fit in one listing page (TFRecord shards) is downloaded file by file, so a complete file is
   skipped; a bigger one (image folders) as one archive of the version.
2. Downloads go through the official client's `download_file`, which resumes a partial file with a
   Range request when the server answers `Accept-Ranges: bytes` and the partial's ETag marker
   (`<file>.kaggle-partial`) still matches. A finished file is checked against the server's
   `x-goog-hash` (crc32c, else md5) where given; zips are unpacked (members with absolute paths,
   `..` or links are refused) and deleted. Each finished file is recorded in STATE.
3. Every source is verified: the CRC of every record, decoding of every image (or a sampled
   share), labels inside the range a motono-style name promises (`label-A-B`) and below the
   config's num_classes.
4. Only then MANIFEST is written; its presence marks the dataset complete. A failed check deletes
   the files at fault (the next fetch downloads them again) and leaves no manifest.
A second fetch of an unchanged dataset makes the two listing calls and downloads nothing.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import stat
import sys
import warnings
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

import google_crc32c
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from guie.config import DataSource, from_dict
from guie.data.dataset import MAX_IMAGE_PIXELS
from guie.data.sources import load_source
from guie.data.tfrecord import IMAGE_KEY, DataError, DataWarning, index_shard, parse_example

MANIFEST = "guie-manifest.json"
STATE = ".guie-fetch-state.json"
FORMAT = "guie-data-manifest/1"
PAGE_SIZE = 200  # more files than one page: download the version as one archive
ARCHIVE_KEY = "*"  # the state's key for a whole-version archive
_RECORD_HEADER_BYTES = 12  # uint64 length + its CRC before each record's payload
_TFRECORD_SUFFIXES = (".tfrec", ".tfrecord", ".tfrecords")
_LABEL_RANGE = re.compile(r"label-(\d+)-(\d+)")
_FILES_PER_TASK = 256  # image files per verification task (CSV sources)
_LISTED_PROBLEMS = 20


class VerificationError(DataError):
    """Damaged data; `files` are the downloaded files at fault (deleted so they are fetched again)."""

    def __init__(self, message: str, files: set[str]):
        super().__init__(message)
        self.files = files


@dataclass(frozen=True)
class DatasetRef:
    owner: str
    slug: str
    version: int | None = None  # None: the current version

    @property
    def ref(self) -> str:
        return f"{self.owner}/{self.slug}"

    @classmethod
    def parse(cls, text: str) -> "DatasetRef":
        parts = text.strip("/").split("/")
        if len(parts) not in (2, 3) or not all(parts) or (len(parts) == 3 and not parts[2].isdigit()):
            raise ValueError(f"{text!r}: expected a Kaggle dataset as owner/slug or owner/slug/VERSION")
        return cls(parts[0], parts[1], int(parts[2]) if len(parts) == 3 else None)


@dataclass(frozen=True)
class FetchOptions:
    dest: Path = Path("data")
    image_fraction: float = 1.0  # share of images decoded: 1 all, 0 none
    workers: int = 1  # verification processes
    max_corrupt_records: int = 0  # corrupt records/images accepted per source (listed in the manifest)
    reverify: bool = False  # verify again even when the manifest says the dataset is complete
    num_classes: int = 0  # > 0: every label plus its source's offset must lie below it
    progress: bool = True


@dataclass
class FetchResult:
    ref: str
    folder: Path
    manifest: dict
    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    verified: bool = False  # False: already complete, not verified again


# ----------------------------------------------------------------------------- planning


def plan(sources) -> tuple[list[tuple[DatasetRef, tuple[DataSource, ...]]], list[str]]:
    """Group a config's sources by Kaggle dataset, in order; also the names of sources that
    name none. Each source must live inside its dataset's folder (location `<slug>/...`)."""
    groups: dict[DatasetRef, list[DataSource]] = {}
    unfetchable = []
    for src in sources:
        if not src.kaggle_slug:
            unfetchable.append(src.name)
            continue
        dref = DatasetRef.parse(src.kaggle_slug)
        parts = PurePosixPath(src.location).parts
        if Path(src.location).is_absolute() or not parts or parts[0] != dref.slug:
            raise DataError(f"source {src.name!r}: location {src.location!r} is not inside the "
                            f"folder of its dataset; fetched data lands in <dest>/{dref.slug}/, so "
                            f"set location to {dref.slug!r} or '{dref.slug}/...'")
        groups.setdefault(dref, []).append(src)
    return [(d, tuple(s)) for d, s in groups.items()], unfetchable


def expected_label_range(slug: str) -> tuple[int, int] | None:
    """The label range a motono-style dataset name promises (`...-label-1000-10690`)."""
    match = _LABEL_RANGE.search(slug)
    return (int(match.group(1)), int(match.group(2))) if match else None


# ----------------------------------------------------------------------------- Kaggle calls


def _dataset_info(client, dref: DatasetRef):
    from kagglesdk.datasets.types.dataset_api_service import ApiGetDatasetRequest

    def get():
        with client.api.build_kaggle_client() as kaggle:
            request = ApiGetDatasetRequest()
            request.owner_slug, request.dataset_slug = dref.owner, dref.slug
            return kaggle.datasets.dataset_api_client.get_dataset(request)
    return client._read(f"dataset {dref.ref}", get)


def _list_files(client, dref: DatasetRef, version: int | None) -> tuple[list, bool]:
    """(first page of files, whether that page is all of them)."""
    from guie.kaggle.client import KaggleError

    spec = dref.ref + (f"/{version}" if version else "")
    answer = client._read(f"list files of {spec}", lambda: client.api.dataset_list_files(
        spec, page_size=PAGE_SIZE))
    if answer.error_message:
        raise KaggleError(f"list files of {spec}: {answer.error_message}")
    return list(answer.dataset_files or []), not answer.next_page_token


def _download(client, dref: DatasetRef, version: int | None, file_name: str | None,
              folder: Path, progress: bool) -> tuple[Path, dict]:
    """Download one file (or the version's archive) into its place under `folder` with the
    client's resumable `download_file`; returns the path and the response headers."""
    from kagglesdk.datasets.types.dataset_api_service import ApiDownloadDatasetRequest

    from guie.kaggle.client import KaggleError

    what = f"{dref.ref} v{version}: {file_name or 'archive'}"

    def start():
        with client.api.build_kaggle_client() as kaggle:
            request = ApiDownloadDatasetRequest()
            request.owner_slug, request.dataset_slug = dref.owner, dref.slug
            request.dataset_version_number, request.file_name = version, file_name
            return kaggle.datasets.dataset_api_client.download_dataset(request), kaggle.http_client()

    response, http = client._read(f"download {what}", start)
    try:
        # Like the client: the file is named after the storage URL it was redirected to, which
        # ends in ".zip" where Kaggle serves a file compressed.
        name = unquote(PurePosixPath(urlsplit(response.url).path).name)
        if name in ("", ".", "..", MANIFEST, STATE):
            raise KaggleError(f"download {what}: refusing the file name {name!r}")
        parent = folder / _safe_relpath(file_name, what).parent if file_name else folder
        path = parent / name
        headers = dict(response.headers)
        try:
            with contextlib.redirect_stdout(sys.stderr):  # the client prints its progress
                client.api.download_file(response, str(path), http, quiet=not progress,
                                         resume=True)
        except (OSError, ValueError) as e:  # requests' and urllib3's errors are OSErrors
            raise KaggleError(f"download {what}: {e}. The partial file {path} is kept: run the "
                              "same command again to resume it") from e
    finally:
        response.close()
    return path, headers


# ----------------------------------------------------------------------------- files


def _safe_relpath(name: str, where: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if (not name or "\\" in name or path.is_absolute() or ".." in path.parts
            or re.match(r"^[A-Za-z]:", name)):
        raise DataError(f"{where}: unsafe path {name!r} (absolute, or leaving its folder)")
    return path


def _file_hashes(path: Path, want_md5: bool) -> tuple[str, str | None]:
    """(crc32c, md5) of a file, base64 of the big-endian digest as in `x-goog-hash`."""
    crc, md5 = google_crc32c.Checksum(), hashlib.md5() if want_md5 else None
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            crc.update(block)
            if md5 is not None:
                md5.update(block)
    return (base64.b64encode(crc.digest()).decode(),
            base64.b64encode(md5.digest()).decode() if md5 is not None else None)


def _check_download(path: Path, headers: dict, what: str) -> str:
    """Compare with the server's `x-goog-hash` where it gives one; returns the file's crc32c."""
    given = dict(part.strip().split("=", 1) for part in
                 (headers.get("x-goog-hash") or "").split(",") if "=" in part)
    crc, md5 = _file_hashes(path, want_md5="crc32c" not in given and "md5" in given)
    kind, got = ("crc32c", crc) if "crc32c" in given else ("md5", md5)
    if kind in given and given[kind] != got:
        path.unlink()
        raise VerificationError(f"{what}: {path} does not match the server's {kind} ({got} != "
                                f"{given[kind]}); deleted it: run the same command again", set())
    return crc


def safe_extract(archive: Path, into: Path) -> dict[str, int]:
    """Unpack a zip into `into`; {member path: bytes}. Refuses absolute paths, `..`, links and
    archives bigger than the free disk; a damaged archive is a DataError and leaves nothing."""
    written: list[Path] = []
    try:
        with zipfile.ZipFile(archive) as z:
            infos = [i for i in z.infolist() if not i.is_dir()]
            for info in infos:
                _safe_relpath(info.filename, f"archive {archive}")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise DataError(f"archive {archive}: member {info.filename!r} is a link")
            need = sum(i.file_size for i in infos)
            if need > shutil.disk_usage(into).free:
                raise DataError(f"archive {archive}: unpacking needs {format_bytes(need)} but "
                                f"{into} has {format_bytes(shutil.disk_usage(into).free)} free")
            for info in infos:
                target = into / info.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                written.append(target)
                with z.open(info) as src, open(target, "wb") as out:  # checks the member's CRC
                    shutil.copyfileobj(src, out, 1 << 20)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        for path in written:
            path.unlink(missing_ok=True)
        raise DataError(f"corrupt archive {archive}: {e}") from None
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return {i.filename: i.file_size for i in infos}


def _members_complete(folder: Path, record: dict) -> bool:
    return all((folder / m).is_file() and (folder / m).stat().st_size == n
               for m, n in record.get("members", {}).items())


def _delete_members(folder: Path, record: dict) -> None:
    for member in record.get("members", {}):
        (folder / member).unlink(missing_ok=True)


def load_manifest(folder: str | Path) -> dict | None:
    return _load_json(Path(folder) / MANIFEST)


def _load_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _save_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: a reader never sees half a manifest


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def manifest_sources(root: str | Path) -> tuple[DataSource, ...]:
    """The sources recorded by the manifests under `root` (locations relative to it)."""
    sources = []
    for path in sorted(Path(root).glob(f"*/{MANIFEST}")):
        manifest = _load_json(path) or {}
        sources += [from_dict(DataSource, s["source"]) for s in manifest.get("sources", [])]
    return tuple(sources)


def detect_sources(folder: Path, dref: DatasetRef) -> tuple[DataSource, ...]:
    """Sources in a dataset fetched by name: its TFRecord shards, and each CSV with path,label."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    found = []
    shards = [p for p in files if p.suffix in _TFRECORD_SUFFIXES]
    if shards:
        suffix = max(_TFRECORD_SUFFIXES, key=lambda s: sum(p.suffix == s for p in shards))
        train = any(fnmatch(p.name, f"*-train-*{suffix}") for p in shards)
        found.append(DataSource(dref.slug, "tfrecord", dref.slug, pattern=(
            f"*-train-*{suffix}" if train else f"*{suffix}"), kaggle_slug=dref.ref))
    for csv in (p for p in files if p.suffix == ".csv"):
        with open(csv, encoding="utf-8", errors="replace") as f:
            header = {c.strip() for c in f.readline().split(",")}
        if {"path", "label"} <= header:
            found.append(DataSource(f"{dref.slug}-{csv.stem}" if found else dref.slug, "csv",
                                    csv.relative_to(folder.parent).as_posix(), kaggle_slug=dref.ref))
    if not found:
        raise DataError(f"{dref.ref}: no TFRecord shards ({', '.join(_TFRECORD_SUFFIXES)}) and no "
                        f"CSV with path,label columns in {folder}; describe its data as a "
                        "DataSource in a config to verify and train on it")
    return tuple(found)


# ----------------------------------------------------------------------------- verification


def _check_image(data: bytes, where: str) -> None:
    """What `guie.data.dataset.decode_rgb` checks, decoding JPEGs at 1/8 scale: every
    entropy-coded byte is still read (a truncated or damaged stream fails) at a fraction of
    the cost of a full decode."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise DataError(f"{where}: image of {img.width}x{img.height} pixels exceeds "
                                    f"the {MAX_IMAGE_PIXELS}-pixel limit")
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise DataError(f"{where}: cannot decode image: {e}") from None


def _sample(n: int, fraction: float, key: str) -> np.ndarray:
    if fraction >= 1:
        return np.arange(n)
    rng = np.random.default_rng(zlib.crc32(key.encode()))  # the same sample on every run
    return np.sort(rng.permutation(n)[:int(np.ceil(n * max(fraction, 0.0)))])


def _check_shard(path: str, fraction: float) -> dict:
    """Index a shard from scratch (every record's CRCs) and decode its images."""
    out = {"files": [path], "bytes": os.path.getsize(path), "labels": np.empty(0, np.int64),
           "corrupt": [], "checked": 0, "error": None}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DataWarning)
            # no index cache: a sidecar could stand for an earlier copy of this file
            index = index_shard(path, verify_crc=True, use_cache=False)
    except DataError as e:
        out["error"] = str(e)
        return out
    out["corrupt"] = [(path, str(w.message)) for w in caught if issubclass(w.category, DataWarning)]
    out["labels"] = index.labels
    chosen = _sample(len(index), fraction, path)
    with open(path, "rb") as f:
        for i in chosen:
            offset = int(index.offsets[i])
            where = f"{path}: record at byte offset {offset - _RECORD_HEADER_BYTES}"
            try:
                f.seek(offset)
                image = parse_example(f.read(int(index.lengths[i])), [IMAGE_KEY]).get(IMAGE_KEY)
                if not image:
                    raise DataError(f"{where}: no {IMAGE_KEY!r}")
                _check_image(image[0], where)
            except DataError as e:
                out["corrupt"].append((path, str(e) if path in str(e) else f"{where}: {e}"))
    out["checked"] = len(chosen)
    return out


def _check_files(paths: list[str], fraction: float) -> dict:
    out = {"files": [], "bytes": sum(os.path.getsize(p) for p in paths), "corrupt": [],
           "checked": 0, "error": None}
    chosen = _sample(len(paths), fraction, paths[0] if paths else "")
    for i in chosen:
        try:
            _check_image(Path(paths[i]).read_bytes(), paths[i])
        except (DataError, OSError) as e:
            out["corrupt"].append((paths[i], str(e)))
    out["checked"] = len(chosen)
    return out


def _run(tasks: list, workers: int, total_bytes: int | None, desc: str, progress: bool) -> list[dict]:
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc,
               disable=None if progress else True)
    results = []
    if workers <= 1 or len(tasks) <= 1:
        for fn, *args in tasks:
            results.append(fn(*args))
            bar.update(results[-1]["bytes"])
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for future in as_completed([pool.submit(fn, *args) for fn, *args in tasks]):
                results.append(future.result())
                bar.update(results[-1]["bytes"])
    bar.close()
    return results


def verify_source(src: DataSource, root: str | Path, image_fraction: float = 1.0,
                  workers: int = 1, max_corrupt_records: int = 0, num_classes: int = 0,
                  expected_range: tuple[int, int] | None = None, progress: bool = True) -> dict:
    """Check every record (CRCs), images (all, or a seeded share) and the label range of one
    source; a summary for the manifest. VerificationError names the damaged files."""
    location = (Path(root) / src.location).absolute()
    if src.kind == "tfrecord":
        shards = sorted(p for p in location.rglob(src.pattern) if p.is_file()
                        ) if location.is_dir() else []
        if not shards:
            raise DataError(f"source {src.name!r}: no shards match {src.pattern!r} under {location}")
        tasks = [(_check_shard, str(p), image_fraction) for p in shards]
        labels = None
    else:
        table = load_source(src, root, verify_crc=False)  # every row's path exists, labels parse
        paths = table["path"].tolist()
        tasks = [(_check_files, paths[i:i + _FILES_PER_TASK], image_fraction)
                 for i in range(0, len(paths), _FILES_PER_TASK)]
        labels = table["label"].to_numpy(np.int64) - src.label_offset
    total = sum(os.path.getsize(t[1]) for t in tasks) if labels is None else None
    results = sorted(_run(tasks, workers, total, f"verify {src.name}", progress),
                     key=lambda r: r["files"][:1])
    errors = [r for r in results if r["error"]]
    if errors:
        raise VerificationError("; ".join(r["error"] for r in errors[:5]),
                                {f for r in errors for f in r["files"]})
    if labels is None:
        labels = np.concatenate([r["labels"] for r in results])
    corrupt = [c for r in results for c in r["corrupt"]]
    if len(corrupt) > max_corrupt_records:
        raise VerificationError(
            f"source {src.name!r}: {len(corrupt)} corrupt record(s) or image(s), more than the "
            f"{max_corrupt_records} accepted (--max-corrupt N accepts them): "
            + "; ".join(msg for _, msg in corrupt[:5]), {f for f, _ in corrupt})
    _check_labels(src, labels, expected_range, num_classes)
    report = {
        "source": asdict(src),
        "records": int(len(labels)),
        "classes": int(np.unique(labels).size),
        "label_min": int(labels.min()) + src.label_offset,
        "label_max": int(labels.max()) + src.label_offset,
        "expected_label_range": list(expected_range) if expected_range else None,
        "bytes": int(sum(r["bytes"] for r in results)) + (
            location.stat().st_size if src.kind == "csv" else 0),
        "corrupt_records": len(corrupt),
        "corrupt": [msg for _, msg in corrupt[:_LISTED_PROBLEMS]],
        "images_checked": int(sum(r["checked"] for r in results)),
        "image_fraction": image_fraction,
    }
    if src.kind == "tfrecord":
        report["shards"] = [{"file": Path(r["files"][0]).relative_to(Path(root).absolute()).as_posix(),
                             "bytes": r["bytes"], "records": int(len(r["labels"])),
                             "corrupt_records": len(r["corrupt"])} for r in results]
    return report


def _check_labels(src: DataSource, labels: np.ndarray, expected: tuple[int, int] | None,
                  num_classes: int) -> None:
    if not len(labels):
        raise DataError(f"source {src.name!r}: no records")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise DataError(f"source {src.name!r}: negative labels (down to {lo})")
    if expected and (lo < expected[0] or hi > expected[1]):
        outside = int(((labels < expected[0]) | (labels > expected[1])).sum())
        raise DataError(f"source {src.name!r}: {outside} record(s) have labels outside "
                        f"{expected[0]}..{expected[1]}, the range its dataset's name promises "
                        f"(found {lo}..{hi}): a different or damaged dataset?")
    top = hi + src.label_offset
    if num_classes and top >= num_classes:
        raise DataError(f"source {src.name!r}: label {hi} + label_offset {src.label_offset} = "
                        f"{top} is not below the config's num_classes {num_classes}")


# ----------------------------------------------------------------------------- fetching


def fetch_dataset(client, dref: DatasetRef, sources: tuple[DataSource, ...] = (),
                  options: FetchOptions = FetchOptions()) -> FetchResult:
    """Download what is missing of one dataset, verify it and write its manifest (see the
    module doc). `sources`: what the config says it holds; empty: detected after download."""
    log = (lambda msg: print(msg, file=sys.stderr)) if options.progress else (lambda msg: None)
    folder = Path(options.dest) / dref.slug
    folder.mkdir(parents=True, exist_ok=True)
    info = _dataset_info(client, dref)
    version = dref.version or info.current_version_number
    listing, whole = _list_files(client, dref, version)
    if whole and not listing:
        raise DataError(f"{dref.ref} v{version}: the dataset has no files")
    wanted = ({_safe_relpath(f.name, dref.ref).as_posix(): f.total_bytes for f in listing}
              if whole else {ARCHIVE_KEY: info.total_bytes or 0})
    manifest = load_manifest(folder)
    state = _load_json(folder / STATE) or {"ref": dref.ref, "files": (manifest or {}).get("files", {})}
    records = state["files"] if state.get("ref") == dref.ref else {}
    state = {"ref": dref.ref, "files": records}
    for key in list(records):  # another version, a file gone, or damaged on disk
        record = records[key]
        if (record.get("version") != version or record.get("remote_bytes") != wanted.get(key)
                or not _members_complete(folder, record)):
            _delete_members(folder, records.pop(key))
    todo = [key for key in wanted if key not in records]
    same_sources = not sources or [s["source"] for s in (manifest or {}).get("sources", [])] == [
        asdict(s) for s in sources]
    if (not todo and not options.reverify and manifest and manifest.get("files") == records
            and manifest["kaggle"].get("version") == version and same_sources):
        log(f"{dref.ref} v{version}: complete, verified {manifest['verified_at']}")
        return FetchResult(dref.ref, folder, manifest, skipped=list(wanted))

    (folder / MANIFEST).unlink(missing_ok=True)  # from here on the dataset is not complete
    # archive mode holds the archive and its contents at once
    need = sum(wanted[k] for k in todo) * (1 if whole else 2)
    if need > shutil.disk_usage(folder).free:
        raise DataError(f"{dref.ref} v{version}: needs {format_bytes(need)} of disk but {folder} "
                        f"has {format_bytes(shutil.disk_usage(folder).free)} free")
    if todo:
        log(f"{dref.ref} v{version}: downloading {len(todo)} of {len(wanted)} file(s), "
            f"{format_bytes(sum(wanted[k] for k in todo))}, into {folder}")
    for key in todo:
        path, headers = _download(client, dref, version, None if key == ARCHIVE_KEY else key,
                                  folder, options.progress)
        crc = _check_download(path, headers, f"{dref.ref} v{version}: {key}")
        os.utime(path)  # a fresh mtime: cached shard indexes of an earlier copy no longer match
        record = {"version": version, "remote_bytes": wanted[key],
                  "download": path.relative_to(folder).as_posix(),
                  "download_bytes": path.stat().st_size, "crc32c": crc,
                  "etag": headers.get("ETag")}
        if path.suffix == ".zip":
            try:
                members = safe_extract(path, path.parent)
            finally:
                path.unlink()  # unpacked, or damaged: either way not kept
            base = path.parent.relative_to(folder)
            record["members"] = {(base / m).as_posix(): n for m, n in members.items()}
        else:
            record["members"] = {record["download"]: record["download_bytes"]}
        records[key] = record
        _save_json(folder / STATE, state)

    sources = sources or detect_sources(folder, dref)
    try:
        reports = [verify_source(src, options.dest, options.image_fraction, options.workers,
                                 options.max_corrupt_records, options.num_classes,
                                 expected_label_range(dref.slug), options.progress)
                   for src in sources]
    except VerificationError as e:
        at_fault = {Path(f).resolve() for f in e.files}
        for key in [k for k, r in records.items()
                    if any((folder / m).resolve() in at_fault for m in r["members"])]:
            _delete_members(folder, records.pop(key))
        _save_json(folder / STATE, state)
        raise
    manifest = {
        "format": FORMAT,
        "kaggle": {"ref": dref.ref, "owner": dref.owner, "slug": dref.slug, "version": version,
                   "title": info.title, "license": info.license_name,
                   "url": f"https://www.kaggle.com/datasets/{dref.ref}"},
        "folder": dref.slug,
        "mode": "per-file" if whole else "archive",
        "bytes": sum(n for r in records.values() for n in r["members"].values()),
        "files": records,
        "sources": reports,
        "records": sum(r["records"] for r in reports),
        "corrupt_records": sum(r["corrupt_records"] for r in reports),
        "verified_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _save_json(folder / MANIFEST, manifest)
    return FetchResult(dref.ref, folder, manifest, downloaded=todo,
                       skipped=[k for k in wanted if k not in todo], verified=True)
