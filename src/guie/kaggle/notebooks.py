"""Build the training and inference kernels from the templates in kernels/.

A kernel is a folder with the notebook (the template with the experiment's parameters injected
by papermill, `prepare_only`) and its kernel-metadata.json. `submit.py local` executes the same
built notebook with papermill, the Kaggle paths mapped to local folders (`map_kaggle_paths`).

`kernel_config` and `prepare_resume` run inside the kernels; they import nothing heavy.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

COMPETITION = "google-universal-image-embedding"
KAGGLE_INPUT = "/kaggle/input"
KAGGLE_WORKING = "/kaggle/working"
DEFAULT_MACHINE_SHAPE = "NvidiaTeslaT4"  # Kaggle's 2xT4 machine (SaveKernel's documented names)
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}
TEMPLATES_DIR = Path(__file__).resolve().parents[3] / "kernels"  # the repository's kernels/
Kind = Literal["train", "infer"]


class NotebookError(ValueError):
    pass


@dataclass(frozen=True)
class KernelPlan:
    kind: Kind
    ref: str  # owner/slug
    parameters: dict[str, Any]
    metadata: dict[str, Any]  # kernel-metadata.json

    @property
    def slug(self) -> str:
        return self.ref.split("/")[1]


# ----------------------------------------------------------------------------- inside kernels


def kernel_config(config_name: str, overrides: Sequence[str], data_root: str = ""):
    """The experiment config a kernel runs: a shipped config, the overrides, the data root."""
    from guie.config import apply_overrides
    from guie.configs import get_config

    extra = [f"data.root={data_root}"] if data_root else []
    return apply_overrides(get_config(config_name), [*overrides, *extra])


def prepare_resume(resume_from: str, out_dir: str) -> bool:
    """Copy a previous run's output (read-only on Kaggle) into out_dir, so training resumes."""
    if not resume_from:
        return False
    source = Path(resume_from)
    if not source.is_dir():
        raise NotebookError(f"resume_from: {source} is not a folder (attach the previous run)")
    shutil.copytree(source, out_dir, dirs_exist_ok=True)
    return True


# ----------------------------------------------------------------------------- planning


def kernel_title(kind: Kind, config_name: str) -> str:
    return f"GUIE {kind} {config_name}"


def slugify_title(title: str) -> str:
    from slugify import slugify  # python-slugify: the one the kaggle client compares against

    return slugify(title)


def kernel_metadata(ref: str, title: str, code_file: str, *, enable_gpu: bool,
                    enable_internet: bool, dataset_sources: Sequence[str],
                    competition_sources: Sequence[str] = (), kernel_sources: Sequence[str] = (),
                    machine_shape: str = DEFAULT_MACHINE_SHAPE, is_private: bool = True) -> dict:
    """kernel-metadata.json, every field explicit (the client defaults internet to on)."""
    meta = {
        "id": ref, "title": title, "code_file": code_file, "language": "python",
        "kernel_type": "notebook", "is_private": is_private, "enable_gpu": enable_gpu,
        "enable_tpu": False, "enable_internet": enable_internet,
        "dataset_sources": list(dict.fromkeys(dataset_sources)),
        "competition_sources": list(competition_sources),
        "kernel_sources": list(kernel_sources), "model_sources": [],
        "machine_shape": machine_shape,
    }
    check_kernel_metadata(meta)
    return meta


def check_kernel_metadata(meta: dict) -> None:
    problems = []
    owner, _, slug = meta["id"].partition("/")
    if not owner or len(slug) < 5 or "/" in slug:
        problems.append(f"id {meta['id']!r} must be owner/slug with a slug of >= 5 characters")
    if len(meta["title"]) < 5 or slugify_title(meta["title"]) != slug:
        problems.append(f"title {meta['title']!r} must be >= 5 characters and slugify to {slug!r}")
    for key in ("dataset_sources", "kernel_sources"):
        bad = [s for s in meta[key] if len(s.split("/")) != 2 or not all(s.split("/"))]
        if bad:
            problems.append(f"{key}: {bad} are not owner/slug")
    if problems:
        raise NotebookError(f"kernel-metadata for {meta['id']}: " + "; ".join(problems))


