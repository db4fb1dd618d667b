"""The kernels run the resolved config they carry: nothing else in a built notebook describes the
experiment, so a value changed in its `config` parameter is what the kernel trains and what its
config.json records."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from support.kaggle_fixtures import USERNAME
from guie.kaggle.emulate import mount_uploaded
from guie.kaggle.notebooks import injected_parameters
from guie_cli.main import main
from kernel_runner import PAPERMILL

pytestmark = pytest.mark.slow


def test_a_pushed_training_kernel_runs_the_config_in_its_parameters(fake_kaggle, wheelhouse,
                                                                     tmp_path):
    assert main(["push", "--kernels", "train", "--workdir", str(tmp_path / "work"),
                 "--wheels-from", str(wheelhouse), "--poll-s", "0",
                 "stage1.epochs=0.01", "stage2.epochs=0.01"]) == 0
    (body,) = fake_kaggle.rpc_calls("SaveKernel")
    notebook = tmp_path / "train.ipynb"
    notebook.write_text(body["text"])  # the notebook Kaggle received
    inputs, out = tmp_path / "input", tmp_path / "working"
    out.mkdir()
    for ref in (f"{USERNAME}/guie-kit-src", f"{USERNAME}/guie-kit-wheels"):
        mount_uploaded(fake_kaggle.datasets[ref].versions[-1], ref, inputs, "current", "unpacked")

    parameters = injected_parameters(notebook)
    config = parameters["config"]
    assert config["name"] == "smoke" and config["stages"][0]["epochs"] == 0.01
    # values no config name plus overrides in the notebook could carry: only the JSON does
    config["seed"] = 7
    config["stages"][1]["lr_head"] = 0.000777
    config["max_hours"] = 5.5
    parameters.update(config=config, input_root=str(inputs), out_dir=str(out))
    (tmp_path / "parameters.json").write_text(json.dumps(parameters))
    env = {**os.environ, "GUIE_NPROC": "1"}
    done = subprocess.run([sys.executable, "-c", PAPERMILL, str(notebook),
                           str(tmp_path / "executed.ipynb"), str(tmp_path),
                           str(tmp_path / "parameters.json")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    assert json.loads((out / "guie-run.json").read_text())["status"] == "done"
    # config.json beside the outputs is exactly the config the kernel ran
    assert json.loads((out / "config.json").read_text()) == config
    executed = (tmp_path / "executed.ipynb").read_text()
    assert "config smoke: 2 stages" in executed and "max_hours 5.5" in executed
