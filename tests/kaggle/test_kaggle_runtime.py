"""What `push` uploads, run in a stand-in for Kaggle's image, mounted as Kaggle mounts it.

The stand-in is a fresh venv that sees this venv's packages (torch, torchvision, timm,
huggingface_hub, safetensors, regex, papermill, ipykernel, pandas, matplotlib, tqdm, pillow,
numpy, scikit-image, google-crc32c, wcwidth ...) but neither the kit, nor open_clip, nor ftfy,
nor simplejpeg and faiss, which Kaggle's image lacks too. `push` runs through the real client
against the fake server, with the real `pip download` from the registry; the datasets the server
received are mounted byte for byte under an input root in today's layout and in the legacy one
(the source archive unpacked, and kept as a zip), and the notebooks the server received are
executed there with papermill, in the stand-in's Python.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from support.kaggle_fixtures import KEY, USERNAME
from guie.kaggle.emulate import mount_notebook_output, mount_uploaded
from kernel_runner import PAPERMILL

pytestmark = pytest.mark.slow

SRC, WHEELS = f"{USERNAME}/guie-kit-src", f"{USERNAME}/guie-kit-wheels"
TRAIN, INFER = f"{USERNAME}/guie-train-smoke", f"{USERNAME}/guie-infer-smoke"
# What Kaggle's image does not have (its image has wcwidth, through IPython).
NOT_IN_KAGGLES_IMAGE = ("open_clip", "open_clip_torch", "ftfy", "guie", "simplejpeg", "faiss",
                        "faiss_cpu", "kaggle", "kagglesdk", "pytest")


def _excluded(name: str) -> bool:
    base = name.split("-")[0].split(".")[0].lower()
    return (base in NOT_IN_KAGGLES_IMAGE or name.startswith(("__editable__", "_guie", "guie"))
            or name.endswith(".pth"))


@pytest.fixture(scope="module")
def kaggle_image(tmp_path_factory) -> Path:
    """The stand-in's python: a fresh venv whose extra site dir links this venv's packages."""
    root = tmp_path_factory.mktemp("kaggle-image")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    shared = root / "shared-site"
    shared.mkdir()
    ours = Path(sysconfig.get_paths()["purelib"])
    for entry in sorted(ours.iterdir()):
        if not _excluded(entry.name):
            (shared / entry.name).symlink_to(entry)
    python = root / "venv" / "bin" / "python"
    site = subprocess.run([str(python), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "kaggle_image.pth").write_text(f"import site; site.addsitedir({str(shared)!r})\n")
    check = subprocess.run([str(python), "-c", "import torch, papermill, ipykernel, timm\n"
                            "for m in ('open_clip', 'ftfy', 'guie'):\n"
                            "    try:\n        __import__(m); print('HAS', m)\n"
                            "    except ImportError: pass"],
                           capture_output=True, text=True, env=_clean_env(root))
    assert check.returncode == 0 and "HAS" not in check.stdout, check.stdout + check.stderr
    return python


def _clean_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KAGGLE_", "PYTHON", "JUPYTER", "VIRTUAL_ENV"))}
    return {**env, "HOME": str(home), "GUIE_NPROC": "1", "PYTHONNOUSERSITE": "1"}


def _execute(python: Path, notebook: Path, executed: Path, cwd: Path, **changed) -> None:
    """papermill, as Kaggle runs a pushed notebook, with some of its parameters changed (papermill
    replaces the injected cell, so every injected parameter is passed again)."""
    from guie.kaggle.notebooks import injected_parameters

    parameters = {**injected_parameters(notebook), **{k: str(v) for k, v in changed.items()}}
    params_file = executed.with_suffix(".parameters.json")
    params_file.write_text(json.dumps(parameters))
    argv = [str(python), "-c", PAPERMILL, str(notebook), str(executed), str(cwd), str(params_file)]
    done = subprocess.run(argv, capture_output=True, text=True, env=_clean_env(cwd), timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """A real `push --wait` (pip download included) against the fake server; what it received."""
    from support.fake_server import FakeKaggle
    from kagglesdk import kaggle_env

    from guie_cli.kaggle_cmds import register

    home = tmp_path_factory.mktemp("push-home")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("KAGGLE_API_TOKEN", "KAGGLE_API_ENVIRONMENT", "HTTP_PROXY", "http_proxy"):
            mp.delenv(name, raising=False)
        mp.setenv("HOME", str(home))
        mp.setenv("KAGGLE_CONFIG_DIR", str(home / ".kaggle"))
        mp.setenv("KAGGLE_USERNAME", USERNAME)
        mp.setenv("KAGGLE_KEY", KEY)
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        server = FakeKaggle(USERNAME, KEY).start()
        mp.setitem(kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.PROD, server.url)
        parser = argparse.ArgumentParser()
        register(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(["push", "--config", "smoke", "--workdir", str(home / "work"),
                                  "--poll-s", "0", "--wait"])
        try:
            assert args.func(args) == 0
        finally:
            server.stop()
    notebooks = {json.loads(b["text"])["metadata"]["papermill"]["input_path"]: b["text"]
                 for b in server.rpc_calls("SaveKernel")}
    return server, notebooks


def _mount_datasets(server, input_root: Path, layout: str, archives: str) -> None:
    for ref in (SRC, WHEELS):
        mount_uploaded(server.datasets[ref].versions[-1], ref, input_root, layout, archives)


def test_probe_kernel_records_the_stand_in(kaggle_image, tmp_path):
    """The probe notebook, built as `submit.py probe` builds it, run in the stand-in (first:
    the training kernel below installs open_clip into the shared stand-in)."""
    from guie.kaggle.notebooks import plan_probe, write_kernel

    folder = write_kernel(plan_probe(USERNAME), tmp_path / "kernels")
    inputs = tmp_path / "input"
    mount_uploaded({"x.txt": b"x"}, SRC, inputs, "current", "unpacked")
    out = tmp_path / "working"
    out.mkdir()
    _execute(kaggle_image, folder / "probe.ipynb", tmp_path / "probe-run.ipynb", tmp_path,
             input_root=inputs, out_dir=out)
    record = json.loads((out / "guie-platform.json").read_text())
    assert record["layout"] == "current" and record["listing"]["datasets"] == [USERNAME]
    assert record["executable"] == str(kaggle_image)  # the kernel ran in the stand-in
    assert record["importable"]["open_clip"] is False and record["importable"]["torch"] is True
    assert record["packages"]["ftfy"] is None and record["packages"]["timm"]
    assert record["gpu"]["available"] is False


def test_pushed_kernels_train_and_export_on_a_kaggle_like_runtime(kaggle_image, pushed, tmp_path):
    server, notebooks = pushed
    wheels = server.datasets[WHEELS].versions[-1]
    assert sorted(n for n in wheels if n.endswith(".whl")) == [
        "ftfy-6.3.1-py3-none-any.whl", "open_clip_torch-3.3.0-py3-none-any.whl"]  # the registry's
    for name, text in notebooks.items():
        (tmp_path / name).write_text(text)

    # 1. today's layout, source unpacked: train from scratch
    current = tmp_path / "current" / "input"
    _mount_datasets(server, current, "current", "unpacked")
    train_out = tmp_path / "train-working"
    train_out.mkdir()
    _execute(kaggle_image, tmp_path / "train.ipynb", tmp_path / "train-run.ipynb", tmp_path,
             input_root=current, out_dir=train_out)
    run = json.loads((train_out / "guie-run.json").read_text())
    assert run["status"] == "done" and run["config_name"] == "smoke"
    assert (train_out / "stage2" / "final.pt").is_file()

    # 2. the legacy layout, source kept as a zip: a second session resumes (nothing left to do)
    legacy = tmp_path / "legacy" / "input"
    _mount_datasets(server, legacy, "legacy", "zip")
    assert (legacy / "guie-kit-src" / "src.zip").is_file()
    mount_notebook_output(train_out, TRAIN, legacy, "legacy")
    resumed = tmp_path / "resumed-working"
    resumed.mkdir()
    _execute(kaggle_image, tmp_path / "train.ipynb", tmp_path / "resume-run.ipynb", tmp_path,
             input_root=legacy, out_dir=resumed, resume_input=f"notebook:{TRAIN}")
    assert json.loads((resumed / "guie-run.json").read_text())["status"] == "done"

    # 3. inference in today's layout on the training output, then the contract in a fresh process
    mount_notebook_output(train_out, TRAIN, current, "current")
    infer_out = tmp_path / "infer-working"
    infer_out.mkdir()
    _execute(kaggle_image, tmp_path / "infer.ipynb", tmp_path / "infer-run.ipynb", tmp_path,
             input_root=current, out_dir=infer_out)
    with zipfile.ZipFile(infer_out / "submission.zip") as zf:
        assert zf.namelist() == ["saved_model.pt"]
        zf.extract("saved_model.pt", tmp_path / "host")
    host = ("import torch\n"
            "m = torch.jit.load('saved_model.pt')\n"
            "for h, w in ((300, 1200), (512, 512), (1, 7)):\n"
            "    x = torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8)\n"
            "    y = m(x)\n"
            "    assert y.dtype == torch.float32 and tuple(y.shape) == (1, 64), y.shape\n"
            "    assert abs(float(y.norm()) - 1) < 1e-3\n"
            "print('contract ok')")
    done = subprocess.run([str(kaggle_image), "-c", host], capture_output=True, text=True,
                          cwd=tmp_path / "host", env=_clean_env(tmp_path))
    assert done.returncode == 0 and "contract ok" in done.stdout, done.stderr
