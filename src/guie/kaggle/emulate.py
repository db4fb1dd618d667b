"""Lay inputs out under a local input root the way Kaggle mounts them, for local runs and tests.

`layout="current"`: `<root>/datasets/<owner>/<slug>/`, `<root>/notebooks/<owner>/<slug>/`,
`<root>/competitions/<slug>/` (Kaggle since 2026); `layout="legacy"`: `<root>/<slug>/`.
Archives uploaded with dir_mode zip (`src.zip`) are unpacked into a folder of that name
(`archives="unpacked"`, what Kaggle's backend does when it reports BLOBS_DECOMPRESSED) or kept
as they are (`archives="zip"`, reportedly seen too). The dataset-metadata.json is never mounted.
"""
from __future__ import annotations

import io
import os
import shutil
import zipfile
from pathlib import Path
from typing import Literal

from guie.errors import UserValueError
from guie.kaggle.inputs import InputRef

Layout = Literal["current", "legacy"]
Archives = Literal["unpacked", "zip"]
LAYOUTS = ("current", "legacy")


def mount_point(ref: str | InputRef, input_root: str | Path, layout: Layout) -> Path:
    ref = ref if isinstance(ref, InputRef) else InputRef.parse(ref)
    if layout not in LAYOUTS:
        raise UserValueError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    return ref.candidates(input_root)[LAYOUTS.index(layout)]


def _fresh(target: Path) -> Path:
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def mount_uploaded(files: dict[str, bytes], ref: str, input_root: str | Path,
                   layout: Layout = "current", archives: Archives = "unpacked") -> Path:
    """Mount the files of one dataset version exactly as uploaded ({name: bytes})."""
    target = _fresh(mount_point(f"dataset:{ref}", input_root, layout))
    target.mkdir()
    for name, data in files.items():
        if name == "dataset-metadata.json":
            continue
        if archives == "unpacked" and name.endswith(".zip"):
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                z.extractall(target / name[:-len(".zip")])
        else:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(data)
    return target


def upload_files(folder: str | Path) -> dict[str, bytes]:
    """What the client uploads from a dataset folder with dir_mode zip: top-level files as they
    are, each sub-folder as `<name>.zip`."""
    files = {}
    for path in sorted(Path(folder).iterdir()):
        if path.is_file():
            files[path.name] = path.read_bytes()
        elif path.is_dir():
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
                for member in sorted(path.rglob("*")):
                    if member.is_file():
                        z.write(member, member.relative_to(path).as_posix())
            files[f"{path.name}.zip"] = buffer.getvalue()
    return files


def mount_folder(folder: str | Path, ref: str, input_root: str | Path,
                 layout: Layout = "current", archives: Archives = "unpacked") -> Path:
    """Mount a built dataset folder as Kaggle would after uploading it with dir_mode zip."""
    return mount_uploaded(upload_files(folder), ref, input_root, layout, archives)


def mount_notebook_output(working_dir: str | Path, kernel_ref: str, input_root: str | Path,
                          layout: Layout = "current") -> Path:
    """An attached notebook's output: a link to the folder that kernel wrote."""
    target = _fresh(mount_point(f"notebook:{kernel_ref}", input_root, layout))
    os.symlink(Path(working_dir).resolve(), target, target_is_directory=True)
    return target
