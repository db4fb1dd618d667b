"""Pack what the Kaggle kernels need into dataset folders, and check it again on Kaggle.

Two datasets: the `guie` package source (only .py files and package data; no tests, caches,
build outputs or secrets) and a wheels dataset with what Kaggle's image lacks (open_clip and its
pure-Python needs), since the inference kernel runs offline. A content hash of the packed
source is injected into each notebook, which refuses to run against another version: Kaggle
mounts whatever version of a dataset is current, not the one the notebook was built with.

Each dataset also holds a marker file at its root (`guie.kaggle.inputs`), by which the kernels
find it whatever layout Kaggle mounts it in.

This module runs on Kaggle too (`verify_source_hash`, `install_wheels`): standard library only.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from guie.errors import UserError
from guie.kaggle.inputs import SOURCE_MARKER, WHEELS_MARKER

OWNER_PLACEHOLDER = "KAGGLE_USERNAME"  # in datasets-metadata/*: replaced by the user's name
PACKAGE_FILE_SUFFIXES = (".py", ".json")  # code and package data (model_configs/*.json)
EXCLUDED_DIR_NAMES = frozenset({
    "__pycache__", "tests", "test", ".ipynb_checkpoints", ".pytest_cache", ".mypy_cache",
    "build", "dist", ".git"})
SECRET_FILE_NAMES = frozenset({"kaggle.json", "access_token", "access_token.txt",
                               "credentials.json"})
# What the offline kernels import that Kaggle's image lacks; pure-Python wheels only, pinned to
# the versions this kit is tested with. ftfy's own need, wcwidth, ships with Kaggle's IPython.
WHEEL_REQUIREMENTS = ("open_clip_torch==3.3.0", "ftfy==6.3.1")
# Installed with --no-deps, so the kernel checks what they need itself, before training.
CHECKED_DISTRIBUTIONS = ("open_clip_torch", "ftfy")
_CHUNK_BYTES = 8 << 20


class PackagingError(UserError, RuntimeError):
    pass


class SecretLeakError(PackagingError):
    pass


class SourceMismatchError(RuntimeError):
    pass


@dataclass(frozen=True)
class PackedDataset:
    folder: Path  # the folder to upload: dataset-metadata.json next to the payload
    ref: str  # owner/slug
    files: tuple[tuple[str, int], ...]  # (path relative to folder, bytes), metadata excluded
    content_hash: str


# ----------------------------------------------------------------------------- source


def _selected(rel: str) -> bool:
    parts = rel.split("/")
    return (not any(p in EXCLUDED_DIR_NAMES or p.endswith(".egg-info") for p in parts[:-1])
            and parts[-1].endswith(PACKAGE_FILE_SUFFIXES) and not parts[-1].startswith("."))


def _zip_root(path: Path) -> tuple[Path, str] | None:
    """(archive, inner prefix) when path lies inside a zip file (zipimport on Kaggle)."""
    for parent in path.parents:
        if parent.is_file() and zipfile.is_zipfile(parent):
            return parent, path.relative_to(parent).as_posix()
    return None


def package_tree(package_dir: str | Path) -> dict[str, bytes]:
    """The package's selected files as {posix relative path: bytes}, from a folder or a zip."""
    package_dir = Path(package_dir)
    if package_dir.is_dir():
        tree = {}
        for root, dirs, names in os.walk(package_dir):
            dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIR_NAMES)
            for name in names:
                rel = (Path(root) / name).relative_to(package_dir).as_posix()
                if _selected(rel):
                    tree[rel] = (Path(root) / name).read_bytes()
        return tree
    inside = _zip_root(package_dir)
    if inside is None:
        raise PackagingError(f"{package_dir}: no such package folder")
    archive, prefix = inside
    with zipfile.ZipFile(archive) as z:
        return {n[len(prefix) + 1:]: z.read(n) for n in z.namelist()
                if n.startswith(prefix + "/") and not n.endswith("/")
                and _selected(n[len(prefix) + 1:])}


