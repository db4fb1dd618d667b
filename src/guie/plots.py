"""Training curves as a PNG: loss per stage, and held-out and evaluation-source mP@5 against
epochs."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: Kaggle kernels, CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def plot_training_curves(history: pd.DataFrame, path: str | Path) -> Path:
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0.0
    for stage, rows in history.groupby("stage", sort=False):
        epochs = rows["epoch"] + offset
        if "loss" in rows:
            loss = rows[["loss"]].assign(epoch=epochs).dropna()
            # a rolling mean: per-batch ArcFace loss is noisy at small batch sizes
            ax_loss.plot(loss["epoch"], loss["loss"].rolling(10, min_periods=1).mean(),
                         label=str(stage))
        if "map5" in rows:
            scores = rows[["map5"]].assign(epoch=epochs).dropna()
            ax_map.plot(scores["epoch"], scores["map5"], marker="o", label=str(stage))
        # The evaluation sources (`map5_<source>`), dashed beside the held-out figure.
        for column in (c for c in rows.columns if c.startswith("map5_")):
            scores = rows[[column]].assign(epoch=epochs).dropna()
            if len(scores):
                ax_map.plot(scores["epoch"], scores[column], marker="s", linestyle="--",
                            label=f"{stage} {column[len('map5_'):]}")
        offset = float(epochs.max())
    ax_loss.set(xlabel="epoch (stages end to end)", ylabel="ArcFace loss", title="Training loss")
    ax_map.set(xlabel="epoch (stages end to end)", ylabel="mP@5",
               title="mP@5: held-out (solid), evaluation sources (dashed)")
    for ax in (ax_loss, ax_map):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a stage may have no evaluations
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
