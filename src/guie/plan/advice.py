"""The smallest change that makes a stage fit, as ready KEY=VALUE overrides, each checked by
planning the stage again under it.

Tried in order of how little they change the recipe: FSDP for a stage held to DDP (the same
result, sharded), gradient checkpointing (the same result, slower), a smaller per-device batch
with gradient accumulation (the same effective batch), both, then training only the top blocks
of the backbone (a different recipe: said so).
"""
from __future__ import annotations

import json
import shlex
from dataclasses import replace

from guie.config_io import apply_overrides
from guie.plan.core import meta_model, plan_stage


def _batch_fix(stage, max_batch: int) -> list[str] | None:
    """batch_size = the largest divisor of the batch within `max_batch`; grad_accum keeps the
    effective batch."""
    if max_batch < 1:
        return None
    size = next(b for b in range(min(max_batch, stage.batch_size), 0, -1)
                if stage.batch_size % b == 0)
    if size == stage.batch_size:
        return None
    return [f"{stage.name}.batch_size={size}",
            f"{stage.name}.grad_accum={stage.grad_accum * stage.batch_size // size}"]


def _fits(cfg, overrides, name, shape, classes, images, max_hours, measure, limit=None):

    changed = apply_overrides(cfg, overrides)
    return plan_stage(changed, changed.stage(name), shape, classes, images, max_hours, measure,
                      limit=limit)


def with_fix(cfg, sp, shape, classes, images, max_hours, measure, limit=None):
    """`sp` (a stage that does not fit) with the first override set that makes it fit under
    `limit` (a `guie.plan.gpus.MemoryLimit`; default: the shape's)."""
    stage = cfg.stage(sp.name)
    tried: list[tuple[list[str], str]] = []
    if stage.parallel == "ddp" and sp.fsdp_gib is not None:
        tried.append(([f"{sp.name}.parallel=fsdp"],
                      "the same training with weights, gradients and AdamW state sharded"))
    if not cfg.model.grad_checkpointing and sp.max_batch_other_checkpointing:
        ckpt = ["model.grad_checkpointing=true"]
        tried.append((ckpt, "gradient checkpointing: the same training, ~1/3 more compute"))
        batch = _batch_fix(stage, sp.max_batch_other_checkpointing)
    else:
        ckpt, batch = [], None
    own = _batch_fix(stage, sp.max_batch)
    if own:
        tried.append((own, "the same effective batch through gradient accumulation"))
    if batch:
        tried.append((ckpt + batch, "checkpointing and the same effective batch through "
                                    "gradient accumulation"))
    for overrides, note in tried:
        planned = _fits(cfg, overrides, sp.name, shape, classes, images, max_hours, measure,
                        limit)
        if planned.fits:
            return replace(sp, fix=tuple(overrides), fix_note=note)
    partial = _partial_backbone(cfg, sp, shape, classes, images, max_hours, measure,
                                ckpt + (batch or own or []), limit)
    if partial:
        return partial
    return replace(sp, fix_note="no override found that fits: try a larger GPU "
                                "(--machine-shape NvidiaL4 or NvidiaH100)")


def _partial_backbone(cfg, sp, shape, classes, images, max_hours, measure, base, limit):
    """Train the top k blocks (and the final norm + projection) only: the largest k that fits."""
    from guie.model import backbone

    stage = cfg.stage(sp.name)
    if not any(t in ("all", "backbone") or t.startswith("blocks:") for t in stage.train):
        return None
    blocks = backbone(meta_model(cfg, classes)[1]).num_blocks

    def overrides(k: int) -> list[str]:
        train = ["head", "centres", f"blocks:{blocks - k}-{blocks - 1}", "backbone_top"]
        return base + [f"{sp.name}.train={json.dumps(train, separators=(',', ':'))}"]

    lo, hi = 0, blocks - 1  # lo: fits (0 = none found yet), hi: largest k to try
    found = None
    while lo < hi:
        k = (lo + hi + 1) // 2
        if _fits(cfg, overrides(k), sp.name, shape, classes, images, max_hours, measure,
                 limit).fits:
            lo, found = k, k
        else:
            hi = k - 1
    if not found:
        return None
    return replace(sp, fix=tuple(overrides(found)),
                   fix_note=f"a different recipe: only the top {found} of {blocks} blocks train")


def shell_words(overrides: tuple[str, ...]) -> str:
    return " ".join(shlex.quote(o) for o in overrides)
