"""A stage's checkpoints: `last.pt` to resume it exactly, `final.pt` once it is done.

Both hold the plain model's full weights (under FSDP gathered from the shards first), so
`final.pt` is the same whatever the parallelism. `last.pt` adds the optimisation state in its
full, parameter-name-keyed form (`StageStep.state_dict`) and every rank's RNG, so a run resumes
on any number of ranks: with fewer ranks, `keep_global_batch` raises `grad_accum` so an
optimizer step still covers the same samples, in the same order. Writes are rank 0's, atomic
(a temporary file renamed), and the collectives they need run on every rank first.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch.distributed as torch_dist

from guie.config import ExperimentConfig, StageConfig
from guie.config_io import to_dict
from guie.errors import UserValueError
from guie.model import EmbeddingModel
from guie.train import dist
from guie.train.checkpoint import (load_checkpoint, load_stage_state, rng_state, save_checkpoint,
                                   set_rng_state)
from guie.train.optim import trains_backbone
from guie.train.run_state import StageOutcome, StageRun, TrainContext, stage_state


def save_stage(run: StageRun, path: Path, metrics: dict | None = None) -> None:
    """Checkpoint at `run.next_batch`; final.pt without the optimisation state. Every rank
    calls it (the weights, optimizer state and RNG are gathered from all ranks); rank 0
    writes."""
    ctx = run.ctx
    resumable = path.name != "final.pt"  # a finished stage needs no optimizer (ViT-H: 5 GB)
    optimisation, rngs = {}, []
    if resumable:
        # final.pt: `finish_stage` synced the weights before `select_by` may have loaded an
        # earlier point's into the plain model; syncing again would overwrite them
        run.step.sync_weights()
        optimisation, rngs = run.step.state_dict(), all_rng_states()
    if not dist.is_main():
        return
    state = {"model": stage_state(ctx.model, ctx.loss_fn, run.stage),
             "next_batch": run.next_batch,
             "optimizer_steps": run.next_batch // run.stage.grad_accum, "world": run.world,
             "order": run.order_key, "best": run.best, "history": run.history,
             "metrics": metrics or {}, "config": to_dict(ctx.cfg),
             "skipped_steps": run.step.skipped_steps}
    if resumable:
        state.update(optimisation, rng=rngs[0], rng_ranks=rngs)
    save_checkpoint(state, path)
    pd.DataFrame(run.history).to_csv(run.stage_dir / "history.csv", index=False)


def all_rng_states() -> list[dict]:
    """Every rank's RNG state, by rank (a collective under torchrun)."""
    if dist.world_size() == 1:
        return [rng_state()]
    states: list = [None] * dist.world_size()
    torch_dist.all_gather_object(states, rng_state())
    return states


def order_key_of(ckpt: dict) -> dict:
    """A checkpoint's order key in today's form (earlier ones named ranks and grad_accum)."""
    key = dict(ckpt.get("order", {}))
    if "samples_per_step" not in key and {"batch_size", "world", "grad_accum"} <= key.keys():
        key["samples_per_step"] = key.pop("batch_size") * key.pop("world") * \
            key.pop("grad_accum")
    return key


def keep_global_batch(stage: StageConfig, ckpt: dict | None, world: int) -> StageConfig:
    """`stage` resuming `ckpt` on `world` ranks: where the checkpoint was written on another
    number of ranks, `grad_accum` is scaled so an optimizer step covers the same samples (2
    ranks x accum 2 saved, 1 rank resumes with accum 4). Otherwise unchanged; a mismatch that
    no whole grad_accum fixes is refused by `resume_stage`."""
    if ckpt is None or ckpt.get("world", ckpt.get("order", {}).get("world", world)) == world:
        return stage  # the same ranks: any change of the batch is the user's, refused if wrong
    saved = order_key_of(ckpt).get("samples_per_step")
    per_micro_step = stage.batch_size * world
    if saved is None or saved == per_micro_step * stage.grad_accum or saved % per_micro_step:
        return stage
    accum = saved // per_micro_step
    dist.say(f"{stage.name}: resuming a checkpoint of {saved} samples per optimizer step on "
             f"{world} rank(s): grad_accum {stage.grad_accum} -> {accum} keeps that batch")
    return replace(stage, grad_accum=accum)


