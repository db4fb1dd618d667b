"""Two machines x one process, on localhost: two launchers (`python -m guie.launch` with
torchrun's rendezvous settings) meet over a c10d rendezvous and train one DDP run over gloo."""
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import guie
from guie.config import save_config
from guie.configs import get_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_machines_one_process_each_train_together(sample_data, tmp_path):
    root, sources = sample_data
    smoke = get_config("smoke")
    # No held-out split (no evaluation): the point is the rendezvous and DDP across machines.
    cfg = replace(smoke, data=replace(smoke.data, root=str(root), sources=tuple(sources),
                                      sample_instances=0, heldout_classes=0,
                                      distractor_classes=0, num_workers=0))
    cfg = replace(cfg, stages=(replace(cfg.stage("stage2"), epochs=0.15),))  # 2 DDP steps
    save_config(cfg, tmp_path / "cfg.json")
    out = tmp_path / "out"  # shared by both "machines", as the launcher's docstring asks
    endpoint = f"127.0.0.1:{free_port()}"
    package_root = str(Path(guie.__file__).resolve().parents[1])
    env = {**os.environ, "GUIE_NPROC": "1", "PYTHONPATH": package_root}
    for name in ("GUIE_NNODES", "GUIE_NODE_RANK", "GUIE_RDZV_ENDPOINT", "GUIE_TEST_STALL_AT"):
        env.pop(name, None)
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "guie.launch", "--config", str(tmp_path / "cfg.json"),
         "--out", str(out), "--nnodes", "2", "--node-rank", str(node),
         "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)  # its own process group: torchrun and the worker go with it
        for node in (0, 1)]
    try:
        logs = [launcher.communicate(timeout=300)[0] for launcher in launchers]
    finally:
        for launcher in launchers:  # a machine left waiting at the rendezvous: end it
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()
    for node, (launcher, log) in enumerate(zip(launchers, logs, strict=True)):
        assert launcher.returncode == 0, f"machine {node}:\n{log[-3000:]}"
    report = json.loads((out / "train-report.json").read_text())
    assert report["status"] == "done" and report["processes"] == 2
    assert (out / "stage2" / "final.pt").exists()
    # Each machine's launcher prints the report it read back from the shared folder.
    for log in logs:
        assert json.loads(log.strip().splitlines()[-1])["processes"] == 2
