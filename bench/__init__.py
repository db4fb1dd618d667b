"""Benchmark suite: `python -m bench [--quick] [--gpu] [--json PATH]` from the repository root.

Each benchmark runs the kit's fast path against a baseline side by side in the same process
(interleaved repeats, medians: `common.interleaved`) and returns table rows (`common.Figure`):

1. `decode_bench`: TFRecord JPEG -> 224 training tensor vs PIL full decode + resize; PSNR;
   DataLoader scaling over workers.
2. `stage1_bench`: a stage-1 epoch from the feature cache vs one through the backbone; the
   3rd-place stage-1 schedule at reference scale.
3. `knn_bench`: the kit's exact k-NN + mP@5 vs faiss `IndexFlatL2`.
4. `export_bench`: `saved_model.pt` vs the eager model.
5. `gpu_bench` (`--gpu`): ViT-H-14 training MFU, largest batches, inference throughput.

The Kaggle T4/P100 estimates come from published anchors (`guie.plan.estimates`). Results of
full runs live beside this code (JSON). Kept outside `src/guie` so the source dataset the
Kaggle kernels receive does not carry it.
"""
from bench.common import BenchResult, Figure

__all__ = ["BenchResult", "Figure"]
