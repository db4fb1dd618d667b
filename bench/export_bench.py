"""Figure 4, `export_latency_ratio_vs_eager`: `saved_model.pt` against the eager model.

The `tiny` recipe's model is exported exactly as a submission is (`build_submission_model` +
`script_and_save`), reloaded with `torch.jit.load`, and timed against the eager
`SubmissionModel` it came from on the same uint8 input, as the host feeds it: one image at a
photo's size (batch 1), and a batch of 32. One timed repeat is several calls; repeats alternate.
The PyTorch-1.11-compatible export (explicit attention, no fused kernels) is timed the same way
and reported beside it, with no goal: it is the price of loading on an old host.
"""
from __future__ import annotations

from pathlib import Path

import torch

from bench.common import BenchResult, Figure, interleaved, rounded
from guie.configs import get_config
from guie.export.compat import compat_from_submission, save_compat_export
from guie.export.script import build_submission_model, script_and_save
from guie.model import build_model

# (name, input shape, calls per timed repeat)
CASES = (("b1", (1, 3, 512, 384), 10), ("b32", (32, 3, 256, 256), 1))


def run(workdir: Path, repeats: int, cases=CASES) -> BenchResult:
    torch.manual_seed(0)
    model, preprocess = build_model(get_config("tiny"))
    eager = build_submission_model(model.eval(), preprocess)
    scripted = torch.jit.load(str(script_and_save(eager, workdir / "saved_model.pt")))
    compat = torch.jit.load(str(save_compat_export(compat_from_submission(eager),
                                                   workdir / "saved_model_compat.pt")))
    figures, details = [], {}
    gen = torch.Generator().manual_seed(0)
    for name, shape, calls in cases:
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)

        def call(module, images=images, calls=calls):
            with torch.no_grad():
                for _ in range(calls):
                    module(images)

        with torch.no_grad():
            same = torch.allclose(scripted(images), eager(images), atol=1e-5)
        # Warm-up: the TorchScript profiling executor specialises over its first calls.
        paired = interleaved(lambda: call(scripted), lambda: call(eager), repeats, warmup=3)
        per_call_ms = 1e3 / calls
        figures.append(Figure(
            f"export_latency_ratio_vs_eager_{name}", rounded(paired.ours_median_s * per_call_ms),
            rounded(paired.baseline_median_s * per_call_ms), rounded(paired.time_ratio), "ms",
            "<= 1.05", f"tiny backbone, uint8 {list(shape)}, CPU; outputs match: {same}"))
        compat_paired = interleaved(lambda: call(compat), lambda: call(eager), repeats, warmup=3)
        figures.append(Figure(
            f"export_compat_latency_ratio_vs_eager_{name}",
            rounded(compat_paired.ours_median_s * per_call_ms),
            rounded(compat_paired.baseline_median_s * per_call_ms),
            rounded(compat_paired.time_ratio), "ms", "",
            f"--compat torch1.11 export, uint8 {list(shape)}, CPU"))
        details[name] = {"shape": list(shape), "calls_per_repeat": calls,
                         "paired": paired.to_dict(), "outputs_match": same,
                         "compat_paired": compat_paired.to_dict()}
    return BenchResult(figures, details)
