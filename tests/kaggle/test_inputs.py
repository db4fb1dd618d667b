"""Resolving attached inputs in any mount layout (`guie.kaggle.inputs`), and Kaggle's machines."""
from __future__ import annotations

import json

import pytest

from guie.kaggle import platform
from guie.kaggle.emulate import mount_notebook_output, mount_point
from guie.kaggle.inputs import (SOURCE_MARKER, InputNotFound, InputRef, parse_weights_ref,
                                resolve_input, resolve_kaggle_path)


@pytest.mark.parametrize("text, parsed", [
    ("dataset:alice/guie-src", InputRef("dataset", "alice", "guie-src")),
    ("notebook:alice/guie-train-smoke", InputRef("notebook", "alice", "guie-train-smoke")),
    ("competition:google-universal-image-embedding",
     InputRef("competition", "", "google-universal-image-embedding")),
])
def test_references_parse_and_print_back(text, parsed):
    assert InputRef.parse(text) == parsed and str(parsed) == text


@pytest.mark.parametrize("bad", ["alice/guie-src", "model:alice/x", "dataset:alice", "dataset:/x",
                                 "competition:a/b", "notebook:a/b/c"])
def test_bad_references_say_the_form(bad):
    with pytest.raises(ValueError, match="expected"):
        InputRef.parse(bad)


@pytest.mark.parametrize("kind, current", [
    ("dataset", "datasets/alice/guie-src"), ("notebook", "notebooks/alice/guie-src")])
def test_current_then_legacy_layout(tmp_path, kind, current):
    ref = f"{kind}:alice/guie-src"
    (tmp_path / "guie-src").mkdir()
    assert resolve_input(ref, tmp_path) == tmp_path / "guie-src"  # legacy only
    (tmp_path / current).mkdir(parents=True)
    assert resolve_input(ref, tmp_path) == tmp_path / current  # current wins


def test_competition_data_in_both_layouts(tmp_path):
    ref = "competition:google-universal-image-embedding"
    (tmp_path / "competitions" / "google-universal-image-embedding").mkdir(parents=True)
    assert resolve_input(ref, tmp_path).parent.name == "competitions"


def test_marker_search_finds_an_input_under_another_name(tmp_path):
    """A layout neither form predicts: the kit's marker is found by a bounded search."""
    elsewhere = tmp_path / "mounts" / "v3" / "guie-kit-src-renamed"
    elsewhere.mkdir(parents=True)
    (elsewhere / SOURCE_MARKER).write_text(json.dumps({"hash": "ab"}))
    # a folder at the expected place without the marker is not taken
    (tmp_path / "datasets" / "alice" / "guie-kit-src").mkdir(parents=True)
    assert resolve_input("dataset:alice/guie-kit-src", tmp_path, marker=SOURCE_MARKER) == elsewhere
    deep = tmp_path / "a" / "b" / "c" / "d" / "e" / "guie"
    deep.mkdir(parents=True)
    (deep / SOURCE_MARKER).write_text("{}")
    (elsewhere / SOURCE_MARKER).unlink()
    with pytest.raises(InputNotFound):  # the search is bounded
        resolve_input("dataset:alice/guie-kit-src", tmp_path, marker=SOURCE_MARKER)


def test_a_missing_input_names_the_reference_and_lists_two_levels(tmp_path):
    for folder in ("datasets/bob/other-data/deeper", "notebooks/bob/a-run"):
        (tmp_path / folder).mkdir(parents=True)
    with pytest.raises(InputNotFound) as error:
        resolve_input("dataset:alice/guie-kit-wheels", tmp_path, marker="guie-wheels.json")
    text = str(error.value)
    assert text.startswith("dataset:alice/guie-kit-wheels: not attached")
    assert "datasets/bob/" in text and "notebooks/bob/" in text and "deeper" not in text
    assert "Attach alice/guie-kit-wheels" in text
    with pytest.raises(InputNotFound, match="does not exist"):
        resolve_input("dataset:alice/x", tmp_path / "no-such-root")


def test_a_notebook_output_link_resolves_without_looping(tmp_path):
    out = tmp_path / "out"
    (out / "kaggle").mkdir(parents=True)
    inputs = out / "kaggle" / "input"  # as in `submit.py local`: the output holds the input root
    mount_notebook_output(out, "alice/guie-train-smoke", inputs, "current")
    (out / "guie-run.json").write_text("{}")
    assert resolve_input("notebook:alice/guie-train-smoke", inputs, marker="guie-run.json") == \
        inputs / "notebooks" / "alice" / "guie-train-smoke"
    with pytest.raises(InputNotFound):
        resolve_input("dataset:alice/absent", inputs, marker="absent.json")


def test_weights_references(tmp_path):
    assert parse_weights_ref("kaggle:alice/w/sub/f.bin") == (InputRef("dataset", "alice", "w"),
                                                            "sub/f.bin")
    with pytest.raises(ValueError, match="kaggle:OWNER/SLUG/FILE"):
        parse_weights_ref("kaggle:alice")
    assert resolve_kaggle_path("/a/local/file.bin", tmp_path) == "/a/local/file.bin"
    folder = mount_point("dataset:alice/w", tmp_path, "current")
    folder.mkdir(parents=True)
    (folder / "f.bin").write_bytes(b"x")
    assert resolve_kaggle_path("kaggle:alice/w/f.bin", tmp_path) == str(folder / "f.bin")
    assert resolve_kaggle_path("kaggle:alice/w", tmp_path) == str(folder)
    with pytest.raises(InputNotFound, match="it has no 'g.bin'"):
        resolve_kaggle_path("kaggle:alice/w/g.bin", tmp_path)