def plan_kernels(cfg: Any, config_name: str, overrides: Sequence[str], owner: str, *,
                 source_ref: str, wheels_ref: str, source_hash: str, max_hours: float = 11.0,
                 compat: str = "none", data_root: str | None = None,
                 resume_kernel: str | None = None, extra_datasets: Sequence[str] = (),
                 machine_shape: str = DEFAULT_MACHINE_SHAPE, private: bool = True,
                 train_internet: bool = False) -> dict[Kind, KernelPlan]:
    """Parameters and metadata of both kernels for one experiment.

    data_root None: /kaggle/input when the config names Kaggle datasets, else the config's own
    root (the sample-data configs build their data under the working folder).
    """
    data_slugs = [s.kaggle_slug for s in cfg.data.sources if s.kaggle_slug]
    if data_root is None:
        data_root = KAGGLE_INPUT if data_slugs else ""
    refs = {kind: f"{owner}/{slugify_title(kernel_title(kind, config_name))}"
            for kind in ("train", "infer")}
    common = {
        "config_name": config_name, "overrides": list(overrides), "source_hash": source_hash,
        "source_dir": f"{KAGGLE_INPUT}/{source_ref.split('/')[1]}",
        "wheels_dir": f"{KAGGLE_INPUT}/{wheels_ref.split('/')[1]}",
        "data_root": data_root, "out_dir": KAGGLE_WORKING,
    }
    resume_from = f"{KAGGLE_INPUT}/{resume_kernel.split('/')[1]}" if resume_kernel else ""
    train_params = {**common, "resume_from": resume_from, "max_hours": float(max_hours)}
    infer_params = {**common, "checkpoint": f"{KAGGLE_INPUT}/{refs['train'].split('/')[1]}",
                    "compat": compat}
    base_sources = [source_ref, wheels_ref, *extra_datasets]
    train_meta = kernel_metadata(
        refs["train"], kernel_title("train", config_name), "train.ipynb", enable_gpu=True,
        enable_internet=train_internet, dataset_sources=[*base_sources, *data_slugs],
        kernel_sources=[resume_kernel] if resume_kernel else [], machine_shape=machine_shape,
        is_private=private)
    # A reduction fitted at export time (PCA, whitening) reads training images there too.
    fits_on_data = cfg.export.reduction not in ("none", "avg_pool")
    infer_meta = kernel_metadata(
        refs["infer"], kernel_title("infer", config_name), "infer.ipynb", enable_gpu=True,
        enable_internet=False,
        dataset_sources=[*base_sources, *(data_slugs if fits_on_data else [])],
        competition_sources=[COMPETITION],
        kernel_sources=[refs["train"]], machine_shape=machine_shape, is_private=private)
    return {"train": KernelPlan("train", refs["train"], train_params, train_meta),
            "infer": KernelPlan("infer", refs["infer"], infer_params, infer_meta)}


# ----------------------------------------------------------------------------- building


def build_notebook(template: str | Path, parameters: dict[str, Any], out_path: str | Path):
    """Inject parameters with papermill (prepare_only) and write a clean nbformat-4 notebook."""
    import nbformat
    import papermill

    template, out_path = Path(template), Path(out_path)
    source = nbformat.read(template, as_version=4)
    if source.metadata.get("kernelspec", {}).get("name") != KERNELSPEC["name"]:
        raise NotebookError(f"{template}: metadata.kernelspec.name must be {KERNELSPEC['name']!r}")
    tagged = [c for c in source.cells if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        raise NotebookError(f"{template}: needs exactly one cell tagged 'parameters'")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nb = papermill.execute_notebook(str(template), str(out_path), parameters=dict(parameters),
                                    prepare_only=True, kernel_name=KERNELSPEC["name"],
                                    language="python", progress_bar=False)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # papermill records the absolute local paths it read and wrote; they say nothing on Kaggle.
    nb.metadata.papermill.update(input_path=template.name, output_path=out_path.name)
    nb.metadata.kernelspec = dict(KERNELSPEC)
    nbformat.validate(nb)
    nbformat.write(nb, out_path)
    return nb


def write_kernel(plan: KernelPlan, out_dir: str | Path, templates_dir: str | Path = TEMPLATES_DIR) -> Path:
    """dest/<slug>/{<kind>.ipynb, kernel-metadata.json}, replacing what was there."""
    folder = Path(out_dir) / plan.slug
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    code_file = plan.metadata["code_file"]
    build_notebook(Path(templates_dir) / code_file, plan.parameters, folder / code_file)
    (folder / "kernel-metadata.json").write_text(json.dumps(plan.metadata, indent=2) + "\n")
    return folder


def injected_parameters(notebook_path: str | Path) -> dict[str, Any]:
    """The parameters papermill injected into a built notebook."""
    import nbformat

    return dict(nbformat.read(notebook_path, as_version=4).metadata.papermill.parameters)


def map_kaggle_paths(parameters: dict[str, Any], input_dir: str | Path,
                     working_dir: str | Path) -> dict[str, Any]:
    """The same parameters with /kaggle/input and /kaggle/working mapped to local folders."""
    def mapped(value: Any) -> Any:
        if isinstance(value, str):
            for kaggle, local in ((KAGGLE_INPUT, input_dir), (KAGGLE_WORKING, working_dir)):
                if value == kaggle or value.startswith(kaggle + "/"):
                    return str(Path(local)) + value[len(kaggle):]
        return value

    return {key: mapped(value) for key, value in parameters.items()}