def tree_hash(tree: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for rel in sorted(tree):
        digest.update(f"{rel}\0{len(tree[rel])}\0".encode())
        digest.update(tree[rel])
    return digest.hexdigest()


def source_hash(package_dir: str | Path) -> str:
    return tree_hash(package_tree(package_dir))


def verify_source_hash(package_dir: str | Path, expected_hash: str) -> None:
    """Raise if the mounted package is not the one the notebook was built for."""
    actual = source_hash(package_dir)
    if actual != expected_hash:
        raise SourceMismatchError(
            f"The guie source at {package_dir} has hash {actual[:12]}, but this notebook was built "
            f"for {expected_hash[:12]}. Kaggle attached another version of the source dataset "
            "(it mounts whatever version is current): wait until the dataset version is ready "
            "and run the kernel again, or push again with `submit.py push`.")


def scan_for_secrets(paths: Iterable[Path], secrets: Sequence[str]) -> None:
    """Refuse credential files and any file holding one of the secrets (read in chunks)."""
    needles = [s.encode() for s in secrets if len(s) >= 6]
    overlap = max((len(n) for n in needles), default=1) - 1
    for path in paths:
        if path.name in SECRET_FILE_NAMES:
            raise SecretLeakError(f"{path}: refusing to upload a credentials file")
        tail = b""
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK_BYTES):
                window = tail + chunk
                if any(n in window for n in needles):
                    raise SecretLeakError(f"{path}: contains your Kaggle key or token; "
                                          "not uploading it")
                tail = window[-overlap:] if overlap else b""


def dataset_metadata(template: str | Path, owner: str) -> dict:
    """Read datasets-metadata/<name>/dataset-metadata.json with the owner filled in, and check
    it."""
    meta = json.loads(Path(template).read_text())
    meta["id"] = meta.get("id", "").replace(OWNER_PLACEHOLDER, owner)
    check_dataset_metadata(meta, str(template))
    return meta


def check_dataset_metadata(meta: dict, where: str) -> None:
    owner, _, slug = meta.get("id", "").partition("/")
    problems = []
    if not owner or not slug or "/" in slug or owner == OWNER_PLACEHOLDER:
        problems.append(f"id {meta.get('id')!r} is not owner/slug")
    if not 6 <= len(slug) <= 50 or not re.fullmatch(r"[a-z0-9][a-z0-9-]*", slug):
        problems.append(f"slug {slug!r} must be 6-50 characters of a-z, 0-9 and '-'")
    if not 6 <= len(meta.get("title", "")) <= 50:
        problems.append(f"title {meta.get('title')!r} must be 6-50 characters")
    if len(meta.get("licenses", [])) != 1 or not meta["licenses"][0].get("name"):
        problems.append("exactly one license with a name is required")
    if problems:
        raise PackagingError(f"{where}: " + "; ".join(problems))


