"""Kernel notebooks and metadata built from kernels/*.ipynb."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nbformat
import pytest

from guie.config import DataSource
from guie.config_io import apply_overrides
from guie.configs import get_config
from guie.kaggle.emulate import mount_folder, mount_notebook_output, mount_point
from guie.kaggle.inputs import InputNotFound
from guie.config_io import ConfigError
from guie.kaggle.notebooks import (TEMPLATES_DIR, NotebookError, check_training_run,
                                   injected_parameters, kernel_metadata, map_kaggle_paths,
                                   plan_kernels, prepare_resume, record_run, write_kernel)
from guie.kaggle.run_config import (RUN_VARIABLES, config_parameter, load_kernel_config,
                                    resolve_config_inputs, run_identity, weights_datasets)
from guie.kaggle.packaging import WHEEL_REQUIREMENTS, pack_source, write_wheels_marker

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("me/guie-kit-src", "me/guie-kit-wheels")


def plans_for(cfg, **kwargs):
    return plan_kernels(cfg, "smoke", "me", source_ref=SOURCES[0],
                        wheels_ref=SOURCES[1], source_hash="ab" * 32, **kwargs)


@pytest.fixture(scope="module")
def kaggle_cfg():
    from dataclasses import replace

    cfg = get_config("smoke")
    source = DataSource("glr", "tfrecord", "glr-mini", kaggle_slug="someone/glr-mini-tfrecords")
    return replace(cfg, data=replace(cfg.data, sources=(source,)))


@pytest.mark.parametrize("name", ["train", "infer", "probe"])
def test_templates_are_clean_v4_notebooks(name):
    nb = nbformat.read(TEMPLATES_DIR / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4 and nb.metadata.kernelspec.name == "python3"
    assert nb.cells[0].cell_type == "markdown"
    assert nb.cells[1].metadata.tags == ["parameters"]
    # the standard-library resolver is inlined when the kernel is built, not kept in the template
    assert nb.cells[2].metadata.tags == ["guie-inline"]
    assert nb.cells[2].metadata.guie_module.startswith("guie.kaggle.")
    for cell in nb.cells[2:]:
        assert cell.cell_type == "code" and cell.outputs == [] and cell.execution_count is None
        assert len(cell.source.splitlines()) <= 9  # short cells that only call into guie
    code = "\n".join(c.source for c in nb.cells[3:])
    imports = [line.split()[1] for line in code.splitlines()
               if line.startswith(("import ", "from "))]
    assert {i.split(".")[0] for i in imports} <= {"sys", "os", "warnings", "guie", "json"}


def test_plan_metadata(kaggle_cfg):
    plans = plans_for(kaggle_cfg)
    train, infer = plans["train"].metadata, plans["infer"].metadata
    assert train["id"] == "me/guie-train-smoke" and train["title"] == "GUIE train smoke"
    assert infer["id"] == "me/guie-infer-smoke"
    for meta in (train, infer):
        assert meta["language"] == "python" and meta["kernel_type"] == "notebook"
        assert meta["is_private"] is True and meta["enable_gpu"] is True
        assert meta["enable_tpu"] is False and meta["machine_shape"] == "NvidiaTeslaT4"
        assert "enable_internet" in meta
    assert infer["enable_internet"] is False and train["enable_internet"] is False
    assert train["dataset_sources"] == [*SOURCES, "someone/glr-mini-tfrecords"]
    assert infer["dataset_sources"] == list(SOURCES)
    assert infer["competition_sources"] == ["google-universal-image-embedding"]
    assert train["competition_sources"] == []
    assert infer["kernel_sources"] == ["me/guie-train-smoke"]
    # references, never mount paths: the kernels resolve them in whatever layout Kaggle uses
    params = plans["infer"].parameters
    assert params["checkpoint_input"] == "notebook:me/guie-train-smoke"
    assert params["source_input"] == f"dataset:{SOURCES[0]}"
    assert params["wheels_input"] == f"dataset:{SOURCES[1]}"
    assert params["input_root"] == "/kaggle/input"
    run = plans["train"].parameters["run"]
    assert params["expected_run"] == run and run["source_hash"] == "ab" * 32
    assert run == run_identity(kaggle_cfg, "ab" * 32) and run["config_name"] == "smoke"
    # the resolved config itself travels, its Kaggle references unresolved; nothing else
    # describes the experiment (no config name plus overrides, no max_hours or compat knobs)
    for plan in plans.values():
        assert plan.parameters["config"] == config_parameter(kaggle_cfg)
        assert plan.parameters["config"]["data"]["sources"][0]["location"] == "glr-mini"
        assert not {"config_name", "overrides", "max_hours", "compat",
                    "data_root"} & set(plan.parameters)


def test_plan_resume_and_extra_datasets(kaggle_cfg):
    plans = plans_for(kaggle_cfg, resume_kernel="me/guie-train-smoke-part1",
                      extra_datasets=["me/guie-weights-vit-h-14"], private=False,
                      train_internet=True)
    train = plans["train"]
    assert train.metadata["kernel_sources"] == ["me/guie-train-smoke-part1"]
    assert train.parameters["resume_input"] == "notebook:me/guie-train-smoke-part1"
    assert "me/guie-weights-vit-h-14" in plans["infer"].metadata["dataset_sources"]
    assert train.metadata["is_private"] is False and train.metadata["enable_internet"] is True
    assert plans["infer"].metadata["enable_internet"] is False


def test_metadata_checks_title_and_slug():
    with pytest.raises(NotebookError, match="slugify"):
        kernel_metadata("me/guie-train-smoke", "Another title", "train.ipynb", enable_gpu=True,
                        enable_internet=False, dataset_sources=[])
    with pytest.raises(NotebookError, match="owner/slug"):
        kernel_metadata("me/guie-train-smoke", "GUIE train smoke", "train.ipynb", enable_gpu=True,
                        enable_internet=False, dataset_sources=["no-owner"])


@pytest.mark.parametrize("kind", ["train", "infer"])
def test_built_notebook_has_the_parameters_injected(kaggle_cfg, tmp_path, kind):
    plan = plans_for(kaggle_cfg)[kind]
    folder = write_kernel(plan, tmp_path)
    nb = nbformat.read(folder / f"{kind}.ipynb", as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    assert tags[1] == ["parameters"] and tags[2] == ["injected-parameters"]
    namespace: dict = {}
    exec(nb.cells[2].source, namespace)  # the injected cell is plain assignments
    assert {k: namespace[k] for k in plan.parameters} == plan.parameters
    assert injected_parameters(folder / f"{kind}.ipynb") == plan.parameters
    assert all(c.get("outputs", []) == [] for c in nb.cells)
    assert json.loads((folder / "kernel-metadata.json").read_text()) == plan.metadata
    assert str(tmp_path) not in (folder / f"{kind}.ipynb").read_text()  # no local paths


def test_map_kaggle_paths():
    mapped = map_kaggle_paths({"input_root": "/kaggle/input", "out_dir": "/kaggle/working",
                               "data_root": "", "max_hours": 1.0, "other": "/kaggle/inputs"},
                              "/tmp/in", "/tmp/work")
    assert mapped == {"input_root": "/tmp/in", "out_dir": "/tmp/work", "data_root": "",
                      "max_hours": 1.0, "other": "/kaggle/inputs"}


@pytest.mark.parametrize("layout", ["current", "legacy"])
def test_prepare_resume_copies_a_previous_output(tmp_path, layout):
    previous = tmp_path / "prev"
    (previous / "stage1").mkdir(parents=True)
    (previous / "stage1" / "last.pt").write_bytes(b"ckpt")
    record_run(previous, run_identity(get_config("smoke"), "ab" * 32), "stopped")
    inputs = tmp_path / "input"
    assert prepare_resume("", str(tmp_path / "out"), inputs) is False
    with pytest.raises(InputNotFound, match="notebook:me/guie-train-smoke: not attached"):
        prepare_resume("notebook:me/guie-train-smoke", str(tmp_path / "out"), inputs)
    mount_notebook_output(previous, "me/guie-train-smoke", inputs, layout)
    assert prepare_resume("notebook:me/guie-train-smoke", str(tmp_path / "out"), inputs) is True
    assert (tmp_path / "out" / "stage1" / "last.pt").read_bytes() == b"ckpt"


def test_check_training_run_refuses_another_or_an_unfinished_run(tmp_path):
    smoke = get_config("smoke")
    run = run_identity(smoke.replace_stage("stage1", epochs=1), "ab" * 32)
    with pytest.raises(NotebookError, match="holds training run unknown"):
        check_training_run(tmp_path, run)
    record_run(tmp_path, run_identity(smoke, "ab" * 32), "done")
    with pytest.raises(NotebookError, match="previous output: wait until the training kernel"):
        check_training_run(tmp_path, run)
    record_run(tmp_path, run, "paused")
    with pytest.raises(NotebookError, match="'paused', not done"):
        check_training_run(tmp_path, run)
    record_run(tmp_path, run, "done")
    assert check_training_run(tmp_path, run) == str(tmp_path)


def test_a_kernel_loads_the_resolved_config_it_carries(tmp_path):
    cfg = apply_overrides(get_config("smoke"), ["stage1.epochs=1", "export.compat=torch1.11",
                                                "data.root=/kaggle/input", "max_hours=2.5"])
    assert load_kernel_config(config_parameter(cfg), str(tmp_path)) == cfg
    with pytest.raises(ConfigError, match="carries no experiment config"):
        load_kernel_config({}, str(tmp_path))


def test_run_identity_leaves_out_what_may_change_between_sessions():
    """A chain's later session (another max_hours, machine, export mode) continues the same run;
    any field that changes what is trained makes another."""
    smoke = get_config("smoke")
    same = run_identity(smoke, "ab" * 32)
    assert set(RUN_VARIABLES) == {"max_hours", "data.root", "export.compat",
                                  "stages.*.parallel", "stages.*.max_hours"}
    for changed in (replace(smoke, max_hours=3.0),
                    apply_overrides(smoke, ["data.root=/kaggle/input", "export.compat=torch1.11",
                                            "stage2.parallel=fsdp", "stage1.max_hours=0.5"])):
        assert run_identity(changed, "ab" * 32) == same
    for changed in (apply_overrides(smoke, ["stage2.lr_head=0.5"]),
                    apply_overrides(smoke, ["data.heldout_classes=3"]), replace(smoke, seed=1)):
        assert run_identity(changed, "ab" * 32)["run_id"] != same["run_id"]
    assert run_identity(smoke, "cd" * 32)["run_id"] != same["run_id"]
    # the same from the config read back from its JSON (smoke's recipe writes `epochs=4`)
    assert get_config("tiny").stages[0].epochs == 40 and isinstance(smoke.stages[1].epochs, int)
    assert run_identity(load_kernel_config(config_parameter(smoke), "/nowhere"), "ab" * 32) == same


@pytest.mark.parametrize("layout", ["current", "legacy"])
def test_kernel_config_resolves_data_and_weights_references(tmp_path, layout):
    inputs = tmp_path / "input"
    data = mount_point("dataset:someone/glr-mini-tfrecords", inputs, layout)
    (data / "train").mkdir(parents=True)
    weights = mount_point("dataset:me/guie-weights-vit", inputs, layout)
    weights.mkdir(parents=True)
    (weights / "open_clip_pytorch_model.bin").write_bytes(b"w")
    sources = (DataSource("glr", "tfrecord", "glr-mini-tfrecords/train",
                          kaggle_slug="someone/glr-mini-tfrecords"),)
    smoke = get_config("smoke")
    reference = "kaggle:me/guie-weights-vit/open_clip_pytorch_model.bin"
    cfg = resolve_config_inputs(
        replace(smoke, data=replace(smoke.data, sources=sources),
                model=replace(smoke.model, pretrained_path=reference)),
        str(inputs))
    assert cfg.data.sources[0].location == str(data / "train")
    assert cfg.model.pretrained_path == str(weights / "open_clip_pytorch_model.bin")
    assert weights_datasets(replace(cfg, model=replace(
        cfg.model, pretrained_path="kaggle:me/guie-weights-vit/x.bin"))) == ["me/guie-weights-vit"]


def test_plans_attach_the_weights_a_config_references(kaggle_cfg):
    reference = "kaggle:me/guie-weights-vit-h-14/w.bin"
    cfg = replace(kaggle_cfg, model=replace(kaggle_cfg.model, pretrained_path=reference))
    for plan in plans_for(cfg).values():
        assert "me/guie-weights-vit-h-14" in plan.metadata["dataset_sources"]


@pytest.mark.parametrize("layout,archives", [("current", "unpacked"), ("current", "zip"),
                                             ("legacy", "unpacked"), ("legacy", "zip")])
def test_bootstrap_cells_run_against_a_packed_source(kaggle_cfg, tmp_path, layout, archives):
    """The notebook's first cells in a fresh interpreter, against the source dataset mounted as
    uploaded (src/ as src.zip) in either layout, unpacked or kept as a zip."""
    packed = pack_source(REPO / "src" / "guie", tmp_path / "built" / "guie-kit-src",
                         REPO / "datasets-metadata" / "guie-src" / "dataset-metadata.json", "me",
                         [])
    mounted = mount_folder(packed.folder, SOURCES[0], tmp_path / "input", layout, archives)
    assert (mounted / "src.zip").is_file() == (archives == "zip")
    wheels = tmp_path / "built" / "wheels"
    wheels.mkdir()
    write_wheels_marker(wheels, WHEEL_REQUIREMENTS, "3.11")
    mount_folder(wheels, SOURCES[1], tmp_path / "input", layout, archives)
    plan = plans_for(kaggle_cfg)["infer"]
    folder = write_kernel(plan, tmp_path / "kernels")
    params = map_kaggle_paths({**plan.parameters, "source_hash": packed.content_hash},
                              tmp_path / "input", tmp_path / "working")
    nb = nbformat.read(folder / "infer.ipynb", as_version=4)
    assert "def resolve_input(" in nb.cells[3].source  # the inlined resolver
    script = "\n".join([*(f"{k} = {v!r}" for k, v in params.items()), nb.cells[3].source,
                        nb.cells[4].source, nb.cells[5].source, "print(guie.__file__)"])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(mounted))
    bad = script.replace(packed.content_hash, "0" * 64)
    result = subprocess.run([sys.executable, "-c", bad], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=120)
    assert result.returncode != 0 and "SourceMismatchError" in result.stderr
    # a missing source stops within seconds, naming the reference and what the root holds
    shutil.rmtree(mounted)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=30)
    assert result.returncode != 0
    assert f"InputNotFound: dataset:{SOURCES[0]}: not attached" in result.stderr
    assert ("datasets/me/" if layout == "current" else "guie-kit-wheels/") in result.stderr


def test_infer_kernel_attaches_the_data_a_fitted_reduction_reads(kaggle_cfg):
    pca = replace(kaggle_cfg, export=replace(kaggle_cfg.export, reduction="pca"))
    assert "someone/glr-mini-tfrecords" in plans_for(pca)["infer"].metadata["dataset_sources"]
    pooled = replace(kaggle_cfg, export=replace(kaggle_cfg.export, reduction="avg_pool"))
    assert plans_for(pooled)["infer"].metadata["dataset_sources"] == list(SOURCES)


def test_recipe_weights_name_the_dataset_push_weights_creates(tmp_path):
    """README steps 2 and 3 connect: `push-weights open_clip_pytorch_model.bin` creates
    <user>/guie-weights-open-clip-pytorch-model, which third_place reads once push fills in the
    user, and the kernel finds it mounted in either layout."""
    from guie.kaggle.notebooks import slugify_title
    from guie.kaggle.run_config import owner_overrides

    cfg = get_config("third_place")
    overrides = owner_overrides(cfg, "alice")
    slug = slugify_title("guie weights open_clip_pytorch_model")  # what push-weights names it
    assert overrides == [f"model.pretrained_path=kaggle:alice/{slug}/open_clip_pytorch_model.bin"]
    assert owner_overrides(get_config("smoke"), "alice") == []
    weights = mount_point(f"dataset:alice/{slug}", tmp_path, "legacy")
    weights.mkdir(parents=True)
    (weights / "open_clip_pytorch_model.bin").write_bytes(b"w")
    for src in cfg.data.sources:
        mount_point(f"dataset:{src.kaggle_slug}", tmp_path, "current").mkdir(parents=True)
    resolved = load_kernel_config(config_parameter(apply_overrides(cfg, overrides)),
                                  str(tmp_path))
    assert resolved.model.pretrained_path == str(weights / "open_clip_pytorch_model.bin")
    assert resolved.data.sources[0].location == str(
        tmp_path / "datasets" / "motono0223" / "guie-imagenet1k-mini1-tfrecords-label-0-999")
    assert weights_datasets(apply_overrides(cfg, overrides)) == [f"alice/{slug}"]


def test_evaluation_sources_on_kaggle_are_attached_and_resolved(kaggle_cfg, tmp_path):
    from guie.config import EvalSource

    bench = EvalSource("gpr", "gpr1200", "gpr1200-benchmark",
                       kaggle_slug="someone/gpr1200-benchmark")
    cfg = replace(kaggle_cfg, data=replace(kaggle_cfg.data, eval_sources=(bench,)))
    plans = plans_for(cfg)
    assert "someone/gpr1200-benchmark" in plans["train"].metadata["dataset_sources"]
    assert "someone/gpr1200-benchmark" not in plans["infer"].metadata["dataset_sources"]
    for ref in ("dataset:someone/glr-mini-tfrecords", "dataset:someone/gpr1200-benchmark"):
        mount_point(ref, tmp_path, "current").mkdir(parents=True)
    resolved = resolve_config_inputs(cfg, str(tmp_path))
    assert resolved.data.eval_sources[0].location == str(
        tmp_path / "datasets" / "someone" / "gpr1200-benchmark")
