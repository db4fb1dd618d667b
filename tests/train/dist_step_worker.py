"""The training step on W ranks (gloo, CPU), for tests/train/test_step_dist.py.

    python -m torch.distributed.run --nproc_per_node 2 dist_step_worker.py OUT_DIR

Each rank runs the scenarios below through `guie.train.step.StageStep` on the tiny ViT and
writes `OUT_DIR/<scenario>-rank<r>.pt`; the test runs the same scenarios in one process
(`run_scenario(..., world=1)`) and compares. The samples are a function of their global
position only, and micro-batch b of rank r covers positions [b*B*W + r*B, b*B*W + (r+1)*B)
(as `guie.train.order.BatchOrder` lays them out), so one process with micro-batches of W*B
sees the same samples per optimizer step.
"""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from guie.config import TINY_BACKBONE, ExperimentConfig, StageConfig
from guie.losses import build_loss
from guie.model import build_model
from guie.train.fsdp import resolve_parallel
from guie.train.step import StageStep

PER_RANK_BATCH = 2
DATA_RANKS = 2  # the ranks of the distributed run; the one-process run covers all their samples
NUM_CLASSES = 6
IMAGE_PX = 64
OPTIMIZER_STEPS = 3
CLIP_NORM = 0.05  # below every gradient norm this tiny setup shows (the test checks it)
STAGE = StageConfig(name="stage2", train=("all",), grad_accum=2, lr_head=1e-3, lr_centres=1e-3,
                    lr_backbone=1e-3, weight_decay=1e-4, grad_clip_norm=CLIP_NORM, amp="off")
SCENARIOS = {
    # fp32: the two-rank run must equal one process within fp32 tolerance.
    "equal": {"stage": STAGE, "inf_at": None},
    # fp16 autocast with the CPU grad scaler; rank 0's input of micro-batch 2 (the second
    # window's first) holds an inf, so optimizer step 1 must be skipped on every rank. The
    # scaler starts at 2**7, where this model's fp16 gradients fit (at the default 2**16 its
    # first steps overflow, as the scaler calibrates): the injected inf is the only skip.
    "inf": {"stage": replace(STAGE, amp="fp16", grad_clip_norm=0.0), "inf_at": 2,
            "init_scale": 2.0**7},
    # FSDP2: the same fp32 equality, reduce-scattering every micro-step or once per window
    "fsdp": {"stage": replace(STAGE, parallel="fsdp"), "inf_at": None},
    # (with activation checkpointing through the sharded blocks)
    "fsdp_unsynced": {"stage": replace(STAGE, parallel="fsdp",
                                       fsdp_reduce_every_micro_step=False), "inf_at": None,
                      "grad_checkpointing": True},
    # FSDP2 with fp16 parameters and the sharded grad scaler: rank 0's shard meets the inf
    "fsdp_inf": {"stage": replace(STAGE, amp="fp16", grad_clip_norm=0.0, parallel="fsdp"),
                 "inf_at": 2, "init_scale": 2.0**7},
}


def sample(position: int) -> tuple[torch.Tensor, int]:
    g = torch.Generator().manual_seed(1000 + position)
    return torch.randn(3, IMAGE_PX, IMAGE_PX, generator=g), position % NUM_CLASSES