def _fresh_folder(dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    return dest


def _write_metadata(folder: Path, meta: dict) -> None:
    (folder / "dataset-metadata.json").write_text(json.dumps(meta, indent=2) + "\n")


def pack_source(package_dir: str | Path, dest: str | Path, metadata_template: str | Path,
                owner: str, secrets: Sequence[str]) -> PackedDataset:
    """Copy the package's selected files to dest/src/<package>/ and write the metadata.

    The folder `src/` is uploaded as one archive (dir_mode zip); whether Kaggle unpacks it to
    src/ or to the dataset root, or keeps src.zip, the notebook's sys.path finds the package.
    """
    package_dir, folder = Path(package_dir), _fresh_folder(Path(dest))
    tree = package_tree(package_dir)
    if "__init__.py" not in tree:
        raise PackagingError(f"{package_dir}: not a package (no __init__.py)")
    scan_for_secrets((package_dir / rel for rel in sorted(tree)), secrets)
    target = folder / "src" / package_dir.name
    for rel, data in tree.items():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_bytes(data)
    meta = dataset_metadata(metadata_template, owner)
    _write_metadata(folder, meta)
    content_hash = tree_hash(tree)
    marker = json.dumps({"kind": "guie-source", "hash": content_hash}, indent=2) + "\n"
    (folder / SOURCE_MARKER).write_text(marker)
    files = (*((f"src/{package_dir.name}/{rel}", len(tree[rel])) for rel in sorted(tree)),
             (SOURCE_MARKER, len(marker)))
    return PackedDataset(folder, meta["id"], files, content_hash)


# ----------------------------------------------------------------------------- wheels


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _wheel_parts(path: Path) -> tuple[str, str, str]:
    """(normalised distribution name, version, python-abi-platform tag) of a wheel file."""
    parts = path.name[:-len(".whl")].split("-")
    if len(parts) not in (5, 6):
        raise PackagingError(f"{path}: not a wheel file name")
    return _norm(parts[0]), parts[1], "-".join(parts[-3:])


def pip_download_command(requirements: Sequence[str], dest: Path, python_version: str) -> list[str]:
    """`pip download` of pure-Python wheels for Kaggle's Python, not for this machine.

    A plain download picks the wheel that fits this machine best, which for a project that
    also ships compiled wheels (wcwidth 0.9.4 has an abi3 one) is not the pure one.
    """
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--platform", "any", "--implementation", "py", "--abi", "none",
            "--python-version", python_version, "--dest", str(dest), *requirements]


def pip_download(requirements: Sequence[str], dest: Path, python_version: str) -> None:
    """Download exactly these wheels, without dependencies (the kernel checks their needs)."""
    done = subprocess.run(pip_download_command(requirements, dest, python_version),
                          capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise PackagingError(f"pip download of {' '.join(requirements)} (pure-Python wheels for "
                             f"Python {python_version}) failed:\n{tail}")


def build_wheels_dataset(dest: str | Path, metadata_template: str | Path, owner: str,
                         secrets: Sequence[str], python_version: str,
                         requirements: Sequence[str] = WHEEL_REQUIREMENTS,
                         download: Callable[[Sequence[str], Path, str], None] = pip_download
                         ) -> PackedDataset:
    """Fill dest with one pure-Python wheel per pinned requirement, plus the metadata."""
    folder = _fresh_folder(Path(dest))
    download(list(requirements), folder, python_version)
    wheels = {(_wheel_parts(p)[0], _wheel_parts(p)[1]): p for p in folder.glob("*.whl")}
    for requirement in requirements:
        name, _, version = requirement.partition("==")
        wheel = wheels.pop((_norm(name), version), None)
        if wheel is None:
            raise PackagingError(f"{folder}: no wheel for {requirement} after download")
        if not _wheel_parts(wheel)[2].endswith("-none-any"):
            raise PackagingError(f"{wheel.name}: not a pure-Python wheel; "
                                 "Kaggle's Python may differ")
    for extra in wheels.values():
        extra.unlink()  # upload only what was asked for
    paths = sorted(folder.glob("*.whl"))
    scan_for_secrets(paths, secrets)
    meta = dataset_metadata(metadata_template, owner)
    _write_metadata(folder, meta)
    write_wheels_marker(folder, requirements, python_version)
    tree = {p.name: p.read_bytes() for p in paths}
    return PackedDataset(folder, meta["id"], tuple((p.name, p.stat().st_size) for p in paths),
                         tree_hash(tree))


def write_wheels_marker(folder: Path, requirements: Sequence[str], python_version: str) -> Path:
    """The wheels dataset's marker, by which the kernels find it in any mount layout."""
    path = Path(folder) / WHEELS_MARKER
    path.write_text(json.dumps({"kind": "guie-wheels", "requirements": list(requirements),
                                "python_version": python_version}, indent=2) + "\n")
    return path


def install_wheels(wheels_dir: str | Path) -> list[str]:
    """On Kaggle: pip-install (offline, no deps) the wheels whose version is not installed yet.

    Already-installed exact versions are skipped, so running the notebooks locally leaves the
    development environment untouched. Returns the names of the wheels installed.
    """
    wheels_dir = Path(wheels_dir)
    wheels = sorted(wheels_dir.glob("*.whl")) if wheels_dir.is_dir() else []
    if not wheels:
        unmet = [r for r in WHEEL_REQUIREMENTS if _installed(r.split("==")[0]) != r.split("==")[1]]
        if unmet:
            raise PackagingError(f"{wheels_dir}: no wheels here, and {unmet} are not installed")
        check_requirements(CHECKED_DISTRIBUTIONS)
        return []
    missing = [w for w in wheels if _installed(_wheel_parts(w)[0]) != _wheel_parts(w)[1]]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                        "--quiet", *map(str, missing)], check=True)
        importlib.invalidate_caches()
    check_requirements(CHECKED_DISTRIBUTIONS)
    return [w.name for w in missing]


