"""Train on every GPU of the machine: torchrun over them, or in-process on one GPU or a CPU.

Kaggle's 2xT4 machine gives two GPUs to a notebook; `train_on_all_gpus` starts
`torch.distributed.run` with one process per GPU, each running this module's `main`, and returns
rank 0's report. `GUIE_NPROC` overrides the process count (the tests use 2 CPU processes).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from guie.config import ExperimentConfig, load_config, save_config


def process_count() -> int:
    if os.environ.get("GUIE_NPROC"):
        return int(os.environ["GUIE_NPROC"])
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def train_on_all_gpus(cfg: ExperimentConfig, out_dir: str, resume: bool = True,
                      max_hours: float = 0.0) -> dict:
    from guie.pipeline import train

    nproc = process_count()
    if nproc <= 1:
        return train(cfg, out_dir, resume=resume, max_hours=max_hours)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "launch-config.json")
    report_path = out / "train-report.json"
    report_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "guie.launch", "--config-json",
           str(out / "launch-config.json"), "--out", str(out), "--max-hours", str(max_hours)]
    if not resume:
        cmd.append("--restart")
    # The workers must import the very guie this process runs (on Kaggle: the attached source
    # dataset, put on sys.path by the notebook, not inherited by child processes).
    package_root = str(Path(__file__).resolve().parents[1])
    pythonpath = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": pythonpath})
    return json.loads(report_path.read_text())


def main(argv: list[str] | None = None) -> int:
    """One torchrun worker: train, and let rank 0 write the report."""
    from guie.pipeline import train
    from guie.train import dist

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config-json", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-hours", type=float, default=0.0)
    parser.add_argument("--restart", action="store_true")
    args = parser.parse_args(argv)
    report = train(load_config(args.config_json), args.out, resume=not args.restart,
                   max_hours=args.max_hours)
    if dist.is_main():
        (Path(args.out) / "train-report.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
