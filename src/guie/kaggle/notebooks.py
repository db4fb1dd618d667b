"""Build the training and inference kernels from the templates in kernels/.

A kernel is a folder with the notebook (the template with the experiment's parameters injected
by papermill, `prepare_only`) and its kernel-metadata.json. Parameters carry references to what
is attached (`dataset:owner/slug`, `notebook:owner/slug`), never a guessed mount path: the
kernels resolve each at run time with `guie.kaggle.inputs`, whose text the builder inlines into
the cell tagged `guie-inline` (the source dataset must be found before `guie` is importable).
`submit.py local` executes the same built notebook with papermill, `input_root` and `out_dir`
pointed at local folders laid out as Kaggle mounts them (`guie.kaggle.emulate`).

The experiment travels as data: both kernels receive the resolved config as their `config`
parameter and load it with `guie.kaggle.run_config.load_kernel_config`, never a config name
plus override strings.

`prepare_resume`, `record_run` and `check_training_run` run inside the kernels; they import
nothing heavy.
"""
from __future__ import annotations

import importlib
import json
import secrets
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Sequence

from guie.errors import UserValueError
from guie.kaggle.inputs import KAGGLE_INPUT, PUSH_MARKER, RUN_MARKER, resolve_input
from guie.kaggle.platform import DEFAULT_MACHINE_SHAPE
from guie.kaggle.run_config import config_parameter, run_identity, weights_datasets

COMPETITION = "google-universal-image-embedding"
KAGGLE_WORKING = "/kaggle/working"
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}
TEMPLATES_DIR = Path(__file__).resolve().parents[3] / "kernels"  # the repository's kernels/
EXPORT_MARKER = "guie-export.json"  # beside submission.zip: the training run it came from
INLINE_TAG = "guie-inline"  # a template cell replaced by the text of the module it names
Kind = Literal["train", "infer", "probe"]


class NotebookError(UserValueError):
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


def record_run(out_dir: str, run: dict, status: str, report: dict | None = None,
               push_nonce: str = "") -> Path:
    """The training output's marker: which run it holds, whether it finished ("done") or paused
    at max_hours ("paused"), when this session started and ended, where it paused, and the nonce
    of the push this session ran."""
    path = Path(out_dir) / RUN_MARKER
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    previous = json.loads(path.read_text()) if path.is_file() else {}
    started = previous.get("session_started_at") if previous.get("status") == "running" else None
    summary = {k: v for k, v in (report or {}).items()
               if k == "paused_in" or (k.startswith("map5_") and "per_domain" not in k)}
    body = {**run, "status": status, "push_nonce": push_nonce,
            "session_started_at": started or now,
            **({"session_ended_at": now} if status != "running" else {}), **summary}
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


def record_export(out_dir: str, run: dict, push_nonce: str = "") -> Path:
    """Beside submission.zip: the training run it was exported from, and this push's nonce."""
    path = Path(out_dir) / EXPORT_MARKER
    path.write_text(json.dumps({"run_id": run.get("run_id"), "config_name": run.get("config_name"),
                                "push_nonce": push_nonce}, indent=2) + "\n")
    return path


def check_training_run(checkpoint_dir: str | Path, expected: dict) -> str:
    """The attached training output, if it holds the finished run this push trains."""
    marker = Path(checkpoint_dir) / RUN_MARKER
    found = json.loads(marker.read_text()) if marker.is_file() else {}
    if found.get("run_id") != expected.get("run_id"):
        raise NotebookError(
            f"{checkpoint_dir} holds training run {found.get('run_id', 'unknown')} (config "
            f"{found.get('config_name')!r}, source {str(found.get('source_hash', ''))[:12]}), not "
            f"run {expected.get('run_id')} (config {expected.get('config_name')!r}, source "
            f"{str(expected.get('source_hash', ''))[:12]}) that this kernel was built for. Kaggle "
            "attached the training kernel's previous output: wait until the training kernel "
            "has finished (`submit.py status --wait`), then `submit.py push --kernels infer`.")
    if found.get("status") != "done":
        raise NotebookError(
            f"{checkpoint_dir}: training run {found['run_id']} is {found.get('status')!r}, not "
            "done (paused at max_hours, or it failed): resume it with `submit.py push "
            "--kernels train --resume-kernel OWNER/SLUG` (or let `submit.py run` chain the "
            "sessions), then push the inference kernel.")
    return str(checkpoint_dir)