def resume_stage(run: StageRun, ckpt: dict | None, last_path: Path) -> None:
    """Continue from `ckpt` (last.pt's contents; None: start afresh, seeded)."""
    if ckpt is None:
        # The stage's randomness (dropout) must not depend on what ran before it, e.g. whether
        # the feature cache had to be built in this process.
        set_stage_seed(run.ctx.cfg, run.stage)
        return
    saved_key = order_key_of(ckpt)
    if saved_key != run.order_key:
        changed = {k: (saved_key.get(k), v) for k, v in run.order_key.items()
                   if saved_key.get(k) != v}
        raise UserValueError(f"{last_path}: cannot resume, the data order changed since it was "
                             f"saved (was, now): {changed}; samples_per_step is batch_size x "
                             "ranks x grad_accum: restore them or start the stage again (delete "
                             "the checkpoint)")
    load_stage_state(run.ctx.model, run.ctx.loss_fn, ckpt["model"])
    run.step.reload_weights()  # under FSDP: the shards from the loaded full weights
    run.step.load_state_dict(ckpt)
    ranks = ckpt.get("rng_ranks") or [ckpt["rng"]]
    # every rank its own RNG where the world is unchanged; else rank 0's (dropout only:
    # augmentation draws from per-sample seeds)
    set_rng_state(ranks[dist.rank()] if len(ranks) == dist.world_size() else ranks[0])
    steps = ckpt.get("optimizer_steps", ckpt["next_batch"] // run.stage.grad_accum)
    run.next_batch = steps * run.stage.grad_accum
    run.history, run.best = ckpt["history"], ckpt.get("best")
    dist.say(f"{run.stage.name}: resumed at batch {run.next_batch} of {run.total_batches} "
             f"(optimizer step {steps}) from {last_path}")


def set_stage_seed(cfg: ExperimentConfig, stage: StageConfig) -> None:
    import torch

    torch.manual_seed(cfg.seed * 1000 + sum(map(ord, stage.name)))


def finished(ctx: TrainContext, final_path: Path) -> StageOutcome:
    """A finished stage's outcome, its weights loaded."""
    done = load_checkpoint(final_path)
    load_stage_state(ctx.model, ctx.loss_fn, done["model"])
    return StageOutcome("done", final_path, done["metrics"], done["history"],
                        done.get("skipped_steps", 0))


def drop_superseded_backbones(cfg: ExperimentConfig, stage: StageConfig, out_dir: Path,
                              model: EmbeddingModel) -> None:
    """Once a backbone stage has finished, the backbone copies in earlier stages' final.pt are
    superseded (loading the stages in order overwrites them): rewrite those files without it.
    1st place's six backbone stages would otherwise leave six ViT-H copies (14 GB)."""
    for earlier in stages_before(cfg, stage):
        path = out_dir / earlier.name / "final.pt"
        if not earlier.enabled or not path.exists() or not trains_backbone(model, earlier):
            continue
        state = load_checkpoint(path)
        if "visual" in state["model"]:
            del state["model"]["visual"]
            state["backbone_in"] = stage.name  # where its backbone now lives
            save_checkpoint(state, path)


def drop_resume_state(last_path: Path) -> None:
    if dist.is_main():
        last_path.unlink(missing_ok=True)


def stages_before(cfg: ExperimentConfig, stage: StageConfig) -> tuple[StageConfig, ...]:
    """The config's stages before `stage` (none where `stage` is not one of them)."""
    names = [s.name for s in cfg.stages]
    return cfg.stages[:names.index(stage.name)] if stage.name in names else ()
