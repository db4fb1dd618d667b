"""`push`, `status`, `submit`, `leaderboard`, `push-weights` end to end against the fake server."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from support.kaggle_fixtures import KEY, USERNAME
from support.fake_server import default_leaderboard
from guie.kaggle.packaging import tree_hash
from guie_cli.main import main

SOURCES = ('data.sources=[{"name": "glr", "kind": "tfrecord", "location": "glr", '
           '"kaggle_slug": "someone/glr-mini-tfrecords"}]')
SRC, WHEELS = f"{USERNAME}/guie-kit-src", f"{USERNAME}/guie-kit-wheels"
TRAIN, INFER = f"{USERNAME}/guie-train-smoke", f"{USERNAME}/guie-infer-smoke"


def cli(*argv: str) -> int:
    """The command line's own entry point, in this process (user errors exit 2)."""
    return main(list(argv))


@pytest.fixture
def workdir(tmp_path: Path) -> str:
    return str(tmp_path / "work")


@pytest.fixture
def pushed(fake_kaggle, workdir, wheelhouse):
    assert cli("push", "--workdir", workdir, "--wheels-from", str(wheelhouse), "--poll-s", "0",
               "--wait", SOURCES) == 0
    return fake_kaggle


def notebook_parameters(save_kernel_body: dict) -> dict:
    notebook = json.loads(save_kernel_body["text"])
    injected = [c for c in notebook["cells"]
                if "injected-parameters" in c["metadata"].get("tags", [])]
    namespace: dict = {}
    exec(injected[0]["source"], namespace)
    return {k: v for k, v in namespace.items() if not k.startswith("__")}


def assert_no_key_sent(fake_kaggle) -> None:
    for body in fake_kaggle.raw_bodies:
        assert KEY.encode() not in body
    for name, data in fake_kaggle.received_files().items():
        assert KEY.encode() not in data, name


# ----------------------------------------------------------------------------- push


def test_push_dry_run_sends_nothing(fake_kaggle, workdir, wheelhouse, capsys):
    assert cli("push", "--dry-run", "--workdir", workdir, "--wheels-from", str(wheelhouse),
               SOURCES) == 0
    assert [name for name, _ in fake_kaggle.calls] == ["GetAcceleratorQuotaStatistics"]  # a read
    out = capsys.readouterr().out
    assert "nothing is sent" in out and f"dataset {SRC}" in out and "src/guie/__init__.py" in out
    assert "GPU quota: not reported by Kaggle; assuming about 30 h" in out  # the estimate, marked
    assert f"kernel {TRAIN}" in out and f"kernel {INFER}" in out and "train.ipynb" in out
    assert '"enable_internet": false' in out and "someone/glr-mini-tfrecords" in out
    assert (Path(workdir) / "kernels" / "guie-infer-smoke" / "kernel-metadata.json").exists()


def test_push_dry_run_works_without_credentials(fake_kaggle, workdir, monkeypatch, capsys):
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    home = Path(os.environ["HOME"])
    before = sorted(home.rglob("*"))
    assert cli("push", "--dry-run", "--workdir", workdir) == 0
    out = capsys.readouterr().out
    assert "your-kaggle-username/guie-kit-src" in out
    assert "warning: no Kaggle credentials found" in out
    assert (f"{home}/.kaggle/kaggle.json when {home}/.kaggle exists, "
            f"else {home}/.config/kaggle") in out
    assert "KAGGLE_API_TOKEN" in out
    assert fake_kaggle.calls == []
    assert sorted(home.rglob("*")) == before  # a dry run writes nothing to the user's home


