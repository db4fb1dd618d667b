"""Train on every GPU of the machine (or of several machines): torchrun over them, or in-process
on one GPU or a CPU.

Kaggle's 2xT4 machine gives two GPUs to a notebook; `train_on_all_gpus` starts
`torch.distributed.run` with one process per GPU, each running this module's worker, and returns
rank 0's report. `GUIE_NPROC` overrides the process count per machine (the tests use 2 CPU
processes).

No hour-long silent waits (`guie.train.dist` has the limits): every rank runs a preflight
all_reduce as the process group starts. Where it times out over NCCL, the launcher runs torchrun
once more with `NCCL_P2P_DISABLE=1` (the usual remedy for 2xT4 peer-to-peer hangs in notebooks,
Lightning issue 19425); otherwise it raises `LaunchError` within minutes, naming what to try.
torchrun exits with status 1 whatever its workers' statuses, so the ranks write why they gave up
into a state folder (`GUIE_LAUNCH_STATE_DIR`) that the launcher reads.

Several machines: run the same command on each, with torchrun's rendezvous settings (a
`Rendezvous`, the `GUIE_NNODES`/`GUIE_NODE_RANK`/`GUIE_RDZV_ENDPOINT`/`GUIE_RDZV_ID`/
`GUIE_RDZV_BACKEND` variables, or this module's command line):

    python -m guie.launch --config tiny --out /shared/run --nnodes 2 --node-rank 0 \\
        --rdzv-endpoint node0.example:29400

`--out` must be the same shared folder on every machine: rank 0 writes the checkpoints and the
other ranks read them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from guie.config import ExperimentConfig, load_config, save_config
from guie.errors import UserValueError

TORCHRUN = (sys.executable, "-m", "torch.distributed.run")
# Where the ranks record why they gave up (guie.train.dist.STATE_DIR_ENV; not imported from
# there, so that the launcher itself never imports torch: the workers do).
STATE_DIR_ENV = "GUIE_LAUNCH_STATE_DIR"


class LaunchError(RuntimeError):
    """torchrun failed; the message says why (as far as the ranks told) and what to try."""


@dataclass(frozen=True)
class Rendezvous:
    """torchrun's multi-machine settings. One machine (`nnodes=1`) runs `--standalone`.

    `endpoint` is host:port of machine 0, which hosts the c10d rendezvous store (as torchrun's
    `--master_addr`); `run_id` must be the same on every machine and new for each run."""
    nnodes: int = 1
    node_rank: int = 0
    endpoint: str = ""
    run_id: str = "guie"
    backend: str = "c10d"

    @classmethod
    def from_env(cls) -> Rendezvous:
        env = os.environ
        return cls(nnodes=int(env.get("GUIE_NNODES", "1")),
                   node_rank=int(env.get("GUIE_NODE_RANK", "0")),
                   endpoint=env.get("GUIE_RDZV_ENDPOINT", ""),
                   run_id=env.get("GUIE_RDZV_ID", "guie"),
                   backend=env.get("GUIE_RDZV_BACKEND", "c10d"))

    def torchrun_args(self, nproc: int) -> list[str]:
        if self.nnodes <= 1:
            return ["--standalone", f"--nproc_per_node={nproc}"]
        if not self.endpoint:
            raise UserValueError(f"{self.nnodes} machines need a rendezvous endpoint (host:port of "
                                 "machine 0): --rdzv-endpoint or GUIE_RDZV_ENDPOINT")
        if not 0 <= self.node_rank < self.nnodes:
            raise UserValueError(f"node rank {self.node_rank} is outside 0..{self.nnodes - 1}")
        args = [f"--nnodes={self.nnodes}", f"--nproc_per_node={nproc}",
                f"--rdzv_backend={self.backend}", f"--rdzv_endpoint={self.endpoint}",
                f"--rdzv_id={self.run_id}"]
        if self.backend != "c10d":
            return [*args, f"--node_rank={self.node_rank}"]  # static: ranks follow node ranks
        # c10d numbers the machines itself (torchrun ignores --node_rank, with a warning).
        # Machine 0 hosts the store, whatever the endpoint's name resolves to: left to
        # torchrun's guess, every agent on one host (the tests) thinks it is the host, and
        # whichever exits first takes the store away from the other.
        return [*args, f"--rdzv_conf=is_host={int(self.node_rank == 0)}"]


def process_count() -> int:
    """Processes on this machine: GUIE_NPROC, else one per GPU, else 1."""
    if os.environ.get("GUIE_NPROC"):
        return int(os.environ["GUIE_NPROC"])
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def train_on_all_gpus(cfg: ExperimentConfig, out_dir: str, resume: bool = True,
                      rendezvous: Rendezvous | None = None) -> dict:
    """Train `cfg` (resolved: its `max_hours` is the session's budget) into `out_dir` over every
    GPU (of every machine in `rendezvous`, default `Rendezvous.from_env()`); rank 0's report.
    Raises LaunchError when torchrun fails."""
    nproc = process_count()
    rdzv = rendezvous or Rendezvous.from_env()
    if nproc <= 1 and rdzv.nnodes <= 1:
        from guie.pipeline import train

        return {**train(cfg, out_dir, resume=resume), "processes": 1}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The workers load the resolved config as data, never resolve a name again. One file per
    # machine: machines sharing `out` (as they must) start at different moments, and a worker
    # must never read a config another machine is half-way through writing.
    config_path = out / f"launch-config-node{rdzv.node_rank}.json"
    save_config(cfg, config_path)
    report_path = out / "train-report.json"
    report_path.unlink(missing_ok=True)
    worker = ["--config-json", str(config_path), "--out", str(out)]
    if not resume:
        worker.append("--restart")
    run_workers(worker, nproc, rdzv)
    if report_path.exists():
        return json.loads(report_path.read_text())
    # Rank 0 lives on another machine whose `out` is not this one's.
    return {"status": "done", "report": f"written by global rank 0 into its {report_path}"}


def check_all_gpus(rendezvous: Rendezvous | None = None) -> dict:
    """Start the process group over every GPU, run the preflight and one barrier, and stop:
    whether the GPUs can talk, in seconds rather than a training start-up. Returns
    {"processes", "seconds", "nccl_p2p_disable"} (the last: whether the retry was needed)."""
    rdzv = rendezvous or Rendezvous.from_env()
    nproc = process_count()
    started = time.monotonic()
    env = run_workers(["--check"], nproc, rdzv)
    return {"processes": nproc * rdzv.nnodes, "seconds": round(time.monotonic() - started, 1),
            "nccl_p2p_disable": env.get("NCCL_P2P_DISABLE") == "1"}


def run_workers(worker_args: Sequence[str], nproc: int, rdzv: Rendezvous,
                torchrun: Sequence[str] = TORCHRUN) -> dict:
    """torchrun over `nproc` workers here (`python -m guie.launch --worker ...`); once more with
    NCCL_P2P_DISABLE=1 where the preflight timed out over NCCL. Returns the environment of the
    run that succeeded; raises LaunchError otherwise."""
    cmd = [*torchrun, *rdzv.torchrun_args(nproc), "-m", "guie.launch", "--worker", *worker_args]
    # The workers must import the very guie this process runs (on Kaggle: the attached source
    # dataset, put on sys.path by the notebook, not inherited by child processes).
    package_root = str(Path(__file__).resolve().parents[1])
    pythonpath = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    while True:
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="guie-launch-") as state:
            env[STATE_DIR_ENV] = state
            status = subprocess.run(cmd, env=env).returncode
            events = read_events(Path(state))
        del env[STATE_DIR_ENV]
        if status == 0:
            if env.get("NCCL_P2P_DISABLE") == "1" != os.environ.get("NCCL_P2P_DISABLE"):
                # The remedy worked: keep it for this session's later launches (an export or
                # the next training call) rather than paying the preflight's wait again.
                os.environ["NCCL_P2P_DISABLE"] = "1"
            return env
        elapsed = time.monotonic() - started
        if should_retry_without_p2p(events, env):
            print(f"guie.launch: the preflight all_reduce over NCCL timed out after "
                  f"{elapsed:.0f} s; NCCL peer-to-peer transfers hang on some 2xT4 notebook "
                  "machines: starting again once with NCCL_P2P_DISABLE=1", flush=True)
            env["NCCL_P2P_DISABLE"] = "1"
            continue
        raise LaunchError(failure_message(status, events, env, elapsed, rdzv))


def read_events(state: Path) -> list[dict]:
    """Each rank's recorded reason for giving up (guie.train.dist.record_event), by rank."""
    events = []
    for path in sorted(state.glob("rank*.json")):
        try:
            events.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # a rank killed mid-write: the others' records still count
    return sorted(events, key=lambda e: e.get("rank", 0))


def should_retry_without_p2p(events: list[dict], env: dict) -> bool:
    """The one retry: a preflight that timed out over NCCL, with peer-to-peer still on."""
    return env.get("NCCL_P2P_DISABLE") != "1" and any(
        e.get("event") == "preflight_timeout" and e.get("backend") == "nccl" for e in events)


def failure_message(status: int, events: list[dict], env: dict, elapsed: float,
                    rdzv: Rendezvous) -> str:
    kinds = {e.get("event") for e in events}
    ranks = ", ".join(str(e.get("rank")) for e in events)
    one_gpu = "train on one GPU instead (GUIE_NPROC=1: about half the speed, no collectives)"
    machines = ("; with several machines, check that each started with the same --nnodes, "
                "--rdzv-endpoint and --rdzv-id and can reach the endpoint's port"
                if rdzv.nnodes > 1 else "")
    if "preflight_timeout" in kinds:
        event = next(e for e in events if e.get("event") == "preflight_timeout")
        p2p = " (NCCL_P2P_DISABLE=1 included)" if env.get("NCCL_P2P_DISABLE") == "1" else ""
        return (f"torchrun failed after {elapsed:.0f} s: rank(s) {ranks} could not finish the "
                f"preflight all_reduce over {event.get('backend')} within "
                f"{event.get('seconds', 0):.0f} s{p2p}; the processes cannot reach each other. "
                f"What to try: {one_gpu}; set NCCL_SHM_DISABLE=1 too, and NCCL_DEBUG=INFO to see "
                "the transport it stops in; restart the session (a GPU still held by an "
                "earlier process); a longer GUIE_PREFLIGHT_TIMEOUT_S only if the machine is "
                f"merely slow{machines}.")
    if "collective_timeout" in kinds:
        event = next(e for e in events if e.get("event") == "collective_timeout")
        return (f"torchrun failed after {elapsed:.0f} s: rank(s) {ranks} waited more than "
                f"{event.get('seconds', 0):.0f} s (GUIE_DIST_TIMEOUT_S) for a peer in a "
                "collective: another rank stalled or died (its error, if any, is above). What "
                f"to try: NCCL_P2P_DISABLE=1 if this is 2xT4; {one_gpu}; a longer "
                "GUIE_DIST_TIMEOUT_S only if a healthy step (a checkpoint write to a slow disk) "
                f"takes that long{machines}.")
    return (f"torchrun exited with status {status} after {elapsed:.0f} s: the first failing "
            "rank's error is above (torchrun's 'Root Cause'). If it is NCCL's 'Watchdog caught "
            "collective operation timeout', a rank stalled in a collective: try "
            f"NCCL_P2P_DISABLE=1, or {one_gpu}{machines}.")


def worker(args: argparse.Namespace) -> int:
    """One torchrun worker: train (or only check the process group), and let rank 0 write the
    report. A collective that timed out is recorded for the launcher and ends the process at
    once: its peers are gone or stuck, and an orderly exit would wait on them."""
    from guie.train import dist

    try:
        if args.check:
            dist.init()
            dist.barrier()
            report = {"status": "checked"}
        else:
            from guie.pipeline import train

            report = train(load_config(args.config_json), args.out, resume=not args.restart)
    except RuntimeError as error:
        if not dist.is_collective_timeout(error):
            raise
        dist.record_collective_timeout(error)
        os._exit(dist.COLLECTIVE_EXIT)
    if dist.is_main() and args.out:
        report["processes"] = dist.world_size()  # how many ranks trained, every machine's
        (Path(args.out) / "train-report.json").write_text(json.dumps(report, indent=2) + "\n")
    dist.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """The launcher on this machine (`python -m guie.launch --config NAME_OR_JSON --out DIR
    [rendezvous]`), or, with `--worker`, one torchrun worker."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a shipped config's name or a config JSON file")
    parser.add_argument("--config-json", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="")
    parser.add_argument("--max-hours", type=float, default=None,
                        help="sets the config's max_hours (default: the config's)")
    parser.add_argument("--restart", action="store_true", help="ignore checkpoints in --out")
    parser.add_argument("--check", action="store_true",
                        help="only start the process group and run the preflight collective")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    env = Rendezvous.from_env()
    parser.add_argument("--nnodes", type=int, default=env.nnodes)
    parser.add_argument("--node-rank", type=int, default=env.node_rank)
    parser.add_argument("--rdzv-endpoint", default=env.endpoint)
    parser.add_argument("--rdzv-id", default=env.run_id)
    parser.add_argument("--rdzv-backend", default=env.backend)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    rdzv = Rendezvous(args.nnodes, args.node_rank, args.rdzv_endpoint, args.rdzv_id,
                      args.rdzv_backend)
    try:
        if args.check:
            print(json.dumps(check_all_gpus(rdzv)), flush=True)
            return 0
        if not args.config or not args.out:
            parser.error("--config and --out are needed to train")
        cfg = _load(args.config)
        if args.max_hours is not None:  # the flag is sugar for the config field
            cfg = replace(cfg, max_hours=args.max_hours)
        report = train_on_all_gpus(cfg, args.out, resume=not args.restart, rendezvous=rdzv)
    except LaunchError as error:
        print(f"guie.launch: {error}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps({k: v for k, v in report.items() if "per_domain" not in k}), flush=True)
    return 0


def _load(config: str) -> ExperimentConfig:
    if config.endswith(".json") or Path(config).is_file():
        return load_config(config)
    from guie.configs import get_config

    return get_config(config)


if __name__ == "__main__":
    sys.exit(main())
