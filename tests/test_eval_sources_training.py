"""`smoke` trained with two evaluation sources: a GPR1200-layout benchmark and class folders,
built from real images that are not among the training photos. Their figures at every evaluation
point, per domain, checked against the official metric computed independently, and `submit.py
eval` on the run's export giving the training-time figure of the same checkpoint."""
from __future__ import annotations

import json
from dataclasses import replace

import pandas as pd
import pytest
import torch

from eval_photos import build_folders, build_gpr1200
from guie.config import EvalSource
from guie.configs import get_config
from guie.data.augment import EvalTransform
from guie.data.eval_sources import load_eval_source
from guie.export.build import load_trained
from guie.pipeline import train
from guie.train.features import compute_features
from guie_cli.main import main
from test_benchmark import official

pytestmark = pytest.mark.slow


def test_smoke_with_evaluation_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    gpr = build_gpr1200(tmp_path / "GPR1200", {0: "clock", 1: "checkerboard", 200: "horse",
                                               201: "cell", 1000: "lfw:0", 1001: "lfw:7"})
    mine = build_folders(tmp_path / "mine", ["colorwheel", "microaneurysms",
                                             "shepp_logan_phantom", "binary_blobs"])
    sources = (EvalSource("gpr", "gpr1200", str(gpr)),
               EvalSource("mine", "folders", str(mine), domain="memes", queries_per_class=1))
    cfg = get_config("smoke")
    # stage 2 keeps its best evaluation point by the GPR1200 figure (three points: 1/3, 2/3, end)
    cfg = replace(cfg, data=replace(cfg.data, eval_sources=sources)).replace_stage(
        "stage2", select_by="gpr", eval_every_epochs=0.34)
    out = tmp_path / "run"
    report = train(cfg, str(out))
    assert report["status"] == "done"
    for stage in ("stage1", "stage2"):
        figures = report[f"eval_{stage}"]
        assert set(figures["gpr"]["map5_per_domain"]) == {"landmarks", "nature", "faces"}
        assert set(figures["mine"]["map5_per_domain"]) == {"memes"}
        assert figures["gpr"]["num_queries"] == 18 and figures["mine"]["num_queries"] == 4
    # every evaluation point of every stage has both sources beside the held-out figure
    curves = pd.read_csv(out / "curves.csv")
    evaluated = curves.dropna(subset=["map5"])
    assert evaluated[["map5_gpr", "map5_mine"]].notna().all().all() and len(evaluated) >= 3

    # stage 2 kept the evaluation point with the best GPR1200 figure, and says which
    stage2 = evaluated[evaluated["stage"] == "stage2"]
    assert len(stage2) == 3
    selected = torch.load(out / "stage2" / "final.pt", weights_only=False)["metrics"]["selected"]
    assert selected["by"] == "gpr" and selected["figure"] == stage2["map5_gpr"].max()
    assert report["eval_stage2"]["gpr"]["map5"] == stage2["map5_gpr"].max()
    assert not (out / "stage2" / "best.pt").exists()

    # the kept figures, recomputed independently from the trained model with the official metric
    model, preprocess = load_trained(cfg, out)
    model.eval()
    for src in sources:
        frame = load_eval_source(src, ".")
        features, ok = compute_features(model, frame, EvalTransform(preprocess), 16, 0,
                                        torch.device("cpu"), "check")
        with torch.no_grad():
            embeddings = model.embed_features(features[ok]).float()
        queries = [i for i in range(len(frame)) if frame["query"][i]]
        index = range(len(frame)) if frame["query"].all() else \
            [i for i in range(len(frame)) if not frame["query"][i]]
        overall, per_domain = official(frame, embeddings, queries, index)
        got = report["eval_stage2"][src.name]
        assert got["map5"] == pytest.approx(overall, abs=1e-9)
        for domain, value in per_domain.items():
            assert got["map5_per_domain"][domain] == pytest.approx(value, abs=1e-9)

    # `submit.py eval` on that run (exported first, as it ships) gives the same figures
    evaluated_out = tmp_path / "eval"
    assert main(["eval", "--model", str(out), "--source", f"gpr1200:{gpr}",
                 "--source", f"folders:{mine}:memes", "--out", str(evaluated_out)]) == 0
    scored = json.loads((evaluated_out / "report.json").read_text())
    trained = report["eval_stage2"]["gpr"]["map5"]
    assert scored["GPR1200"]["map5"] == pytest.approx(trained, abs=1e-9)
    assert scored["GPR1200"]["map5_per_domain"] == pytest.approx(
        report["eval_stage2"]["gpr"]["map5_per_domain"], abs=1e-9)
    assert (evaluated_out / "GPR1200" / "report.html").is_file()


def test_select_by_names_the_figures_there_are(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = get_config("smoke").replace_stage("stage1", select_by="gprr")
    with pytest.raises(ValueError, match=r"stage1.select_by='gprr': choose one of last, heldout"):
        train(cfg, str(tmp_path / "run"))
