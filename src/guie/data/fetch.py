"""`data fetch`: download the Kaggle datasets a config names, unpack, verify and record them.

Dataset owner/slug lands in `<dest>/<slug>/`, the folder Kaggle mounts under /kaggle/input, so a
config's source locations resolve the same way locally (`data.root=<dest>`) and on Kaggle.

Per dataset:
1. GetDataset (its current version) and ListDatasetFiles of that version, through the host
   (`guie.data.remote.DatasetHost`: the Kaggle client). A dataset whose files fit in one listing
   page (TFRecord shards) is downloaded file by file, so a complete file is skipped; a bigger one
   (image folders) as one archive of the version.
2. The host resumes a partial download (the official client's `download_file`: a Range request
   while the partial's ETag marker still matches). A finished file is checked against the server's
   `x-goog-hash` (crc32c, else md5) where given; zips are unpacked (members with absolute paths,
   `..` or links are refused) and deleted. Each finished file is recorded in STATE.
3. Every source is verified (guie.data.verify): the CRC of every record, decoding of every image
   (or a sampled share), labels inside the range a motono-style name promises (`label-A-B`) and
   below the config's num_classes.
4. Only then MANIFEST is written; its presence marks the dataset complete. A failed check deletes
   the files at fault (the next fetch downloads them again) and leaves no manifest.
A second fetch of an unchanged dataset makes the two listing calls and downloads nothing.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

import google_crc32c

from guie.config import DataSource
from guie.config_io import from_dict
from guie.data.errors import DataError
from guie.data.remote import DatasetHost
from guie.data.verify import VerificationError, expected_label_range, verify_source
from guie.errors import UserValueError

MANIFEST = "guie-manifest.json"
STATE = ".guie-fetch-state.json"
FORMAT = "guie-data-manifest/1"
PAGE_SIZE = 200  # more files than one page: download the version as one archive
ARCHIVE_KEY = "*"  # the state's key for a whole-version archive
_TFRECORD_SUFFIXES = (".tfrec", ".tfrecord", ".tfrecords")


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
        if (len(parts) not in (2, 3) or not all(parts)
                or (len(parts) == 3 and not parts[2].isdigit())):
            raise UserValueError(f"{text!r}: expected a Kaggle dataset as owner/slug or "
                                 "owner/slug/VERSION")
        return cls(parts[0], parts[1], int(parts[2]) if len(parts) == 3 else None)


@dataclass(frozen=True)
class FetchOptions:
    dest: Path = Path("data")
    image_fraction: float = 1.0  # share of images decoded: 1 all, 0 none
    workers: int = 1  # verification processes
    # corrupt records/images accepted per source (listed in the manifest)
    max_corrupt_records: int = 0
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
                                    csv.relative_to(folder.parent).as_posix(),
                                    kaggle_slug=dref.ref))
    if not found:
        raise DataError(f"{dref.ref}: no TFRecord shards ({', '.join(_TFRECORD_SUFFIXES)}) and no "
                        f"CSV with path,label columns in {folder}; describe its data as a "
                        "DataSource in a config to verify and train on it")
    return tuple(found)


# ----------------------------------------------------------------------------- fetching


def fetch_dataset(client: DatasetHost, dref: DatasetRef, sources: tuple[DataSource, ...] = (),
                  options: FetchOptions = FetchOptions()) -> FetchResult:
    """Download what is missing of one dataset, verify it and write its manifest (see the
    module doc). `sources`: what the config says it holds; empty: detected after download."""
    log = (lambda msg: print(msg, file=sys.stderr)) if options.progress else (lambda msg: None)
    folder = Path(options.dest) / dref.slug
    folder.mkdir(parents=True, exist_ok=True)
    info = client.dataset_info(dref.ref)
    version = dref.version or info.current_version
    listing, whole = client.dataset_files(dref.ref, version, PAGE_SIZE)
    if whole and not listing:
        raise DataError(f"{dref.ref} v{version}: the dataset has no files")
    wanted = ({_safe_relpath(f.name, dref.ref).as_posix(): f.total_bytes for f in listing}
              if whole else {ARCHIVE_KEY: info.total_bytes or 0})
    manifest = load_manifest(folder)
    state = (_load_json(folder / STATE)
             or {"ref": dref.ref, "files": (manifest or {}).get("files", {})})
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
        file_name = None if key == ARCHIVE_KEY else key
        into = folder / PurePosixPath(key).parent if file_name else folder  # a safe path: listed
        path, headers = client.download_dataset_file(dref.ref, version, file_name, into,
                                                     (MANIFEST, STATE), options.progress)
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
