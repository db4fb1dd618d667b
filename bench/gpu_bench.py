"""Figure 5 (`--gpu`): ViT-H-14 at 224 with random weights on one CUDA device.

- the device's bf16 matmul peak, measured here (8192^3 GEMMs): the MFU denominator.
- stage-2 training through the loop's own step (all layers, head, sub-center ArcFace over
  17,691 classes, AdamW, bf16 autocast) in images/s, and MFU = img/s x 3 x 334.6 GFLOP / peak.
- the largest batch that trains, with and without gradient checkpointing: batch doubles until
  CUDA runs out of memory (so the true limit lies below twice the figure).
- `saved_model.pt` inference in images/s, weights in fp16 and in bf16 (uint8 input at 224, as
  a batch, and one image at a time at a photo's size, as the host calls it), and the
  PyTorch-1.11-compatible export (fp16: 1.11 has no bf16).
- the 3rd-place stage-1 schedule (`stage1_bench.reference_schedule`) measured on the device.

Images are random tensors already on the device: this measures the model, not the data path.
Skipped cleanly without CUDA.
"""
from __future__ import annotations

import gc
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.common import BenchResult, Figure, rounded
from guie.config import ExperimentConfig, StageConfig
from guie.train.step import StageStep

VIT_H_FORWARD_GFLOP = 334.6  # per 224 px image (field guide section 7); training ~3x
NUM_CLASSES = 17_691
GOAL_MFU = 0.45
GOAL_INFERENCE_IMG_S = 1200.0
MAX_BATCH = 4096


def skipped(reason: str) -> BenchResult:
    return BenchResult([Figure("gpu", None, None, None, "", "", f"skipped: {reason}")],
                       {"skipped": reason})


