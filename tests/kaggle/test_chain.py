"""`submit.py run`: training chained across Kaggle sessions, then export and one submission,
against the fake server whose kernels really run the pushed notebooks (on the sample data)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from support.kaggle_fixtures import USERNAME
from guie_cli.main import main
from kernel_runner import NotebookRunner

pytestmark = pytest.mark.slow

# Stage 1 and stage 2 of `smoke` take one optimizer step each, and a session stops after its
# first step (max_hours ~ 4 ms): session 1 pauses stage 1 after its step, session 2 finishes
# stage 1 and pauses stage 2 after its step, session 3 finishes stage 2. Three sessions.
OVERRIDES = ["stage1.epochs=0.01", "stage2.epochs=0.01"]
SESSION_HOURS = "0.000001"
RESTART_HOURS = "0.0000012"
TRAIN = [f"{USERNAME}/guie-train-smoke", f"{USERNAME}/guie-train-smoke-s2",
         f"{USERNAME}/guie-train-smoke-s3"]
INFER = f"{USERNAME}/guie-infer-smoke"


@pytest.fixture
def running_kaggle(fake_kaggle, tmp_path):
    runner = NotebookRunner(fake_kaggle, tmp_path / "kaggle-sessions")
    fake_kaggle.kernel_runner = runner
    fake_kaggle.score_pending = "0.4321"
    yield fake_kaggle, runner
    runner.join()


def run_args(workdir: Path, wheelhouse: Path, *extra: str) -> list[str]:
    return ["run", "--config", "smoke", "--workdir", str(workdir), "--wheels-from",
            str(wheelhouse), "--poll-s", "0.2", "--max-hours", SESSION_HOURS, *extra, *OVERRIDES]


def tensors(state, prefix: str = "") -> dict:
    """Every tensor of a (nested) checkpoint state, by its dotted path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    items = state.items() if isinstance(state, dict) else []
    return {k: v for name, sub in items for k, v in tensors(sub, f"{prefix}.{name}").items()}


def saved(fake, ref: str) -> int:
    return sum(1 for body in fake.rpc_calls("SaveKernel") if body["slug"] == ref)


