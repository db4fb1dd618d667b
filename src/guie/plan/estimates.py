"""Kaggle T4 / P100 time estimates for the reference recipe, from published anchors.

ESTIMATES, not measurements: no T4 or P100 is reachable from here. Each number follows from the
anchors below (field guide section 7) by the arithmetic in `kaggle_estimates`, so a better
anchor changes every figure consistently.
"""
from __future__ import annotations

TEST_IMAGES = 205_000  # 5,000 queries + 200,000 index images
TRAIN_IMAGES = 885_000  # 3rd place's 17,691-class training set
VIT_H_FORWARD_GFLOP = 334.6

# Anchor: one ViT-H-14 pass over the 205k test images takes ~1.4 h on one T4 (fp16).
T4_INFERENCE_IMG_S = TEST_IMAGES / (1.4 * 3600)
# P100: no tensor cores; fp16 on CUDA cores (18.7 TFLOP/s peak) against the T4's power-capped
# tensor cores. Assumed 0.7x a T4 for ViT inference and training.
P100_VS_T4 = 0.7
# Training costs ~3x the forward FLOPs. In practice it does worse: the published 40 img/s
# training on an RTX 3090 (batch 16) against ~220 img/s inference (the RTX 4090's published
# 402 img/s x ~0.55 for a 3090, our assumption) is ~1/5.5. Between 1/3 and 1/5.5: 1/4.5.
TRAIN_VS_INFERENCE = 1 / 4.5
TWO_GPU_SCALING = 1.8  # 2x T4 with DDP (the kit's torchrun path)
# Stage 1 from the cache: 69,141 steps of batch 256 (20 passes over 885k features); each step is
# ~7 GFLOP of small GEMMs (20-branch head, 53,073 sub-centres) plus ~40 kernel launches and an
# AdamW update: assumed ~4 ms on a T4, ~5 ms on a P100.
STAGE1_STEPS = 69_141
STAGE1_STEP_S = {"T4": 0.004, "P100": 0.005}


def kaggle_estimates() -> dict:
    out = {}
    for gpu, speed in (("T4", 1.0), ("P100", P100_VS_T4)):
        infer = T4_INFERENCE_IMG_S * speed
        train = infer * TRAIN_VS_INFERENCE
        out[gpu] = {
            "inference_img_s": round(infer, 1),
            "test_pass_205k_h": round(TEST_IMAGES / infer / 3600, 2),
            "stage1_cache_build_885k_h": round(TRAIN_IMAGES / infer / 3600, 1),
            "stage1_head_20_passes_min": round(STAGE1_STEPS * STAGE1_STEP_S[gpu] / 60, 1),
            "stage2_train_img_s": round(train, 1),
            "stage2_one_epoch_885k_h": round(TRAIN_IMAGES / train / 3600, 1),
        }
    two = out["T4"]
    out["2xT4"] = {
        "test_pass_205k_h": round(two["test_pass_205k_h"] / TWO_GPU_SCALING, 2),
        "stage1_cache_build_885k_h": round(two["stage1_cache_build_885k_h"] / TWO_GPU_SCALING, 1),
        "stage2_one_epoch_885k_h": round(two["stage2_one_epoch_885k_h"] / TWO_GPU_SCALING, 1),
    }
    out["note"] = ("ESTIMATES from published anchors (guie.plan.estimates), not measured: "
                   "T4 ViT-H inference ~1.4 h per 205k images; P100 = 0.7 x T4; training "
                   "throughput = inference / 4.5; 2xT4 = 1.8 x one T4.")
    return out
