"""One kernel builder for `push` and `local`: pack the source, plan and write both kernels.

`submit.py local` executes exactly what `push` uploads because both call `build_kernels`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from guie.kaggle import packaging
from guie.kaggle.notebooks import KernelPlan, plan_kernels, write_kernel

PACKAGE_DIR = Path(packaging.__file__).resolve().parents[1]  # src/guie
METADATA_DIR = PACKAGE_DIR.parents[1] / "datasets-metadata"
SOURCE_TEMPLATE = METADATA_DIR / "guie-src" / "dataset-metadata.json"
WHEELS_TEMPLATE = METADATA_DIR / "guie-wheels" / "dataset-metadata.json"


@dataclass(frozen=True)
class KernelBuild:
    source: packaging.PackedDataset  # the packed source dataset, ready to upload
    wheels_ref: str  # owner/slug of the wheels dataset
    plans: dict[str, KernelPlan]
    folders: dict[str, Path]  # kind -> built kernel folder (notebook + kernel-metadata.json)


def build_kernels(cfg: Any, config_name: str, owner: str, workdir: str | Path,
                  secrets: Sequence[str],
                  kinds: Sequence[str] = ("train", "infer"),
                  source: packaging.PackedDataset | None = None, **plan_options) -> KernelBuild:
    """<workdir>/datasets/<source slug> and <workdir>/kernels/<kernel slug>, secrets refused;
    `cfg` is the resolved config both kernels run, `config_name` names them.

    source: a source dataset packed before (a chain's later sessions run the source it uploaded
    at its start, whatever the working tree holds by then)."""
    workdir = Path(workdir)
    if source is None:
        source_slug = packaging.dataset_metadata(SOURCE_TEMPLATE, owner)["id"].split("/")[1]
        source = packaging.pack_source(PACKAGE_DIR, workdir / "datasets" / source_slug,
                                       SOURCE_TEMPLATE, owner, secrets)
    wheels_ref = packaging.dataset_metadata(WHEELS_TEMPLATE, owner)["id"]
    plans = plan_kernels(cfg, config_name, owner, source_ref=source.ref,
                         wheels_ref=wheels_ref, source_hash=source.content_hash, **plan_options)
    folders = {kind: write_kernel(plans[kind], workdir / "kernels") for kind in kinds}
    for folder in folders.values():
        packaging.scan_for_secrets(sorted(p for p in folder.iterdir() if p.is_file()), secrets)
    return KernelBuild(source, wheels_ref, plans, folders)


def push_dataset_and_wait(client, folder: Path, notes: str, dir_mode: str, poll_s: float,
                          log: Callable[[str], None] = print) -> int:
    """Create or version a dataset, then wait for *that* version to be current and ready."""
    ref = json.loads((folder / "dataset-metadata.json").read_text())["id"]
    before = client.dataset_version(ref)
    result = client.push_dataset(folder, notes, dir_mode=dir_mode)
    log(f"dataset {ref}: {'created' if result.created else 'new version'}; waiting until that "
        "version is ready")
    version = client.wait_dataset_version(ref, before, poll_s=poll_s)
    log(f"dataset {ref}: version {version} ready")
    return version


def upload_datasets(client, build: KernelBuild, owner: str, secrets: Sequence[str],
                    python_version: str, state: dict, notes: str, poll_s: float,
                    download: Callable[[Sequence[str], Path, str], None] = packaging.pip_download,
                    log: Callable[[str], None] = print) -> dict:
    """Upload the source and wheels datasets where they changed since `state` (the record of
    the last push); the record of what is on Kaggle now, with each dataset's version number
    (the kernels attach exactly that version: `pin_dataset_sources`)."""
    source = build.source
    pushed = state.get("source", {})
    if pushed.get("ref") == source.ref and pushed.get("hash") == source.content_hash \
            and client.dataset_status(source.ref) == "ready":
        log(f"dataset {source.ref}: unchanged (hash {source.content_hash[:12]}), not re-uploaded")
        source_version = pushed.get("version") or client.dataset_version(source.ref)
    else:
        source_version = push_dataset_and_wait(
            client, source.folder, f"{source.content_hash[:12]} {notes}", "zip", poll_s, log)
    requirements = list(packaging.WHEEL_REQUIREMENTS)
    wheels = {"ref": build.wheels_ref, "requirements": requirements,
              "python_version": python_version}
    if {k: state.get("wheels", {}).get(k) for k in wheels} != wheels \
            or client.dataset_status(build.wheels_ref) is None:
        folder = build.source.folder.parent / build.wheels_ref.split("/")[1]
        packed = packaging.build_wheels_dataset(folder, WHEELS_TEMPLATE, owner, secrets,
                                                python_version, download=download)
        wheels_version = push_dataset_and_wait(
            client, packed.folder, f"{' '.join(requirements)} py{python_version}", "skip", poll_s,
            log)
    else:
        wheels_version = (state.get("wheels", {}).get("version")
                          or client.dataset_version(build.wheels_ref))
    return {"source": {"ref": source.ref, "hash": source.content_hash, "version": source_version},
            "wheels": {**wheels, "version": wheels_version}}


def pinned_versions(datasets: dict) -> dict[str, int]:
    """owner/slug -> version of the datasets `upload_datasets` recorded."""
    return {d["ref"]: int(d["version"]) for d in datasets.values()
            if isinstance(d, dict) and d.get("ref") and d.get("version")}


def pin_dataset_sources(folder: Path, versions: dict[str, int]) -> list[str]:
    """Attach the datasets in `versions` at exactly that version (`owner/slug/N`, which kaggle
    2.2.4 accepts) in folder/kernel-metadata.json; the dataset sources as pushed.

    Waiting for a new version to read ready is not enough: a kernel can still mount the previous
    one and fail its hash check late. Whether Kaggle honours `/N`, and where a pinned version
    mounts, is unconfirmed; the kernels find their inputs by marker in any layout, and the
    source's hash check stays the last guard."""
    path = Path(folder) / "kernel-metadata.json"
    meta = json.loads(path.read_text())
    meta["dataset_sources"] = [f"{s}/{versions[s]}" if s in versions else s
                               for s in meta["dataset_sources"]]
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta["dataset_sources"]