def micro_batch(b: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s micro-batch b of a run over DATA_RANKS ranks' samples; one process
    (world 1) takes all DATA_RANKS shares at once."""
    start = b * PER_RANK_BATCH * DATA_RANKS + rank * PER_RANK_BATCH
    size = PER_RANK_BATCH * DATA_RANKS // world
    images, labels = zip(*(sample(p) for p in range(start, start + size)), strict=True)
    return torch.stack(images), torch.tensor(labels)


def build(stage: StageConfig, world: int, grad_checkpointing: bool = False):
    base = ExperimentConfig()
    cfg = replace(base, preprocess=replace(base.preprocess, image_size=IMAGE_PX),
                  model=replace(base.model, backbone=TINY_BACKBONE, dropout=0.0,
                                grad_checkpointing=grad_checkpointing))
    model, _ = build_model(cfg)  # weights: a function of cfg.seed alone, the same on each rank
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        loss_fn = build_loss(cfg.loss, cfg.model.embed_dim, NUM_CLASSES)
    step = StageStep(model, loss_fn, stage, torch.device("cpu"), from_features=False,
                     world=world, total_steps=OPTIMIZER_STEPS,
                     parallel=resolve_parallel(stage, world, from_cache=False))
    step.train_model.train()
    return model, loss_fn, step


def named_trained(step: StageStep) -> dict[str, torch.nn.Parameter]:
    """The trained parameters by name (under FSDP the replica's DTensors)."""
    named = {f"model.{k}": p for k, p in step.module.model.named_parameters()}
    named.update({f"loss.{k}": p for k, p in step.module.loss_fn.named_parameters()})
    return {k: p for k, p in named.items() if p.requires_grad}


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every rank calls it in the same order)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def run_scenario(name: str, rank: int, world: int) -> dict:
    """The scenario's record: per optimizer step the grads the optimizer saw (unscaled,
    clipped), the norm before clipping, the scale, the skip count; at the end every trained
    tensor and AdamW's moments; under DDP the micro-batches whose backward all-reduced."""
    spec = SCENARIOS[name]
    stage = spec["stage"]
    model, loss_fn, step = build(stage, world, spec.get("grad_checkpointing", False))
    if "init_scale" in spec:  # the same kind of scaler, starting lower
        step.scaler = type(step.scaler)("cpu", init_scale=spec["init_scale"])
    params = named_trained(step)
    # (micro-batch, gradient elements) of every all-reduce DDP ran
    record: dict = {"steps": [], "allreduces": [], "world": world, "parallel": step.parallel,
                    "trained_elements": sum(p.numel() for p in params.values()),
                    "sharded": all(hasattr(p, "full_tensor") for p in params.values())}
    micro = {"b": -1}
    if step.parallel == "ddp":
        def counting_hook(state, bucket):
            record["allreduces"].append((micro["b"], bucket.buffer().numel()))
            return default_hooks.allreduce_hook(None, bucket)
        step.runner.register_comm_hook(None, counting_hook)

    seen_grads: dict = {}
    optimizer_step = step.optimizer.step

    def spying_step(*args, **kwargs):
        seen_grads.update({k: full(p.grad) for k, p in params.items()})
        return optimizer_step(*args, **kwargs)
    step.optimizer.step = spying_step

    for b in range(OPTIMIZER_STEPS * stage.grad_accum):
        micro["b"] = b
        images, labels = micro_batch(b, rank, world)
        if spec["inf_at"] == b and rank == 0:
            images[0, 0, 0, 0] = float("inf")
        before = {k: full(p) for k, p in params.items()}
        seen_grads.clear()
        step(b, images, None, labels, 0.3)
        if (b + 1) % stage.grad_accum == 0:
            record["steps"].append({
                "grads": dict(seen_grads), "grad_norm": step.grad_norm,
                "scale": step.scaler.get_scale() if step.scaler.is_enabled() else 1.0,
                "skipped_steps": step.skipped_steps,
                "changed": any(not torch.equal(before[k], full(p)) for k, p in params.items())})
    record["params"] = {k: full(p) for k, p in params.items()}
    moments = {}
    for k, p in params.items():
        state = step.optimizer.state.get(p, {})
        if state:
            moments[k] = (full(state["exp_avg"]), full(state["exp_avg_sq"]))
    record["moments"] = moments
    # what the rest of the pipeline reads: the plain model after sync_weights
    step.sync_weights()
    record["plain"] = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    return record


def main(out_dir: str) -> int:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo")
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    for name in SCENARIOS:
        torch.save(run_scenario(name, rank, world), Path(out_dir) / f"{name}-rank{rank}.pt")
    torch_dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(sys.argv[1]))