def prepare_resume(resume_input: str, out_dir: str, input_root: str = KAGGLE_INPUT) -> bool:
    """Copy a previous run's output (read-only on Kaggle) into out_dir, so training resumes."""
    if not resume_input:
        return False
    source = resolve_input(resume_input, input_root, marker=RUN_MARKER)
    # Not the previous session's push marker: this session wrote its own first.
    shutil.copytree(source, out_dir, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(PUSH_MARKER))
    return True


# ----------------------------------------------------------------------------- planning


def kernel_title(kind: Kind, config_name: str, session: int = 1) -> str:
    return f"GUIE {kind} {config_name}" + (f" s{session}" if session > 1 else "")


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
        bad = [s for s in meta[key] if not is_source_ref(s)]
        if bad:
            problems.append(f"{key}: {bad} are not owner/slug or owner/slug/VERSION")
    if problems:
        raise NotebookError(f"kernel-metadata for {meta['id']}: " + "; ".join(problems))


def is_source_ref(text: str) -> bool:
    """owner/slug, or owner/slug/N pinning version N (kaggle 2.2.4 accepts both)."""
    parts = text.split("/")
    return (len(parts) in (2, 3) and all(parts)
            and (len(parts) == 2 or (parts[2].isdigit() and int(parts[2]) > 0)))


def new_push_nonce() -> str:
    """A fresh id for one push, carried in the notebook's parameters and echoed in its output."""
    return secrets.token_hex(8)


def plan_kernels(cfg: Any, config_name: str, owner: str, *,
                 source_ref: str, wheels_ref: str, source_hash: str,
                 resume_kernel: str | None = None, extra_datasets: Sequence[str] = (),
                 machine_shape: str = DEFAULT_MACHINE_SHAPE, private: bool = True,
                 train_internet: bool = False, expected_run: dict | None = None,
                 session: int = 1, checkpoint_kernel: str | None = None,
                 push_nonce: str | None = None) -> dict[Kind, KernelPlan]:
    """Parameters and metadata of both kernels for one experiment: `cfg`, resolved, is what
    both kernels run (`config_name` names the kernels).

    Every input travels as a reference the kernel resolves (`guie.kaggle.inputs`); data sources
    by their kaggle_slug, weights by their `kaggle:` reference, both attached here.
    expected_run: the training run the inference kernel must find (default: the run this
    config and this source make). session > 1: the training kernel of that
    session of a chained run (`guie.kaggle.chain`), its own kernel; checkpoint_kernel: the
    training kernel whose output the inference kernel reads (default: this plan's).
    """
    data_slugs = [s.kaggle_slug for s in cfg.data.sources if s.kaggle_slug]
    eval_slugs = [s.kaggle_slug for s in cfg.data.eval_sources if s.kaggle_slug]
    titles = {"train": kernel_title("train", config_name, session),
              "infer": kernel_title("infer", config_name)}
    refs = {kind: f"{owner}/{slugify_title(title)}" for kind, title in titles.items()}
    checkpoint_kernel = checkpoint_kernel or refs["train"]
    run = run_identity(cfg, source_hash)
    common = {
        "config": config_parameter(cfg), "source_hash": source_hash,
        "input_root": KAGGLE_INPUT, "source_input": f"dataset:{source_ref}",
        "wheels_input": f"dataset:{wheels_ref}",
        "out_dir": KAGGLE_WORKING, "push_nonce": push_nonce or new_push_nonce(),
    }
    resume_input = f"notebook:{resume_kernel}" if resume_kernel else ""
    train_params = {**common, "run": run, "resume_input": resume_input}
    infer_params = {**common, "checkpoint_input": f"notebook:{checkpoint_kernel}",
                    "expected_run": expected_run or run}
    base_sources = [source_ref, wheels_ref, *weights_datasets(cfg), *extra_datasets]
    train_meta = kernel_metadata(
        refs["train"], titles["train"], "train.ipynb", enable_gpu=True,
        enable_internet=train_internet, dataset_sources=[*base_sources, *data_slugs, *eval_slugs],
        kernel_sources=[resume_kernel] if resume_kernel else [], machine_shape=machine_shape,
        is_private=private)
    # A reduction fitted at export time (PCA, whitening) reads training images there too.
    fits_on_data = cfg.export.reduction not in ("none", "avg_pool")
    infer_meta = kernel_metadata(
        refs["infer"], titles["infer"], "infer.ipynb", enable_gpu=True,
        enable_internet=False,
        dataset_sources=[*base_sources, *(data_slugs if fits_on_data else [])],
        competition_sources=[COMPETITION],
        kernel_sources=[checkpoint_kernel], machine_shape=machine_shape, is_private=private)
    return {"train": KernelPlan("train", refs["train"], train_params, train_meta),
            "infer": KernelPlan("infer", refs["infer"], infer_params, infer_meta)}


