"""Every shipped recipe runs its first steps on the tiny backbone and exports within the
contract."""
import re
import zipfile
from dataclasses import replace

import pytest

from guie.config import TINY_BACKBONE
from guie.configs import get_config
from guie.export.build import export_submission
from guie.pipeline import train

RECIPES = ["first_place", "second_place", "third_place", "fourth_place", "fifth_place",
           "sixth_place", "pca"]
TINY_BLOCKS, VIT_H_BLOCKS = 3, 32
TINY_PX, VIT_H_PX = 64, 224
TINY_PATCH_PX, VIT_H_PATCH_PX = 8, 14


def _blocks(item: str) -> str:
    """ViT-H's block range scaled onto the tiny backbone's 3 blocks."""
    m = re.fullmatch(r"blocks:(\d+)-(\d+)", item)
    if not m:
        return item
    lo, hi = (int(g) * TINY_BLOCKS // VIT_H_BLOCKS for g in m.groups())
    return f"blocks:{lo}-{hi}"


def smoke_scale(cfg, sample_data, batches: int = 1):
    """The recipe with the tiny backbone, the sample data and `batches` batches per stage."""
    root, sources = sample_data
    images = 800  # the sample_data fixture: 160 instances x 5 views
    stages = tuple(replace(
        s, train=tuple(_blocks(t) for t in s.train), batch_size=8, grad_accum=1,
        epochs=batches * 8 / images, use_feature_cache=False, eval_every_epochs=1.0,
        image_size_px=s.image_size_px * TINY_PX // VIT_H_PX,
        patch_stride_px=s.patch_stride_px * TINY_PATCH_PX // VIT_H_PATCH_PX,
        warmup_epochs=0.0) for s in cfg.stages)
    return replace(
        cfg, num_classes=0, stages=stages,
        data=replace(cfg.data, root=str(root), sources=tuple(sources), sample_instances=0,
                     heldout_classes=0, distractor_classes=0, num_workers=0, min_per_class=1),
        preprocess=replace(cfg.preprocess, image_size=TINY_PX),
        model=replace(cfg.model, backbone=TINY_BACKBONE, pretrained_path="",
                      grad_checkpointing=False, num_branches=min(cfg.model.num_branches, 3)),
        export=replace(cfg.export, reduction_images=100, soup=()))


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_and_exports_at_smoke_scale(name, sample_data, tmp_path):
    cfg = smoke_scale(get_config(name), sample_data)
    if len(cfg.stages) > 4:  # 1st place's 13: its first two and last two (290 px, stride 12)
        cfg = replace(cfg, stages=cfg.stages[:2] + cfg.stages[-2:])
    report = train(cfg, str(tmp_path))
    assert report["status"] == "done"
    for stage in cfg.stages:
        assert (tmp_path / stage.name / "final.pt").exists(), stage.name
    zip_path = export_submission(cfg, str(tmp_path), str(tmp_path / "export"))
    # export_submission has already run check_contract on the scripted, reloaded file
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.namelist() == ["saved_model.pt"]


def test_fifth_place_aspect_features_flow_from_cache_to_export(sample_data, tmp_path,
                                                               monkeypatch):
    """5th place's head trains on the feature cache, whose rows carry the three aspect-ratio
    features of each image; the export computes them from the host's input instead. The same
    held-out mP@5 through both says the two agree image by image."""
    import json
    import os
    from pathlib import Path

    import numpy as np

    from guie.pipeline import run_local

    # its own cache folder: the assertion below counts the caches this run built
    monkeypatch.setenv("GUIE_CACHE_DIR", str(tmp_path / "cache"))
    cfg = smoke_scale(get_config("fifth_place"), sample_data, batches=40)
    cfg = replace(cfg, stages=(replace(cfg.stages[0], use_feature_cache=True),),
                  data=replace(cfg.data, heldout_classes=12, distractor_classes=6),
                  export=replace(cfg.export, tta=()))  # views would make export != eager
    report = run_local(cfg, str(tmp_path))
    caches = list((Path(os.environ["GUIE_CACHE_DIR"]) / "feature-cache").glob("*/meta.json"))
    import open_clip
    projected_dim = open_clip.get_model_config(TINY_BACKBONE)["embed_dim"]
    assert [json.loads(m.read_text())["dim"] for m in caches] == [projected_dim + 3]
    features = np.load(caches[0].with_name("features.npy"))
    ratio_logs = features[0, :, -3]
    assert ratio_logs.min() < -0.5 and ratio_logs.max() > 0.5  # tall and wide images both
    assert report["map5_export"] == pytest.approx(report["map5_head"], abs=1e-6)
    assert report["map5_head"] != pytest.approx(report["map5_untrained"], abs=1e-3)


def test_fourth_place_concatenates_its_vit_l_run(sample_data, tmp_path):
    """4th place's ViT-H and ViT-L runs (here both tiny, the second at a larger input size as
    ViT-L-14-336 is) side by side in one export, PCA to 64 fitted on the concatenation."""
    import torch

    vit_h = smoke_scale(get_config("fourth_place"), sample_data)
    vit_l = smoke_scale(get_config("fourth_place_vit_l"), sample_data)
    vit_l = replace(vit_l, stages=tuple(replace(s, image_size_px=96) for s in vit_l.stages))
    assert train(vit_h, str(tmp_path / "vit-h"))["status"] == "done"
    assert train(vit_l, str(tmp_path / "vit-l"))["status"] == "done"

    both = replace(vit_h, export=replace(vit_h.export, concat=(str(tmp_path / "vit-l"),)))
    export_submission(both, str(tmp_path / "vit-h"), str(tmp_path / "export"))  # contract checked
    state = torch.jit.load(str(tmp_path / "export" / "saved_model.pt")).state_dict()
    assert state["reduction.weight"].shape == (64, 256 + 256)
    grids = [state[f"towers.{i}.visual.positional_embedding"].shape[0] for i in (0, 1)]
    assert grids == [(64 // 8) ** 2 + 1, (96 // 8) ** 2 + 1]  # each tower at its own size

    with pytest.raises(ValueError, match="torch1.11 export holds one backbone"):
        export_submission(both, str(tmp_path / "vit-h"), str(tmp_path / "x"), compat="torch1.11")
    missing = replace(vit_h, export=replace(vit_h.export, concat=(str(tmp_path / "nowhere"),)))
    with pytest.raises(FileNotFoundError, match="nowhere: no config.json"):
        export_submission(missing, str(tmp_path / "vit-h"), str(tmp_path / "x"))
