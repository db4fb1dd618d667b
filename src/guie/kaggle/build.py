"""One kernel builder for `push` and `local`: pack the source, plan and write both kernels.

`submit.py local` executes exactly what `push` uploads because both call `build_kernels`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

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


def build_kernels(cfg: Any, config_name: str, overrides: Sequence[str], owner: str,
                  workdir: str | Path, secrets: Sequence[str],
                  kinds: Sequence[str] = ("train", "infer"), **plan_options) -> KernelBuild:
    """<workdir>/datasets/<source slug> and <workdir>/kernels/<kernel slug>, secrets refused."""
    workdir = Path(workdir)
    source_slug = packaging.dataset_metadata(SOURCE_TEMPLATE, owner)["id"].split("/")[1]
    source = packaging.pack_source(PACKAGE_DIR, workdir / "datasets" / source_slug,
                                   SOURCE_TEMPLATE, owner, secrets)
    wheels_ref = packaging.dataset_metadata(WHEELS_TEMPLATE, owner)["id"]
    plans = plan_kernels(cfg, config_name, overrides, owner, source_ref=source.ref,
                         wheels_ref=wheels_ref, source_hash=source.content_hash, **plan_options)
    folders = {kind: write_kernel(plans[kind], workdir / "kernels") for kind in kinds}
    for folder in folders.values():
        packaging.scan_for_secrets(sorted(p for p in folder.iterdir() if p.is_file()), secrets)
    return KernelBuild(source, wheels_ref, plans, folders)