def test_push_sends_datasets_and_both_kernels(fake_kaggle, workdir, wheelhouse, capsys):
    fake_kaggle.stale_version_polls = 3  # only matters for the second push below
    assert cli("push", "--workdir", workdir, "--wheels-from", str(wheelhouse), "--poll-s", "0",
               "--wait", SOURCES) == 0
    fake = fake_kaggle
    created = {c["slug"]: c for c in fake.rpc_calls("CreateDataset")}
    assert set(created) == {"guie-kit-src", "guie-kit-wheels"}
    assert all(c["isPrivate"] for c in created.values())
    files = fake.received_files()
    assert "src.zip/guie/__init__.py" in files and "src.zip/guie/kaggle/client.py" in files
    assert "guie-source.json" in files and "guie-wheels.json" in files  # the kernels' markers
    assert not [n for n in files if "__pycache__" in n or n.endswith(".pyc")]
    assert "open_clip_torch-3.3.0-py3-none-any.whl" in files
    uploaded_hash = tree_hash({n[len("src.zip/guie/"):]: d for n, d in files.items()
                               if n.startswith("src.zip/guie/")})

    saved = {body["slug"]: body for body in fake.rpc_calls("SaveKernel")}
    train, infer = saved[TRAIN], saved[INFER]
    # the exact versions this push left current, pinned (owner/slug/N)
    assert train["datasetDataSources"] == [f"{SRC}/1", f"{WHEELS}/1", "someone/glr-mini-tfrecords"]
    assert infer["datasetDataSources"] == [f"{SRC}/1", f"{WHEELS}/1"]
    assert infer["competitionDataSources"] == ["google-universal-image-embedding"]
    assert infer["kernelDataSources"] == [TRAIN]
    for body in (train, infer):
        assert body["enableInternet"] is False and body["enableGpu"] is True
        assert body["isPrivate"] is True and body["language"] == "python"
    params = notebook_parameters(train)
    # the resolved config, as data: the override applied, the source still a Kaggle reference,
    # the session budget Kaggle needs where the config sets none
    config = params["config"]
    assert config["name"] == "smoke" and config["max_hours"] == 11.0
    assert config["data"]["sources"] == [{**config["data"]["sources"][0], "location": "glr",
                                          "kaggle_slug": "someone/glr-mini-tfrecords"}]
    assert notebook_parameters(infer)["config"] == config
    assert params["source_hash"] == uploaded_hash  # the notebook checks what was uploaded
    assert params["source_input"] == f"dataset:{SRC}"
    assert notebook_parameters(infer)["checkpoint_input"] == f"notebook:{TRAIN}"
    assert notebook_parameters(infer)["expected_run"] == params["run"]
    assert_no_key_sent(fake)
    # the inference kernel went out only after the training kernel had finished
    order = [name for name, _ in fake.calls if name in ("SaveKernel", "GetKernelSessionStatus")]
    assert (order[0] == "SaveKernel" and order[-1] == "SaveKernel"
            and "GetKernelSessionStatus" in order)

    out = capsys.readouterr().out
    assert "https://www.kaggle.com/code/fake-user/guie-train-smoke" in out
    state = json.loads((Path(workdir) / "state.json").read_text())
    assert state["kernels"]["infer"] == {"ref": INFER, "url": f"https://www.kaggle.com/code/{INFER}",
                                         "version": 1, "run": params["run"],
                                         "nonce": notebook_parameters(infer)["push_nonce"]}
    assert state["wheels"]["python_version"] == "3.12"  # no probe record: the kit's fallback
    assert (state["source"]["version"], state["wheels"]["version"]) == (1, 1)


def built_config(workdir: str, kind: str) -> dict:
    from guie.kaggle.notebooks import injected_parameters

    return injected_parameters(Path(workdir) / "kernels" / f"guie-{kind}-smoke"
                               / f"{kind}.ipynb")["config"]


