"""Figure 1, `decode_speedup`: TFRecord JPEG -> 224 uint8 training tensor, one process.

Ours: `ImageDataset` with a transform that declares `decode_size` (reduced-scale JPEG decode,
torch resize; `guie.data.decode`). Baseline: the same records read the same way, then a plain
PIL full decode + `Image.resize` (PIL's default filter, bicubic). PSNR of ours against the
baseline's full-resolution result (MSE pooled over the images: the worst ones weigh most).
Then DataLoader throughput over 0, 1, 2 workers.
"""
from __future__ import annotations

import io
import math
import statistics

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader

from bench.common import BenchResult, Figure, interleaved, rounded, timed
from guie.data.dataset import ImageDataset, collate_skip_bad, pil_to_uint8_tensor, read_bytes
from guie.data.decode import ResizeToTensor

TARGET_PX = 224
WORKER_COUNTS = (0, 1, 2)


def baseline_item(path: str, offset: int, length: int, size: int = TARGET_PX) -> torch.Tensor:
    data = read_bytes(path, offset, length)
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return pil_to_uint8_tensor(img.resize((size, size)))


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean())


def psnr_db(mean_squared_error: float) -> float:
    return math.inf if mean_squared_error == 0 else 10 * math.log10(255.0**2 / mean_squared_error)


def loader_images_per_s(dataset: ImageDataset, workers: int, epochs: int) -> float:
    """Steady-state throughput: one untimed epoch starts the (persistent) workers."""
    loader = DataLoader(dataset, batch_size=16, num_workers=workers, collate_fn=collate_skip_bad,
                        persistent_workers=workers > 0)

    def epoch():
        for _ in loader:
            pass

    epoch()
    seconds = statistics.median(timed(epoch) for _ in range(epochs))
    return len(dataset) / seconds


def run(df: pd.DataFrame, repeats: int, loader_epochs: int) -> BenchResult:
    n = len(df)
    dataset = ImageDataset(df, ResizeToTensor(TARGET_PX))

    def ours():
        return [dataset[i][0] for i in range(n)]

    rows = list(zip(df["path"].tolist(), df["offset"].tolist(), df["length"].tolist(), strict=True))

    def baseline():
        return [baseline_item(*row) for row in rows]

    paired = interleaved(ours, baseline, repeats)
    errors = [mse(a, b) for a, b in zip(ours(), baseline(), strict=True)]
    psnrs = [psnr_db(e) for e in errors]
    ours_ips, base_ips = n / paired.ours_median_s, n / paired.baseline_median_s
    figures = [
        Figure("decode_speedup", rounded(ours_ips), rounded(base_ips), rounded(paired.speedup),
               "img/s", ">= 2.5",
               f"{n} JPEGs 400-800 px, q90 -> uint8 224x224, one process"),
        Figure("decode_psnr_db", rounded(psnr_db(float(np.mean(errors)))), None, None, "dB",
               ">= 30", "vs the full-resolution path, MSE pooled over images; per image: "
               f"median {statistics.median(psnrs):.1f}, min {min(psnrs):.1f} dB"),
    ]
    scaling = {}
    for workers in WORKER_COUNTS:
        scaling[workers] = loader_images_per_s(dataset, workers, loader_epochs)
    for workers in WORKER_COUNTS:
        figures.append(Figure(
            f"dataloader_{workers}_workers", rounded(scaling[workers]), None,
            rounded(scaling[workers] / scaling[0]), "img/s", "",
            "ratio: vs 0 workers (in-process); batch 16"))
    details = {"images": n, "target_px": TARGET_PX, "paired": paired.to_dict(),
               "psnr_db_per_image": [rounded(p) for p in psnrs],
               "dataloader_img_per_s": {str(w): rounded(v) for w, v in scaling.items()}}
    return BenchResult(figures, details)
