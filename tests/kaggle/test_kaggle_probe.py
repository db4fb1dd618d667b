"""`submit.py probe` then `status --wait`: what Kaggle's platform really is, recorded in
<workdir>/platform.json and used by `push`; through the real client against the fake server."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from guie_cli.main import main
from support.kaggle_fixtures import USERNAME

PROBE = f"{USERNAME}/guie-probe-platform"
SOURCES = ('data.sources=[{"name": "glr", "kind": "tfrecord", "location": "glr", '
           '"kaggle_slug": "someone/glr-mini-tfrecords"}]')


def cli(*argv: str) -> int:
    return main(list(argv))


def nonce_of(body: dict) -> str:
    notebook = json.loads(body["text"])
    (cell,) = [c for c in notebook["cells"]
               if "injected-parameters" in c["metadata"].get("tags", [])]
    namespace: dict = {}
    exec(cell["source"], namespace)
    return namespace["push_nonce"]


def answer_probe(fake, tmp_path: Path, python: str = "3.12.4", gpus: int = 2,
                 mounted: dict[str, bytes] | None = None) -> None:
    """Kaggle's side: each pushed probe version ran and recorded itself (this machine's real
    record, as if it had Kaggle's Python and `gpus` T4s), echoing its push's nonce; the CPU
    version saw the source dataset files `mounted` (the version Kaggle chose to mount)."""
    from guie.kaggle.probe import record_platform

    (tmp_path / "input" / "datasets").mkdir(parents=True, exist_ok=True)
    for version, body in enumerate(fake.rpc_calls("SaveKernel"), 1):
        out = tmp_path / f"probe-v{version}"
        out.mkdir()
        record = record_platform(str(out), str(tmp_path / "input"), nonce_of(body), smoke=False)
        record["python"] = python
        record["packages"]["timm"] = "1.0.9"  # older than open_clip 3.3.0 needs
        if mounted is not None and not body.get("machineShape"):
            record["input_markers"] = [{
                "path": "datasets/fake-user/guie-kit-src/guie-source.json",
                "content": json.loads(mounted["guie-source.json"])}]
        if body.get("machineShape"):  # the GPU session
            t4 = {"name": "Tesla T4", "total_memory": 15828320256, "memory_gib": 14.74,
                  "allocatable_gib": 14.74, "capability": "7.5"}
            record["gpu"] = {"available": True, "count": gpus, "devices": [t4] * gpus}
        outputs = {"guie-platform.json": json.dumps(record).encode(),
                   "guie-push.json": (out / "guie-push.json").read_bytes()}
        fake.add_kernel_run(PROBE, [("COMPLETE", "")], outputs, "", version=version)


def test_probe_records_platform_quota_competition_and_the_version_label(
        fake_kaggle, workdir, wheelhouse, tmp_path, capsys):
    fake_kaggle.set_quota(total_h=31.5, used_h=4.25, reserved_h=0.5)
    assert cli("probe", "--workdir", workdir) == 0
    cpu, gpu = fake_kaggle.rpc_calls("SaveKernel")
    assert cpu["slug"] == gpu["slug"] == PROBE and not gpu.get("datasetDataSources")
    assert not cpu["enableGpu"] and "machineShape" not in cpu  # the older version: no GPU quota
    assert gpu["enableGpu"] and gpu["machineShape"] == "NvidiaTeslaT4"
    assert gpu["enableInternet"] is False
    assert "def record_platform(" in gpu["text"] and "def two_gpu_smoke(" in gpu["text"]
    answer_probe(fake_kaggle, tmp_path)
    capsys.readouterr()
    assert cli("status", "--wait", "--workdir", workdir, "--poll-s", "0") == 0
    out = capsys.readouterr().out
    assert "kernel versions are read with label format v{}" in out
    assert "push uses it from now on" in out
    record = json.loads((Path(workdir) / "platform.json").read_text())
    assert record["python"] == "3.12.4" and record["machine_shape"] == "NvidiaTeslaT4"
    assert record["push_nonce"] == nonce_of(gpu)  # the GPU session's record, not the CPU one's
    assert record["gpu"]["count"] == 2 and record["gpu"]["devices"][0]["allocatable_gib"] == 14.74
    assert record["version_label"]["format"] == "v{}"
    assert record["quota"]["remaining_h"] == pytest.approx(31.5 - 4.25 - 0.5)
    competition = record["competition"]
    assert competition["late"] is True and competition["deadline"].startswith("2022-10-17")
    assert competition["max_daily_submissions"] == 5 and competition["limits"]["allowed_now"] == 5
    # the plan and the gate use what the shape really gave
    from guie.kaggle.platform import machine_shape

    assert machine_shape("NvidiaTeslaT4", workdir).allocatable_gib == 14.74

    assert cli("push", "--workdir", workdir, "--wheels-from", str(wheelhouse), "--poll-s", "0",
               "--kernels", "train", SOURCES) == 0
    out = capsys.readouterr().out
    assert "platform: Python 3.12, current mount layout" in out
    assert ("open_clip_torch will lack what it needs: "
            "timm 1.0.9 is installed, but timm>=1.0.17") in out
    state = json.loads((Path(workdir) / "state.json").read_text())
    assert state["wheels"]["python_version"] == "3.12" and state["probe"]["ref"] == PROBE
    assert json.loads(fake_kaggle.received_files()["guie-wheels.json"])["python_version"] == "3.12"
    # every read names a version in the format the probe found
    labels = {b.get("versionLabel") for b in fake_kaggle.rpc_calls("GetKernelSessionStatus")}
    assert labels == {"v1", "v2"}


def test_probe_finds_the_label_format_kaggle_honours(fake_kaggle, workdir, tmp_path, capsys):
    fake_kaggle.version_labels = "number"  # this Kaggle wants `N`, and refuses `vN`
    assert cli("probe", "--workdir", workdir) == 0
    answer_probe(fake_kaggle, tmp_path)
    assert cli("status", "--wait", "--workdir", workdir, "--poll-s", "0") == 0
    record = json.loads((Path(workdir) / "platform.json").read_text())
    assert record["version_label"]["format"] == "{}"
    assert "Invalid version label 'v1'" in record["version_label"]["tried"]["v{}"]
    capsys.readouterr()
    assert cli("status", "--workdir", workdir) == 0  # from now on reads say `2`, not `v2`
    assert fake_kaggle.rpc_calls("GetKernelSessionStatus")[-1]["versionLabel"] == "2"


@pytest.mark.parametrize("honoured", [True, False])
def test_probe_checks_which_version_a_pinned_dataset_mounts(fake_kaggle, workdir, wheelhouse,
                                                            tmp_path, honoured):
    assert cli("push", "--workdir", workdir, "--wheels-from", str(wheelhouse), "--poll-s", "0",
               "--kernels", "train", SOURCES) == 0
    src = f"{USERNAME}/guie-kit-src"
    fake_kaggle.add_dataset(src, {"guie-source.json": b'{"hash": "the-second-version"}'})
    state_file = Path(workdir) / "state.json"
    state = json.loads(state_file.read_text())
    state["source"]["version"] = 2  # as a later push leaves it
    state_file.write_text(json.dumps(state))
    assert cli("probe", "--workdir", workdir) == 0
    cpu = [b for b in fake_kaggle.rpc_calls("SaveKernel") if b["slug"] == PROBE][0]
    assert cpu["datasetDataSources"] == [f"{src}/1"]  # the previous version, pinned
    versions = fake_kaggle.datasets[src].versions
    assert len(fake_kaggle.kernels[PROBE].versions) == 2
    answer_probe(_only_probe(fake_kaggle), tmp_path, mounted=versions[0 if honoured else 1])
    assert cli("status", "--wait", "--workdir", workdir, "--poll-s", "0") == 0
    pinned = json.loads((Path(workdir) / "platform.json").read_text())["pinned_inputs"]
    assert pinned["attached"] == f"{src}/1" and pinned["honoured"] is honoured
    assert pinned["expected_hash"] == json.loads(versions[0]["guie-source.json"])["hash"]


class _only_probe:
    """The fake seen through its probe kernel's pushes only (the tests' answer_probe numbers
    versions by SaveKernel order)."""

    def __init__(self, fake):
        self.fake = fake

    def rpc_calls(self, method: str) -> list[dict]:
        return [b for b in self.fake.rpc_calls(method) if b.get("slug") == PROBE]

    def add_kernel_run(self, *args, **kwargs) -> None:
        self.fake.add_kernel_run(*args, **kwargs)


def test_the_two_gpu_smoke_step_runs_under_torchrun_and_never_fails_the_probe():
    """The NCCL + FSDP step the probe runs where two GPUs exist, here on two CPU processes with
    gloo (the same script, backend swapped); on one GPU it is skipped."""
    from guie.kaggle.probe import two_gpu_smoke

    assert two_gpu_smoke(1) == {"ran": False, "why": "1 GPU(s): needs two"}
    result = two_gpu_smoke(2, backend="gloo", timeout_s=300)
    assert result["ok"], result
    (attempt,) = result["attempts"]
    assert attempt["all_reduce_ok"] and attempt["fsdp_step_ok"] and attempt["world_size"] == 2
    broken = two_gpu_smoke(2, backend="no-such-backend", timeout_s=120)
    assert broken["ran"] and not broken["ok"] and len(broken["attempts"]) == 2  # P2P off retried


@pytest.fixture
def workdir(tmp_path: Path) -> str:
    return str(tmp_path / "work")