def test_push_flags_are_config_fields_one_knob_each(fake_kaggle, workdir):
    """--max-hours, --compat and --data-root set max_hours, export.compat and data.root in the
    config the kernels receive; left out, the config's own value holds. `--compat none` undoes
    a config's torch1.11 (the export reads export.compat only)."""
    assert cli("push", "--dry-run", "--workdir", workdir, "export.compat=torch1.11",
               "max_hours=5", "data.root=/elsewhere") == 0
    for kind in ("train", "infer"):
        config = built_config(workdir, kind)
        assert (config["export"]["compat"], config["max_hours"], config["data"]["root"]) == \
            ("torch1.11", 5.0, "/elsewhere")
    assert cli("push", "--dry-run", "--workdir", workdir, "export.compat=torch1.11",
               "max_hours=5", "--compat", "none", "--max-hours", "2.5",
               "--data-root", "/kaggle/input") == 0
    for kind in ("train", "infer"):
        config = built_config(workdir, kind)
        assert (config["export"]["compat"], config["max_hours"], config["data"]["root"]) == \
            ("none", 2.5, "/kaggle/input")
    # the run is the same whatever the session budget, the data root or the export mode
    from guie.kaggle.notebooks import injected_parameters

    train = Path(workdir) / "kernels" / "guie-train-smoke" / "train.ipynb"
    first = injected_parameters(train)["run"]
    assert cli("push", "--dry-run", "--workdir", workdir, "--max-hours", "7") == 0
    assert injected_parameters(train)["run"] == first
    assert cli("push", "--dry-run", "--workdir", workdir, "stage2.lr_head=0.5") == 0
    assert injected_parameters(train)["run"]["run_id"] != first["run_id"]


def test_push_without_wait_sends_training_only_and_says_what_next(fake_kaggle, workdir, wheelhouse,
                                                                   capsys):
    assert cli("push", "--workdir", workdir, "--wheels-from", str(wheelhouse), "--poll-s", "0",
               SOURCES) == 0
    assert [b["slug"] for b in fake_kaggle.rpc_calls("SaveKernel")] == [TRAIN]
    out = capsys.readouterr().out
    assert "status --wait`, then `submit.py push --config smoke --kernels infer`" in out


def test_a_new_source_version_is_awaited_by_number_not_by_ready(pushed, workdir, wheelhouse,
                                                                 monkeypatch, capsys):
    """Right after a new version the status still reads ready (the old version's): kernels pushed
    then would mount the old source. Push waits until the version number has gone up."""
    pushed.stale_version_polls = 3
    state = json.loads((Path(workdir) / "state.json").read_text())
    state["source"]["hash"] = "changed"  # as if the source had changed since the last push
    (Path(workdir) / "state.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert cli("push", "--workdir", workdir, "--wheels-from", str(wheelhouse), "--poll-s", "0",
               "--kernels", "train", SOURCES) == 0
    polls = [name for name, _ in pushed.calls]
    last_version = len(polls) - 1 - polls[::-1].index("CreateDatasetVersion")
    waited = polls[last_version:polls.index("SaveKernel", last_version)]
    assert waited.count("GetDataset") >= 4  # 3 stale answers, then the new number
    assert f"dataset {SRC}: version 2 ready" in capsys.readouterr().out


def test_push_refuses_only_the_retired_p100_and_shows_kaggles_own_refusal(
        fake_kaggle, workdir, wheelhouse, capsys):
    assert cli("push", "--workdir", workdir, "--machine-shape", "NvidiaTeslaP100") == 2
    assert "retired the P100 in September 2026" in capsys.readouterr().err
    assert fake_kaggle.calls == []  # refused before anything was sent
    # a name the kit does not know goes out as given; Kaggle's answer is shown verbatim
    assert cli("push", "--workdir", workdir, "--wheels-from", str(wheelhouse), "--poll-s", "0",
               "--kernels", "train", "--machine-shape", "NvidiaB200") == 2
    out, err = capsys.readouterr()
    assert "not a name Kaggle documents" in out
    assert "HTTP 400: Machine shape 'NvidiaB200' is not available." in err
    # a documented name this account may not use: the same, Kaggle decides
    fake_kaggle.machine_shapes.discard("NvidiaRtxPro6000")
    assert cli("push", "--workdir", workdir, "--wheels-from", str(wheelhouse), "--poll-s", "0",
               "--kernels", "train", "--machine-shape", "NvidiaRtxPro6000") == 2
    out, err = capsys.readouterr()
    assert "unconfirmed: the GPU count and memory" in out and "Kaggle refuses the push" in out
    assert "Machine shape 'NvidiaRtxPro6000' is not available." in err
    assert fake_kaggle.kernels == {}
    assert cli("push", "--workdir", workdir, "--wheels-from", str(wheelhouse), "--poll-s", "0",
               "--kernels", "train", "--machine-shape", "NvidiaL4X1") == 0
    assert fake_kaggle.rpc_calls("SaveKernel")[-1]["machineShape"] == "NvidiaL4X1"


