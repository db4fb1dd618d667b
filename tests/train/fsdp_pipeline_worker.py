"""One torchrun worker of tests/train/test_fsdp_pipeline.py: train a config's stages.

    python -m torch.distributed.run --nproc_per_node 2 fsdp_pipeline_worker.py CONFIG_JSON OUT
        [--kill-after STAGE:STEP]

`--kill-after s2:3`: once rank 0 has written `s2/last.pt` at optimizer step 3, it SIGKILLs its
whole process group (torchrun and every rank), as a dying Kaggle session would: no clean-up,
no further writes.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch

from guie.config import load_config
from guie.pipeline import train
from guie.train import dist, loop


def kill_after(stage_name: str, step: int) -> None:
    real_save = loop.save_stage

    def save_then_die(run, path, metrics=None):
        real_save(run, path, metrics)
        steps = run.next_batch // run.stage.grad_accum
        if path.name == "last.pt" and run.stage.name == stage_name and steps == step:
            if dist.is_main():
                os.killpg(os.getpgrp(), signal.SIGKILL)
            time.sleep(600)  # the other ranks wait for the kill
    loop.save_stage = save_then_die


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config_json")
    parser.add_argument("out")
    parser.add_argument("--kill-after", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.kill_after:
        name, step = args.kill_after.split(":")
        kill_after(name, int(step))
    report = train(load_config(args.config_json), args.out)
    dist.close()
    return 0 if report["status"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