# ----------------------------------------------------------------------------- their needs


_OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, "==": lambda a, b: a == b,
        "!=": lambda a, b: a != b, ">": lambda a, b: a > b, "<": lambda a, b: a < b,
        "~=": lambda a, b: a >= b and a[:max(len(b) - 1, 1)] == b[:max(len(b) - 1, 1)]}


def _release(version: str) -> tuple[int, ...]:
    """1.0.17 -> (1, 0, 17); pre-release and local parts dropped (enough for lower bounds)."""
    numbers = []
    for part in version.split("+")[0].split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        numbers.append(int(digits.group()))
    return tuple(numbers)


def unmet_requirements(requirements: Iterable[str],
                       installed: Callable[[str], str | None] | None = None) -> list[str]:
    """Which `name>=x,<y` requirements (extras-only ones skipped) the environment does not meet."""
    installed = installed or _installed
    problems = []
    for line in requirements:
        spec, _, marker = line.partition(";")
        if "extra" in marker:
            continue
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^]]*\])?\s*(.*)", spec)
        name, constraints = match.group(1), match.group(2).strip()
        have = installed(name)
        if have is None:
            problems.append(f"{name} is missing (needed: {spec.strip()})")
            continue
        for clause in filter(None, (c.strip() for c in constraints.split(","))):
            op = next(o for o in sorted(_OPS, key=len, reverse=True) if clause.startswith(o))
            if not _OPS[op](_release(have), _release(clause[len(op):].strip())):
                problems.append(f"{name} {have} is installed, but {spec.strip()} is needed")
    return problems


def check_requirements(distributions: Sequence[str]) -> None:
    """Raise naming each need of these (no-deps installed) distributions that is missing or old."""
    problems = []
    for dist in distributions:
        if _installed(dist) is None:
            problems.append(f"{dist} is not installed")
            continue
        problems += [f"{dist} needs it: {p}" for p in
                     unmet_requirements(importlib.metadata.requires(dist) or [])]
    if problems:
        raise PackagingError("The kernel's Python lacks what the wheels need (they are installed "
                             "with --no-deps): " + "; ".join(problems) + ". Add the missing "
                             "wheels to the wheels dataset or pin a version Kaggle's image has.")


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- single files


def pack_file_dataset(path: str | Path, dest: str | Path, meta: dict,
                      secrets: Sequence[str]) -> PackedDataset:
    """A dataset of one local file (weights, checkpoint), linked rather than copied."""
    path, folder = Path(path).resolve(), _fresh_folder(Path(dest))
    if not path.is_file():
        raise PackagingError(f"{path}: no such file")
    scan_for_secrets([path], secrets)
    check_dataset_metadata(meta, f"dataset for {path.name}")
    try:
        (folder / path.name).symlink_to(path)
    except OSError:
        shutil.copy2(path, folder / path.name)
    _write_metadata(folder, meta)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return PackedDataset(folder, meta["id"], ((path.name, path.stat().st_size),),
                         digest.hexdigest())