def test_push_dry_run_names_the_weights_and_warns_without_them(fake_kaggle, workdir, capsys):
    assert cli("push", "--dry-run", "--workdir", workdir, "model.backbone=ViT-H-14") == 0
    assert "starts from RANDOM weights" in capsys.readouterr().out
    assert cli("push", "--dry-run", "--workdir", workdir,
               "model.pretrained_path=kaggle:fake-user/guie-weights-vit/w.bin") == 0
    out = capsys.readouterr().out
    assert "weights: kaggle:fake-user/guie-weights-vit/w.bin (attached from Kaggle)" in out
    assert '"fake-user/guie-weights-vit"' in out  # in both kernels' dataset_sources
    assert "Kaggle's 20 GB cap: fits" in out


def test_push_dry_run_shows_the_plan_of_a_real_recipe(fake_kaggle, workdir, capsys):
    """third_place on 2xT4 from the shipped ViT-H-14 measurement (no CPU measuring in a dry run)."""
    assert cli("push", "--dry-run", "--workdir", workdir, "--config", "third_place") == 0
    out = capsys.readouterr().out
    assert "plan for `third_place` on NvidiaTeslaT4" in out and "weekly GPU quota" in out
    assert "preflight: " in out  # the gate's verdict, shown rather than enforced


def test_second_push_reuses_unchanged_datasets(pushed, workdir, wheelhouse):
    pushed.add_kernel_run(TRAIN, [("COMPLETE", "")], {}, "")
    calls_before = len(pushed.calls)
    assert cli("push", "--workdir", workdir, "--wheels-from", str(wheelhouse), "--poll-s", "0",
               "--kernels", "infer", SOURCES) == 0
    new = [name for name, _ in pushed.calls[calls_before:]]
    assert "CreateDatasetVersion" not in new and "CreateDataset" not in new and "PUT" not in new
    assert new.count("SaveKernel") == 1
    state = json.loads((Path(workdir) / "state.json").read_text())
    assert state["kernels"]["infer"]["version"] == 2 and state["kernels"]["train"]["version"] == 1


def test_push_reports_a_slug_conflict(fake_kaggle, workdir, wheelhouse, capsys):
    fake_kaggle.fail("CreateDataset", 409,
                     message="The dataset slug 'guie-kit-src' is already in use")
    assert cli("push", "--workdir", workdir, "--wheels-from", str(wheelhouse),
               "--poll-s", "0") == 2  # a user error
    assert "already in use" in capsys.readouterr().err
    assert fake_kaggle.rpc_calls("SaveKernel") == []


