"""`submit.py local`: execute the very notebooks `push` sends, here, with papermill.

The source is packed as it would be uploaded (`/kaggle/input/<slug>` becomes
`<out>/kaggle/input/<slug>`), the kernels are planned and built exactly as for a push, then
executed with Kaggle's paths mapped to local folders. Around them this process measures what
Kaggle cannot show: mP@5 of the untrained model, after each stage, and through the reloaded
`saved_model.pt` fed one uint8 image at a time as the host does.
"""
from __future__ import annotations

import os
from pathlib import Path


from guie.config import save_config
from guie.kaggle.notebooks import kernel_config, map_kaggle_paths, plan_kernels, write_kernel
from guie.kaggle.packaging import dataset_metadata, pack_source
from guie.pipeline import (prepare, score_export, score_untrained, stages_of,
                           write_curves, write_report)
from guie.train.checkpoint import load_checkpoint

PACKAGE_DIR = Path(__file__).resolve().parents[1]
METADATA = PACKAGE_DIR.parents[1] / "datasets-metadata"
LOCAL_OWNER = "local"


def execute(notebook: Path, parameters: dict, executed: Path, cwd: Path) -> None:
    import papermill

    papermill.execute_notebook(str(notebook), str(executed), parameters=parameters,
                               kernel_name="python3", cwd=str(cwd), progress_bar=False,
                               log_output=True)  # the kernel's own progress bars, live


def run_local_notebooks(config_name: str, overrides: list[str], out_dir: str,
                        compat: str = "none") -> dict:
    out = Path(out_dir).resolve()
    cwd = Path.cwd()  # relative data roots resolve as they do in-process
    cfg = kernel_config(config_name, overrides)
    session = prepare(cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.json")
    report = {**score_untrained(session), "notebooks": str(out / "notebooks")}

    inputs = out / "kaggle" / "input"
    template = METADATA / "guie-src" / "dataset-metadata.json"
    slug = dataset_metadata(template, LOCAL_OWNER)["id"].split("/")[1]
    source = pack_source(PACKAGE_DIR, inputs / slug, template, LOCAL_OWNER, secrets=[])
    plans = plan_kernels(cfg, config_name, overrides, LOCAL_OWNER, source_ref=source.ref,
                         wheels_ref=f"{LOCAL_OWNER}/guie-wheels", source_hash=source.content_hash,
                         compat=compat, data_root="")
    built = out / "kaggle" / "kernels"
    executed = out / "notebooks"
    executed.mkdir(parents=True, exist_ok=True)
    env_before = os.environ.get("GUIE_NPROC")
    os.environ.setdefault("GUIE_NPROC", "1")  # one process on a CPU machine
    try:
        for kind in ("train", "infer"):
            folder = write_kernel(plans[kind], built)
            params = map_kaggle_paths(plans[kind].parameters, inputs, out)
            if kind == "infer":
                params["checkpoint"] = str(out)  # the training kernel's output, here
            execute(folder / f"{kind}.ipynb", params, executed / f"{kind}.ipynb", cwd)
    finally:
        if env_before is None:
            os.environ.pop("GUIE_NPROC", None)

    for stage in stages_of(cfg):
        metrics = load_checkpoint(out / stage.name / "final.pt")["metrics"]
        report[f"map5_{stage.name}"] = metrics["map5"]
        report[f"map5_{stage.name}_per_domain"] = metrics["map5_per_domain"]
    report.update(score_export(session, out), status="done")
    write_curves(out)
    return write_report(out, report)