def plan_probe(owner: str, machine_shape: str | None = DEFAULT_MACHINE_SHAPE,
               dataset_sources: Sequence[str] = ()) -> KernelPlan:
    """The probe kernel: internet off, as the real kernels run; GPU on the machine shape given,
    or a CPU session (no GPU quota) when it is None; `dataset_sources` attached (the CPU probe
    attaches an older, pinned version of the source dataset, to see which version mounts)."""
    ref = f"{owner}/{slugify_title(kernel_title('probe', 'platform'))}"
    meta = kernel_metadata(ref, kernel_title("probe", "platform"), "probe.ipynb",
                           enable_gpu=machine_shape is not None, enable_internet=False,
                           dataset_sources=list(dataset_sources), machine_shape=machine_shape)
    if machine_shape is None:
        del meta["machine_shape"]  # not sent: Kaggle's default CPU session
    return KernelPlan("probe", ref, {"input_root": KAGGLE_INPUT, "out_dir": KAGGLE_WORKING,
                                     "push_nonce": new_push_nonce()}, meta)


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
        if INLINE_TAG in cell.metadata.get("tags", []):
            cell.source = inline_module_source(cell.metadata.get("guie_module", ""), template)
    # papermill records the absolute local paths it read and wrote; they say nothing on Kaggle.
    nb.metadata.papermill.update(input_path=template.name, output_path=out_path.name)
    nb.metadata.kernelspec = dict(KERNELSPEC)
    nbformat.validate(nb)
    nbformat.write(nb, out_path)
    return nb


def write_kernel(plan: KernelPlan, out_dir: str | Path,
                 templates_dir: str | Path = TEMPLATES_DIR) -> Path:
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


def inline_module_source(module: str, where: Path) -> str:
    """The text of a standard-library-only module of the kit, for a `guie-inline` cell."""
    if not module.startswith("guie.kaggle."):
        raise NotebookError(f"{where}: a {INLINE_TAG} cell must name a guie.kaggle module in its "
                            f"metadata.guie_module, not {module!r}")
    path = Path(importlib.import_module(module).__file__)
    # A cell's text may be run as part of a longer script, where a __future__ import must come
    # first; the kit's inlined modules run on Python >= 3.10 without it.
    text = path.read_text().replace("from __future__ import annotations\n", "")
    return f"# {module}, inlined by the kit's notebook builder (standard library only)\n" + text


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