def test_push_with_bad_credentials_says_so(fake_kaggle, workdir, wheelhouse, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_KEY", "wrong-key-0000000000")
    assert cli("push", "--workdir", workdir, "--wheels-from", str(wheelhouse),
               "--poll-s", "0") == 2  # a user error
    assert "refused the credentials of user 'fake-user'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- status


def test_status_wait_downloads_outputs_and_shows_a_failure(pushed, workdir, capsys):
    log = json.dumps([{"stream_name": "stderr", "time": 1.0,
                       "data": "Traceback: CUDA out of memory\n"}])
    pushed.add_kernel_run(TRAIN, [("RUNNING", ""), ("COMPLETE", "")],
                          {"report.json": b'{"status": "done"}', "stage1/final.pt": b"ckpt"}, "[]")
    pushed.add_kernel_run(INFER, [("ERROR", "Notebook failed")], {}, log)
    assert cli("status", "--wait", "--workdir", workdir, "--poll-s", "0") == 1
    out = capsys.readouterr().out
    assert "train  fake-user/guie-train-smoke: COMPLETE" in out
    assert "infer  failure: Notebook failed" in out and "CUDA out of memory" in out
    outputs = Path(workdir) / "outputs"
    assert (outputs / "guie-train-smoke" / "stage1" / "final.pt").read_bytes() == b"ckpt"
    assert (outputs / "guie-infer-smoke" / "guie-infer-smoke.log").exists()


def test_status_without_wait(pushed, workdir, capsys):
    listings = len(pushed.rpc_calls("ListKernelSessionOutput"))
    assert cli("status", "--workdir", workdir) == 0
    assert "infer  fake-user/guie-infer-smoke version 1: RUNNING" in capsys.readouterr().out
    assert len(pushed.rpc_calls("ListKernelSessionOutput")) == listings  # nothing downloaded


# ----------------------------------------------------------------------------- submit


def complete_infer(fake) -> None:
    fake.add_kernel_run(INFER, [("COMPLETE", "")], {"submission.zip": b"PK"}, "")


def test_submit_sends_one_code_submission(pushed, workdir, monkeypatch, capsys):
    complete_infer(pushed)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # not a terminal: no prompt
    assert cli("submit", "--workdir", workdir) == 0
    sent = pushed.rpc_calls("CreateCodeSubmission")
    assert len(sent) == 1 and sent[0]["kernelSlug"] == "guie-infer-smoke"
    assert sent[0]["kernelVersion"] == 1 and sent[0]["fileName"] == "submission.zip"
    assert sent[0]["submissionDescription"].startswith("exp=smoke commit=")
    assert "4 left today" in capsys.readouterr().out
    assert json.loads((Path(workdir) / "state.json").read_text())["submissions"][0]["version"] == 1


def test_submit_dry_run_sends_nothing(pushed, workdir, capsys):
    before = len(pushed.calls)
    assert cli("submit", "--dry-run", "--version", "3", "--workdir", workdir) == 0
    assert len(pushed.calls) == before
    assert "would submit fake-user/guie-infer-smoke version 3" in capsys.readouterr().out


def test_submit_refuses_a_kernel_that_has_not_finished(pushed, workdir, capsys):
    assert cli("submit", "--workdir", workdir, "--yes") == 2  # a user error
    assert "RUNNING" in capsys.readouterr().err and pushed.rpc_calls("CreateCodeSubmission") == []


def test_rejected_submission(pushed, workdir, capsys):
    complete_infer(pushed)
    pushed.reject_submission = "Submission file submission.zip not found"
    assert cli("submit", "--workdir", workdir, "--yes") == 2
    assert "rejected by Kaggle: Submission file submission.zip not found" in capsys.readouterr().err
    assert len(pushed.rpc_calls("CreateCodeSubmission")) == 1


def test_daily_cap_reached(pushed, workdir, capsys):
    complete_infer(pushed)
    for i in range(5):
        pushed.add_submission(f"exp=smoke #{i}")
    assert cli("submit", "--workdir", workdir, "--yes") == 2
    assert "daily submission cap is reached" in capsys.readouterr().err
    assert pushed.rpc_calls("CreateCodeSubmission") == []


# ----------------------------------------------------------------------------- leaderboard


def test_leaderboard_appends_history_and_plots(fake_kaggle, workdir, capsys):
    fake_kaggle.add_submission("exp=smoke commit=abc kernel=x v=1", public="0.41")
    fake_kaggle.leaderboard = default_leaderboard(5)
    assert cli("leaderboard", "--workdir", workdir, "--top", "3", "--download") == 0
    assert cli("leaderboard", "--workdir", workdir, "--top", "3") == 0
    work = Path(workdir)
    history = (work / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 1 + 3  # header, own submission, top 3; the second run added nothing
    assert (work / "history.png").stat().st_size > 0
    assert zipfile.is_zipfile(work / "google-universal-image-embedding.zip")
    out = capsys.readouterr().out
    assert "0.4100" in out and "team 0" in out


# ----------------------------------------------------------------------------- push-weights


def test_push_weights(fake_kaggle, workdir, tmp_path, capsys):
    weights = tmp_path / "open_clip_vit_h.bin"
    weights.write_bytes(os.urandom(3000).replace(KEY.encode(), b""))
    assert cli("push-weights", str(weights), "--dry-run", "--workdir", workdir) == 0
    assert fake_kaggle.calls == []
    assert cli("push-weights", str(weights), "--workdir", workdir, "--poll-s", "0") == 0
    dataset = fake_kaggle.datasets[f"{USERNAME}/guie-weights-open-clip-vit-h"]
    assert dataset.versions[0] == {"open_clip_vit_h.bin": weights.read_bytes()}
    assert dataset.license_name == "other"
    # the exact value a config takes; push attaches the dataset and the kernel resolves it
    assert ("model.pretrained_path="
            "kaggle:fake-user/guie-weights-open-clip-vit-h/open_clip_vit_h.bin"
            in capsys.readouterr().out)


# ----------------------------------------------------------------------------- the command line


def run_command_line(fake, *argv: str) -> subprocess.CompletedProcess:
    """A real subprocess pointed at the fake: KAGGLE_API_ENVIRONMENT=LOCALHOST + HTTP_PROXY."""
    env = {**os.environ, "KAGGLE_API_ENVIRONMENT": "LOCALHOST", "HTTP_PROXY": fake.url,
           "http_proxy": fake.url, "NO_PROXY": "", "no_proxy": ""}
    module = "guie_cli.kaggle_run" if argv[0] in ("run", "status", "probe") else \
        "guie_cli.kaggle_cmds"
    result = subprocess.run([sys.executable, "-m", module, *argv],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_command_line_status_submit_and_uploads(pushed, workdir, tmp_path):
    pushed.add_kernel_run(TRAIN, [("COMPLETE", "")], {"stage1/final.pt": b"ckpt"}, "")
    complete_infer(pushed)
    run_command_line(pushed, "status", "--wait", "--workdir", workdir, "--poll-s", "0")
    assert (Path(workdir) / "outputs" / "guie-infer-smoke" / "submission.zip").read_bytes() == b"PK"
    run_command_line(pushed, "submit", "--workdir", workdir)
    assert len(pushed.rpc_calls("CreateCodeSubmission")) == 1
    weights = tmp_path / "checkpoint.pt"
    weights.write_bytes(b"\0" * 5000)
    pushed.upload_break = "503"  # the upload through the proxy breaks once and resumes
    run_command_line(pushed, "push-weights", str(weights), "--workdir", workdir, "--poll-s", "0")
    assert pushed.datasets[f"{USERNAME}/guie-weights-checkpoint"].versions[0] == {
        "checkpoint.pt": weights.read_bytes()}
    assert_no_key_sent(pushed)


@pytest.mark.slow
def test_command_line_push_and_leaderboard(fake_kaggle, workdir, wheelhouse):
    run_command_line(fake_kaggle, "push", "--workdir", workdir, "--wheels-from", str(wheelhouse),
                     "--poll-s", "0", "--wait")
    run_command_line(fake_kaggle, "leaderboard", "--workdir", workdir)
    assert len(fake_kaggle.rpc_calls("SaveKernel")) == 2
    assert len(fake_kaggle.rpc_calls("CreateDataset")) == 2
    assert (Path(workdir) / "history.csv").exists()
    assert_no_key_sent(fake_kaggle)


def test_submit_refuses_an_unknown_kernel_version(pushed, workdir, capsys):
    state = json.loads((Path(workdir) / "state.json").read_text())
    state["kernels"]["infer"]["version"] = None  # push answered without a version number
    (Path(workdir) / "state.json").write_text(json.dumps(state))
    complete_infer(pushed)
    assert cli("submit", "--workdir", workdir, "--yes") == 2  # a user error
    assert "version of kernel fake-user/guie-infer-smoke is unknown" in capsys.readouterr().err
    assert cli("submit", "--workdir", workdir, "--yes", "--version", "1") == 0
    assert pushed.rpc_calls("CreateCodeSubmission")[0]["kernelVersion"] == 1


def test_submit_refuses_an_output_without_the_submission(pushed, workdir, capsys):
    pushed.add_kernel_run(INFER, [("COMPLETE", "")], {"other.txt": b"x"}, "")
    assert cli("submit", "--workdir", workdir, "--yes") == 2  # a user error
    assert "output submission.zip MISSING" in capsys.readouterr().out
    assert pushed.rpc_calls("CreateCodeSubmission") == []