# ----------------------------------------------------------------------------- machines


# kaggle-cli docs/kernels.md, "Accelerators available as of Feb 2026" (field guide 5a).
DOCUMENTED = ("NvidiaTeslaP100", "TpuV38", "NvidiaTeslaT4", "NvidiaTeslaT4Highmem", "Tpu1VmV38",
              "NvidiaTeslaA100", "NvidiaL4", "TpuV5E8", "NvidiaL4X1", "TpuV6E8", "NvidiaH100",
              "NvidiaRtxPro6000")


@pytest.mark.parametrize("name", DOCUMENTED)
def test_every_documented_machine_name_is_known_and_only_the_p100_refused(name):
    if name == "NvidiaTeslaP100":
        with pytest.raises(platform.PlatformError, match="retired the P100 in September 2026"):
            platform.check_machine_shape(name)
        assert name not in platform.MACHINE_SHAPES  # never planned for
        return
    shape = platform.MACHINE_SHAPES[name]
    warnings = platform.check_machine_shape(name)
    if name == "NvidiaTeslaT4":  # the documented 2xT4, 15 GiB each; PyTorch allocates 14.56
        assert warnings == [] and (shape.gpus, shape.gpu_memory_gib) == (2, 15.0)
        assert shape.allocatable_gib == 14.56 and not shape.unconfirmed
    elif shape.gpus:  # count or memory not documented: said so, and how to find out
        assert shape.unconfirmed and any("unconfirmed" in w and f"probe --machine-shape {name}"
                                         in w for w in warnings)
    else:
        assert shape.compute_capability is None and any("a TPU" in w for w in warnings)
    if name != "NvidiaTeslaT4":  # some are for specific competitions or admins only
        assert any("Kaggle refuses the push" in w for w in warnings)


def test_an_unknown_machine_name_is_sent_as_given_with_a_warning():
    (warning,) = platform.check_machine_shape("NvidiaB200")
    assert "not a name Kaggle documents" in warning and "Kaggle's answer decides" in warning
    assert "NvidiaL4X1" in warning  # the names it does document


def test_a_probe_record_of_the_shape_gives_its_gpus_and_allocatable_memory(tmp_path):
    assert platform.machine_shape("NvidiaL4", tmp_path).gpus == 1  # no record: the table's guess
    record = {"machine_shape": "NvidiaL4", "gpu": {"devices": [
        {"name": "NVIDIA L4", "memory_gib": 22.03, "allocatable_gib": 22.03}] * 4}}
    (tmp_path / "platform.json").write_text(json.dumps(record))
    shape = platform.machine_shape("NvidiaL4", tmp_path)
    assert (shape.gpus, shape.allocatable_gib, shape.unconfirmed) == (4, 22.03, "")
    assert platform.machine_shape("NvidiaTeslaT4", tmp_path).allocatable_gib == 14.56  # another
    assert platform.machine_shape("NvidiaB200", tmp_path) is None


def test_gpu_check_stops_with_a_clear_message_when_the_build_lacks_the_arch(monkeypatch):
    """What a P100 under Kaggle's current PyTorch does: every CUDA op fails."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla P100-PCIE-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_70", "sm_75", "sm_80"])

    def no_kernel(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
    monkeypatch.setattr(torch, "ones", no_kernel)
    with pytest.raises(platform.PlatformError) as error:
        platform.check_gpu_runs()
    assert "Tesla P100-PCIE-16GB (sm_60) cannot run this PyTorch" in str(error.value)
    assert "sm_70, sm_75, sm_80" in str(error.value) and "NvidiaTeslaT4" in str(error.value)


def test_gpu_check_on_a_cpu_machine():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CPU machine's answer")
    assert platform.check_gpu_runs() == "no GPU: training on the CPU"


def test_platform_facts_prefer_the_probe_record(tmp_path):
    # Kaggle/docker-python moved to 3.12 in December 2025 ("Upgrade to Python 3.12").
    assert platform.platform_facts(tmp_path).python_version == platform.KAGGLE_PYTHON_FALLBACK
    assert platform.KAGGLE_PYTHON_FALLBACK == "3.12"
    assert platform.platform_facts(tmp_path).version_label == "v{}"  # kaggle-cli PR 1201
    (tmp_path / "platform.json").write_text(json.dumps({"python": "3.12.7", "layout": "current",
                                                        "packages": {"timm": "1.0.20"}}))
    facts = platform.platform_facts(tmp_path)
    assert (facts.python_version, facts.layout, facts.packages) == ("3.12", "current",
                                                                    {"timm": "1.0.20"})
    (tmp_path / "platform.json").write_text(json.dumps({"version_label": {"format": "{}"}}))
    assert platform.platform_facts(tmp_path).version_label == "{}"
