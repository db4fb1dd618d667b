"""Which weights a stage keeps (`select_by`): its last step's, or its best evaluation point's.

While a selecting stage runs, the best point so far is saved as `best.pt` in the stage folder;
at the end its weights are loaded back if they beat the last step's.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from guie.config import StageConfig
from guie.errors import UserValueError
from guie.model import EmbeddingModel
from guie.train import dist
from guie.train.checkpoint import load_checkpoint, load_stage_state, save_checkpoint
from guie.train.evaluate import Evaluator, evaluation_row

BEST_WEIGHTS = "best.pt"  # the best evaluation point's weights while a selecting stage runs


def selection_key(stage: StageConfig, evaluator: Evaluator | None) -> str | None:
    """The history column `select_by` names (None: keep the last weights)."""
    if stage.select_by == "last":
        return None
    names = [name for name, _, _ in evaluator.sources] if evaluator is not None else []
    heldout = evaluator is not None and len(evaluator.query) > 0
    options = ["last", *(["heldout"] if heldout else []), *names]
    if stage.select_by == "heldout" and heldout:
        return "map5"
    if stage.select_by in names:
        return f"map5_{stage.select_by}"
    raise UserValueError(f"{stage.name}.select_by={stage.select_by!r}: choose one of "
                         f"{', '.join(options)} (the evaluation sources are data.eval_sources)")


def keep_if_best(best: dict | None, key: str | None, row: dict, result: dict, batch: int,
                 stage_dir: Path, weights) -> dict | None:
    """Save this evaluation point's weights (`weights()`) as best.pt if it beats the best so far."""
    if key is None or row.get(key) is None or (best is not None and row[key] <= best["figure"]):
        return best
    if dist.is_main():
        save_checkpoint({"model": weights()}, stage_dir / BEST_WEIGHTS)
    return {"figure": row[key], "batch": batch, "metrics": result}


def select_best(best: dict | None, key: str, metrics: dict, total_batches: int,
                stage_dir: Path, model: EmbeddingModel, loss_fn: nn.Module,
                stage: StageConfig) -> dict:
    """The final metrics of a selecting stage: its last step's, unless an earlier evaluation
    point scored higher by `key`; then those weights are loaded back and kept."""
    final = evaluation_row(metrics).get(key)
    if best is None or final is None or final >= best["figure"]:
        return {**metrics, "selected": {"by": stage.select_by, "batch": total_batches,
                                        "figure": final}}
    dist.barrier()  # every rank reads best.pt; rank 0 wrote it
    load_stage_state(model, loss_fn, load_checkpoint(stage_dir / BEST_WEIGHTS)["model"])
    dist.barrier()  # ...and has read it before rank 0 deletes it (`finish_stage`)
    dist.say(f"{stage.name}: keeps batch {best['batch']} ({stage.select_by} mP@5 "
             f"{best['figure']:.4f} > {final:.4f} at the end)")
    return {**best["metrics"], "selected": {"by": stage.select_by, "batch": best["batch"],
                                            "figure": best["figure"]}}
