"""`submit.py local`: execute the very notebooks `push` sends, here, with papermill.

The kernels are built by the same `build_kernels` as for a push; the source dataset is mounted
under `<out>/kaggle/input` as Kaggle mounts it now (`datasets/<owner>/<slug>/`, or the legacy
`<slug>/` with `layout="legacy"`), the training kernel's output (`<out>`) as an attached
notebook's output, and the notebooks run with `input_root` and `out_dir` pointed there. Around
them this process measures what Kaggle cannot show: mP@5 of the untrained model, after each
stage, and through the reloaded `saved_model.pt` fed one uint8 image at a time as the host does.
"""
from __future__ import annotations

import os
from pathlib import Path

from guie.config import save_config
from guie.kaggle import packaging
from guie.kaggle.build import build_kernels
from guie.kaggle.emulate import Archives, Layout, mount_folder, mount_notebook_output
from guie.kaggle.notebooks import map_kaggle_paths
from guie.kaggle.platform import KAGGLE_PYTHON_FALLBACK
from guie.experiment import stages_of
from guie.pipeline import prepare, score_export, score_untrained, write_curves, write_report
from guie.train.checkpoint import load_checkpoint
from guie.train.evaluate import stage_report

LOCAL_OWNER = "local"


def execute(notebook: Path, parameters: dict, executed: Path, cwd: Path, verbose: bool) -> None:
    import papermill
    from traitlets.config import Config

    # IPC rather than TCP between papermill and its local kernel: no network port, and no
    # "running over TCP without encryption" warning from ipykernel on every run.
    ipc = Config({"KernelManager": {"transport": "ipc"}})
    papermill.execute_notebook(str(notebook), str(executed), parameters=parameters,
                               kernel_name="python3", cwd=str(cwd), progress_bar=not verbose,
                               log_output=verbose, config=ipc)  # -v: the kernel's output, live


def run_local_notebooks(cfg, config_name: str, out_dir: str, layout: Layout = "current",
                        archives: Archives = "unpacked", verbose: bool = False) -> dict:
    """`cfg`, resolved by the command, through both kernels (named after `config_name`), which
    receive it as data; the report of the run."""
    out = Path(out_dir).resolve()
    cwd = Path.cwd()  # relative data roots resolve as they do in-process
    session = prepare(cfg)
    out.mkdir(parents=True, exist_ok=True)
    # The training kernel writes config.json again as it ran (its inputs resolved where mounted).
    save_config(cfg, out / "config.json")
    report = {**score_untrained(session), "notebooks": str(out / "notebooks")}

    work, inputs = out / "kaggle", out / "kaggle" / "input"
    build = build_kernels(cfg, config_name, LOCAL_OWNER, work, secrets=[])
    mount_folder(build.source.folder, build.source.ref, inputs, layout, archives)
    # This environment has the wheels installed already: the dataset holds only its marker, and
    # the kernel checks the installed versions instead.
    wheels = work / "datasets" / build.wheels_ref.split("/")[1]
    wheels.mkdir(parents=True, exist_ok=True)
    packaging.write_wheels_marker(wheels, packaging.WHEEL_REQUIREMENTS, KAGGLE_PYTHON_FALLBACK)
    mount_folder(wheels, build.wheels_ref, inputs, layout, archives)
    mount_notebook_output(out, build.plans["train"].ref, inputs, layout)

    executed = out / "notebooks"
    executed.mkdir(parents=True, exist_ok=True)
    env_before = os.environ.get("GUIE_NPROC")
    os.environ.setdefault("GUIE_NPROC", "1")  # one process on a CPU machine
    try:
        for kind in ("train", "infer"):
            params = map_kaggle_paths(build.plans[kind].parameters, inputs, out)
            execute(build.folders[kind] / f"{kind}.ipynb", params, executed / f"{kind}.ipynb",
                    cwd, verbose)
    finally:
        if env_before is None:
            os.environ.pop("GUIE_NPROC", None)

    for stage in stages_of(cfg):
        report.update(stage_report(stage.name,
                                   load_checkpoint(out / stage.name / "final.pt")["metrics"]))
    report.update(score_export(session, out), status="done")
    write_curves(out)
    return write_report(out, report)