def test_run_chains_three_sessions_survives_a_kill_exports_and_submits_once(
        running_kaggle, tmp_path, wheelhouse, capsys, monkeypatch):
    fake, runner = running_kaggle
    workdir = tmp_path / "work"
    state_path = workdir / "run-smoke.json"
    # 1. the chain as a real process, killed while it waits on its first kernel
    env = {**os.environ, "KAGGLE_API_ENVIRONMENT": "LOCALHOST", "HTTP_PROXY": fake.url,
           "http_proxy": fake.url, "NO_PROXY": "", "no_proxy": ""}
    chain = subprocess.Popen([sys.executable, "submit.py", *run_args(workdir, wheelhouse)],
                             cwd=Path(__file__).resolve().parents[2], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (state_path.is_file() and json.loads(state_path.read_text())["sessions"]):
        assert chain.poll() is None, chain.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    chain.send_signal(signal.SIGKILL)
    chain.wait()
    pending = json.loads(state_path.read_text())["sessions"]
    assert [(s["ref"], s["outcome"]) for s in pending] == [(TRAIN[0], None)]

    # 2. started again (in this process), with another session budget: the same run (max_hours
    # is not part of its identity), so it waits on that kernel, then goes on to the end
    capsys.readouterr()
    assert main(run_args(workdir, wheelhouse, "--max-hours", RESTART_HOURS)) == 0
    out = capsys.readouterr().out
    assert f"waiting on train kernel {TRAIN[0]} version 1" in out
    assert [saved(fake, ref) for ref in TRAIN] == [1, 1, 1]  # no duplicate after the restart
    assert saved(fake, INFER) == 1
    state = json.loads(state_path.read_text())
    sessions = state["sessions"]
    assert [(s["kind"], s["outcome"]) for s in sessions] == [
        ("train", "paused"), ("train", "paused"), ("train", "done"), ("infer", "done")]
    assert [s.get("paused_in") for s in sessions[:3]] == ["stage1", "stage2", None]
    assert all(s["hours"] > 0 for s in sessions[:3])
    assert "3 training sessions" in out and "GPU hours spent" in out
    # each session resumed from the previous one's output, attached as a notebook source
    bodies = {b["slug"]: b for b in fake.rpc_calls("SaveKernel")}
    assert bodies[TRAIN[1]]["kernelDataSources"] == [TRAIN[0]]
    assert bodies[TRAIN[2]]["kernelDataSources"] == [TRAIN[1]]
    assert bodies[INFER]["kernelDataSources"] == [TRAIN[2]]
    budgets = [json.loads(fake.kernels[ref].sessions[-1].outputs["config.json"])["max_hours"]
               for ref in TRAIN]
    assert budgets == [float(SESSION_HOURS), float(RESTART_HOURS), float(RESTART_HOURS)]
    # one submission, of the inference kernel's explicit version, scored and recorded
    (sent,) = fake.rpc_calls("CreateCodeSubmission")
    assert sent["kernelSlug"] == "guie-infer-smoke" and sent["kernelVersion"] == 1
    assert state["submission"]["public_score"] == pytest.approx(0.4321)
    assert "0.4321" in (workdir / "history.csv").read_text()
    export_json = workdir / "outputs" / "guie-infer-smoke-v1" / "guie-export.json"
    export = json.loads(export_json.read_text())
    assert export["run_id"] == state["run"]["run_id"]
    # a finished chain started again does nothing more
    assert main(run_args(workdir, wheelhouse)) == 0
    assert len(fake.rpc_calls("CreateCodeSubmission")) == 1 and saved(fake, TRAIN[2]) == 1

    # 3. the final weights equal one uninterrupted run's
    from guie.config_io import apply_overrides
    from guie.configs import get_config
    from guie.pipeline import train

    monkeypatch.chdir(runner.working[TRAIN[2]].parent)  # the kernels' cwd: same sample data
    reference = tmp_path / "uninterrupted"
    smoke = apply_overrides(get_config("smoke"), OVERRIDES)
    assert train(smoke, str(reference))["status"] == "done"
    chained = tensors(torch.load(runner.working[TRAIN[2]] / "stage2" / "final.pt",
                                 weights_only=False)["model"])
    alone = tensors(torch.load(reference / "stage2" / "final.pt", weights_only=False)["model"])
    assert chained.keys() == alone.keys() and len(alone) > 10
    for key, value in alone.items():
        assert torch.equal(chained[key], value), key


def test_a_failed_kernel_stops_the_chain_with_its_message(running_kaggle, tmp_path, wheelhouse,
                                                          capsys):
    fake, _ = running_kaggle
    workdir = tmp_path / "work"
    # weights the kernel cannot find: the training kernel fails in its config cell
    missing = f"model.pretrained_path=kaggle:{USERNAME}/guie-weights-missing/w.bin"
    assert main([*run_args(workdir, wheelhouse), missing]) == 1
    err = capsys.readouterr().err
    assert f"kernel {TRAIN[0]} version 1 ended ERROR" in err
    assert "InputNotFound" in err and "last 30 log lines" in err
    assert saved(fake, TRAIN[0]) == 1 and saved(fake, TRAIN[1]) == 0  # no blind retry
    assert main([*run_args(workdir, wheelhouse), missing]) == 1  # nor on a restart
    assert "failed before" in capsys.readouterr().err and saved(fake, TRAIN[0]) == 1


def test_the_quota_kaggle_reports_stops_the_chain_before_a_session_it_cannot_hold(
        running_kaggle, tmp_path, wheelhouse, capsys):
    """Each session is charged 0.2 h here; the next one may take up to max_hours + 0.25 h of
    set-up (from push to end): with 0.3 h allowed, session 1 runs and session 2 does not."""
    fake, _ = running_kaggle
    fake.set_quota(total_h=0.3, charge_h=0.2)
    workdir = tmp_path / "work"
    assert main(run_args(workdir, wheelhouse)) == 3
    out = capsys.readouterr().out
    assert "GPU quota: 0.10 h left (0.30 h allowed this week" in out
    assert "stopped before session 2: GPU quota: 0.10 h left" in out
    assert saved(fake, TRAIN[0]) == 1 and saved(fake, TRAIN[1]) == 0
    assert fake.rpc_calls("CreateCodeSubmission") == []
    # the chain's own cap, on top of Kaggle's quota: nothing pushed past it
    fake.set_quota(total_h=30.0)
    assert main([*run_args(tmp_path / "other", wheelhouse), "--max-quota-hours", "0.1"]) == 3
    assert "would pass the chain's cap of 0.1" in capsys.readouterr().out
    assert saved(fake, TRAIN[0]) == 1


def test_a_second_run_with_a_changed_override_acts_on_its_own_sessions(
        running_kaggle, tmp_path, wheelhouse, capsys):
    """The same kernels pushed again for another run, while Kaggle's first unversioned reads
    still describe the previous run's sessions: every read names the new version and the output
    must carry the new push's nonce, so the chain never takes the old output for its own (which
    it would then call foreign), through a restart mid-chain too."""
    fake, _ = running_kaggle
    workdir = tmp_path / "work"
    assert main(run_args(workdir, wheelhouse, "--until", "trained")) == 0
    first = json.loads((workdir / "run-smoke.json").read_text())["run"]["run_id"]
    (workdir / "run-smoke.json").rename(workdir / "run-smoke-first.json")
    fake.stale_reads_after_push = 3
    again = [*run_args(workdir, wheelhouse, "--until", "trained"), "seed=1"]

    class Stop(Exception):
        pass

    def stop_after_first_push(line: str) -> None:  # a restart while waiting on session 1
        print(line)
        if line.startswith("pushed train kernel"):
            raise Stop
    import guie_cli.kaggle_run as kaggle_run

    chain_class = kaggle_run.Chain
    try:
        kaggle_run.Chain = lambda *a, **kw: chain_class(*a, **{**kw, "log": stop_after_first_push})
        with pytest.raises(Stop):
            main(again)
    finally:
        kaggle_run.Chain = chain_class
    capsys.readouterr()
    assert main(again) == 0
    out = capsys.readouterr().out
    state = json.loads((workdir / "run-smoke.json").read_text())
    assert state["run"]["run_id"] != first
    assert [(s["ref"], s["version"], s["outcome"]) for s in state["sessions"]] == [
        (TRAIN[0], 2, "paused"), (TRAIN[1], 2, "paused"), (TRAIN[2], 2, "done")]
    assert "foreign" not in out and "another run" not in out
    for ref in TRAIN:  # the last session of each kernel trained the new run
        marker = json.loads(fake.kernels[ref].sessions[-1].outputs["guie-run.json"])
        assert marker["run_id"] == state["run"]["run_id"]


def test_run_dry_run_shows_the_chain(fake_kaggle, tmp_path, capsys):
    assert main(["run", "--config", "third_place", "--dry-run", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "training sessions of up to 11 h" in out and "daily cap 5" in out
    assert "session(s) of 11 h" in out  # the planner's estimate of how many the chain needs
    assert "GPU quota: not reported by Kaggle; assuming about 30 h" in out
    assert [name for name, _ in fake_kaggle.calls] == ["GetAcceleratorQuotaStatistics"]
