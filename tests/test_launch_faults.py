"""A stalled rank ends the run within a stated time, with a message naming what to try; a
preflight that times out over NCCL is retried once with NCCL_P2P_DISABLE=1.

The stall tests run the real launcher: torchrun over two gloo processes (`guie.launch --check`:
the process group, the preflight and a barrier, the same worker code that trains), one rank
stalled by the GUIE_TEST_STALL_* hook of `guie.train.dist`.
"""
import os
import sys
import time

import pytest

from guie.launch import LaunchError, Rendezvous, check_all_gpus, run_workers

LIMIT_S = 10  # the preflight / process-group timeout the stall tests set
# The stated bound on top of the timeout: torchrun and two workers importing torch on two busy
# cores (~10-20 s measured), then torchrun's teardown of the stalled rank (SIGTERM: < 1 s).
OVERHEAD_S = 60


def _stall(monkeypatch, at: str) -> None:
    monkeypatch.setenv("GUIE_NPROC", "2")
    monkeypatch.setenv("GUIE_TEST_STALL_RANK", "1")
    monkeypatch.setenv("GUIE_TEST_STALL_AT", at)
    monkeypatch.setenv("GUIE_TEST_STALL_S", "600")  # far past the bound: only a timeout ends it
    for name in ("NCCL_P2P_DISABLE", "GUIE_NNODES"):
        monkeypatch.delenv(name, raising=False)


def _stalled_check(monkeypatch, at: str, timeout_env: str) -> str:
    """`check_all_gpus` with rank 1 stalled at `at` and `timeout_env` at LIMIT_S: its message,
    after checking it ended within the bound."""
    _stall(monkeypatch, at)
    monkeypatch.setenv(timeout_env, str(LIMIT_S))
    started = time.monotonic()
    with pytest.raises(LaunchError) as failure:
        check_all_gpus()
    elapsed = time.monotonic() - started
    assert LIMIT_S <= elapsed < LIMIT_S + OVERHEAD_S, elapsed
    return str(failure.value)


@pytest.mark.slow
def test_a_rank_stalled_before_the_preflight_ends_the_run_within_the_bound(monkeypatch):
    message = _stalled_check(monkeypatch, "preflight", "GUIE_PREFLIGHT_TIMEOUT_S")
    assert "preflight all_reduce over gloo" in message
    assert "GUIE_NPROC=1" in message and "NCCL_DEBUG=INFO" in message
    assert "NCCL_P2P_DISABLE=1 included" not in message  # gloo: no NCCL retry was made


@pytest.mark.slow
def test_a_rank_stalled_after_the_preflight_ends_the_run_within_the_bound(monkeypatch):
    message = _stalled_check(monkeypatch, "barrier", "GUIE_DIST_TIMEOUT_S")
    assert f"rank(s) 0 waited more than {LIMIT_S} s (GUIE_DIST_TIMEOUT_S)" in message
    assert "NCCL_P2P_DISABLE=1" in message and "GUIE_NPROC=1" in message


# A stand-in for torchrun (a real NCCL hang needs two GPUs): rank 0 records a preflight
# timeout over the given backend unless NCCL_P2P_DISABLE=1 (or always, with "always"), and
# every call is logged.
FAKE_TORCHRUN = """
import json, os, sys
from pathlib import Path
backend, mode, log = sys.argv[1:4]
with open(log, "a") as f:
    f.write(os.environ.get("NCCL_P2P_DISABLE", "-") + "\\n")
if mode == "always" or os.environ.get("NCCL_P2P_DISABLE") != "1":
    state = Path(os.environ["GUIE_LAUNCH_STATE_DIR"])
    (state / "rank0.json").write_text(json.dumps(
        {"event": "preflight_timeout", "rank": 0, "backend": backend, "seconds": 90}))
    sys.exit(1)
"""


@pytest.mark.parametrize("backend, mode, calls, succeeds", [
    ("nccl", "p2p", ["0", "1"], True),  # the remedy works: the second run goes through
    ("nccl", "always", ["0", "1"], False),  # one retry, then the message
    ("gloo", "p2p", ["0"], False),  # NCCL_P2P_DISABLE means nothing to gloo: no retry
])
def test_a_preflight_timeout_over_nccl_is_retried_once_without_p2p(tmp_path, monkeypatch,
                                                                  backend, mode, calls,
                                                                  succeeds):
    # "0", not unset: monkeypatch then restores the variable, which a successful retry sets in
    # this process for the session's later launches.
    monkeypatch.setenv("NCCL_P2P_DISABLE", "0")
    fake, log = tmp_path / "fake_torchrun.py", tmp_path / "calls.log"
    fake.write_text(FAKE_TORCHRUN)
    torchrun = [sys.executable, str(fake), backend, mode, str(log)]
    if succeeds:
        env = run_workers(["--check"], 2, Rendezvous(), torchrun=torchrun)
        assert env["NCCL_P2P_DISABLE"] == os.environ["NCCL_P2P_DISABLE"] == "1"
    else:
        with pytest.raises(LaunchError, match=f"preflight all_reduce over {backend}") as failure:
            run_workers(["--check"], 2, Rendezvous(), torchrun=torchrun)
        assert ("NCCL_P2P_DISABLE=1 included" in str(failure.value)) == (len(calls) == 2)
    assert log.read_text().split() == calls


def test_rendezvous_arguments_pass_through_to_torchrun():
    assert Rendezvous().torchrun_args(2) == ["--standalone", "--nproc_per_node=2"]
    two = Rendezvous(nnodes=2, node_rank=1, endpoint="10.0.0.1:29400", run_id="r7")
    assert two.torchrun_args(2) == ["--nnodes=2", "--nproc_per_node=2", "--rdzv_backend=c10d",
                                    "--rdzv_endpoint=10.0.0.1:29400", "--rdzv_id=r7",
                                    "--rdzv_conf=is_host=0"]
    static = Rendezvous(nnodes=2, node_rank=1, endpoint="10.0.0.1:29400", backend="static")
    assert static.torchrun_args(1)[-1] == "--node_rank=1"
    with pytest.raises(ValueError, match="rendezvous endpoint"):
        Rendezvous(nnodes=2).torchrun_args(1)
    with pytest.raises(ValueError, match="outside 0..1"):
        Rendezvous(nnodes=2, node_rank=2, endpoint="h:1").torchrun_args(1)


def test_rendezvous_from_the_environment(monkeypatch):
    monkeypatch.setenv("GUIE_NNODES", "3")
    monkeypatch.setenv("GUIE_NODE_RANK", "2")
    monkeypatch.setenv("GUIE_RDZV_ENDPOINT", "head:29400")
    monkeypatch.setenv("GUIE_RDZV_ID", "job")
    assert Rendezvous.from_env() == Rendezvous(3, 2, "head:29400", "job", "c10d")