def cuda_seconds(fn, iters: int, warmup: int = 2) -> float:
    """Seconds per call of `fn`, by CUDA events around `iters` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def bf16_peak_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = cuda_seconds(lambda: a @ b, iters, warmup=3)
    return 2 * n**3 / seconds / 1e12


def vit_h(device: torch.device):
    from guie.model import build_model

    base = ExperimentConfig()
    cfg = replace(base, model=replace(base.model, backbone="ViT-H-14", pretrained_path="",
                                      head="linear", grad_checkpointing=False))
    torch.manual_seed(0)
    model, preprocess = build_model(cfg)
    return model.to(device), preprocess


STAGE2 = StageConfig(name="stage2", train=("all",), lr_head=1e-6, lr_backbone=1e-6, amp="bf16")


class Trainer:
    """Stage 2 through the training loop's own step (`guie.train.step.StageStep`): every
    parameter learns (backbone, head, class centres), bf16 autocast."""

    def __init__(self, model, device: torch.device):
        from guie.losses import ArcFace

        self.model, self.device = model, device
        self.loss_fn = ArcFace(model.head.linear.out_features, NUM_CLASSES, 30.0, 0.5,
                               subcenters=3).to(device)
        # A schedule no timed run reaches the end of: the LR stays at its initial value (a
        # 1-step schedule would decay it to 0 after the first step).
        self.stage_step = StageStep(model, self.loss_fn, STAGE2, device, from_features=False,
                                    total_steps=10**9)
        self.batches = 0  # micro-batches stepped: where gradient accumulation stands

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.stage_step(self.batches, images, None, labels, 0.5)
        self.batches += 1

    def batch(self, size: int):
        return (torch.randn(size, 3, 224, 224, device=self.device),
                torch.randint(0, NUM_CLASSES, (size,), device=self.device))

    def fits(self, size: int) -> bool:
        try:
            self.step(*self.batch(size))
            torch.cuda.synchronize()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        except RuntimeError as e:  # cuBLAS/cuDNN workspaces fail with their own messages
            if "out of memory" in str(e) or "ALLOC_FAILED" in str(e):
                return False
            raise
        finally:
            self.stage_step.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()

    def largest_batch(self, checkpointing: bool, start: int = 8) -> int:
        """Largest power-of-two batch (from `start`, up to MAX_BATCH) whose step fits."""
        self.model.visual.set_grad_checkpointing(checkpointing)
        best, size = 0, start
        while size <= MAX_BATCH and self.fits(size):
            best, size = size, size * 2
        return best

    def images_per_s(self, size: int, iters: int) -> float:
        images, labels = self.batch(size)
        return size / cuda_seconds(lambda: self.step(images, labels), iters, warmup=3)


def inference_images_per_s(module, device: torch.device, batch: int, iters: int,
                           shape_hw=(224, 224)) -> float:
    images = torch.randint(0, 256, (batch, 3, *shape_hw), dtype=torch.uint8, device=device)
    with torch.no_grad():
        seconds = cuda_seconds(lambda: module(images), iters, warmup=5)
    return batch / seconds


def export_variants(model, preprocess, workdir: Path):
    """(name, saved path) of the exports to time: fp16, bf16, and the 1.11-compatible fp16."""
    from guie.export.script import build_submission_model, script_and_save

    model.eval()
    out = []
    fp16 = build_submission_model(model, preprocess, fp16_weights=True)
    out.append(("fp16", script_and_save(fp16, workdir / "saved_model_fp16.pt")))
    del fp16
    bf16 = build_submission_model(model, preprocess)
    bf16.visual.to(torch.bfloat16)
    bf16.linear.to(torch.bfloat16)
    out.append(("bf16", script_and_save(bf16, workdir / "saved_model_bf16.pt")))
    del bf16
    try:
        from guie.export.compat import build_compat_export, save_compat_export

        compat = build_compat_export(model, preprocess, fp16_weights=True)
        out.append(("compat_fp16", save_compat_export(compat, workdir / "saved_model_compat.pt")))
        del compat
    except (ImportError, ValueError) as e:
        out.append(("compat_fp16", f"not exported: {e}"))
    gc.collect()
    return out


def run(workdir: Path, quick: bool) -> BenchResult:
    if not torch.cuda.is_available():
        return skipped("no CUDA device")
    from bench.stage1_bench import reference_schedule

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    peak = bf16_peak_tflops(device)
    figures = [Figure("gpu_bf16_matmul_peak", rounded(peak), None, None, "TFLOP/s", "",
                      f"8192^3 bf16 GEMM on {torch.cuda.get_device_name(device)}")]
    details: dict = {"device": torch.cuda.get_device_name(device), "bf16_peak_tflops": peak}

    model, preprocess = vit_h(device)
    trainer = Trainer(model, device)
    max_plain = trainer.largest_batch(checkpointing=False)
    max_ckpt = trainer.largest_batch(checkpointing=True)
    trainer.model.visual.set_grad_checkpointing(False)
    figures += [
        Figure("gpu_max_batch", max_plain, None, None, "images", "",
               "largest power of two that trains, no checkpointing"),
        Figure("gpu_max_batch_checkpointing", max_ckpt, None, None, "images", "",
               f"largest power of two that trains, gradient checkpointing (cap {MAX_BATCH})"),
    ]
    train_batch = min(max_plain, 128)
    if train_batch:
        img_s = trainer.images_per_s(train_batch, iters=5 if quick else 20)
        mfu = img_s * 3 * VIT_H_FORWARD_GFLOP * 1e9 / (peak * 1e12)
        figures += [
            Figure("gpu_train_img_s", rounded(img_s), None, None, "img/s", "",
                   f"ViT-H-14 stage 2, batch {train_batch}, the loop's step (bf16 autocast, "
                   "AdamW)"),
            Figure("gpu_train_mfu", rounded(mfu), None, None, "fraction", f">= {GOAL_MFU}",
                   "3 x 334.6 GFLOP per image / the bf16 peak above"),
        ]
    details.update(train_batch=train_batch, max_batch=max_plain, max_batch_checkpointing=max_ckpt)
    del trainer
    gc.collect()
    torch.cuda.empty_cache()

    inference = {}
    for name, saved in export_variants(model.cpu(), preprocess, workdir):
        if not isinstance(saved, Path):
            inference[name] = saved
            continue
        module = torch.jit.load(str(saved), map_location=device)
        batched = inference_images_per_s(module, device, 64, 10 if quick else 50)
        single = inference_images_per_s(module, device, 1, 20 if quick else 100, (512, 384))
        inference[name] = {"batch64_224_img_s": batched, "batch1_512x384_img_s": single}
        # The goal is for the default export; the 1.11 one gives up fused attention (reported).
        goal = "" if name.startswith("compat") else f">= {GOAL_INFERENCE_IMG_S:g}"
        figures.append(Figure(f"gpu_inference_{name}_img_s", rounded(batched), None, None,
                              "img/s", goal,
                              f"saved_model.pt, uint8 batch 64 at 224; one image at a time at "
                              f"512x384: {single:.0f} img/s"))
        del module
        torch.cuda.empty_cache()
    details["inference"] = inference
    del model
    gc.collect()
    torch.cuda.empty_cache()

    start = time.perf_counter()
    ref_figure, ref_details = reference_schedule(device, *((8192, 8) if quick else (65536, 200)),
                                                 workdir)
    figures.append(ref_figure)
    details["reference_schedule"] = ref_details | {"wall_s": time.perf_counter() - start}
    return BenchResult(figures, details)
