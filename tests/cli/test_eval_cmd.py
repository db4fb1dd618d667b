"""`submit.py eval`: an export scored on a GPR1200-layout benchmark and on class folders."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from eval_photos import build_folders, build_gpr1200
from guie.benchmark import score_source
from guie.config import EvalSource
from guie.data.eval_sources import load_eval_source
from guie.retrieval.index import Embedder
from guie_cli.main import main


class PooledColours(nn.Module):
    """A contract-following model: any [B, 3, H, W] 0..255 -> [B, 64] unit norm."""

    def __init__(self):
        super().__init__()
        self.register_buffer("projection", torch.randn(3 * 4 * 4, 64,
                                                       generator=torch.Generator().manual_seed(0)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(images.float() / 255.0, [4, 4]).flatten(1)
        return F.normalize(x @ self.projection, dim=1)


def test_eval_scores_each_source_per_domain_like_the_metric(tmp_path, capsys):
    model = tmp_path / "saved_model.pt"
    torch.jit.script(PooledColours()).save(str(model))
    with zipfile.ZipFile(tmp_path / "submission.zip", "w") as z:
        z.write(model, "saved_model.pt")
    build_gpr1200(tmp_path / "GPR1200", {0: "clock", 1: "horse", 200: "cell",
                                         201: "checkerboard", 1000: "lfw:3"})
    build_folders(tmp_path / "mine", ["colorwheel", "microaneurysms", "horse"])
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tmp_path / "submission.zip"), "--source",
                 f"gpr1200:{tmp_path / 'GPR1200'}",
                 "--source", f"folders:{tmp_path / 'mine'}:memes",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"GPR1200", "mine"}
    assert set(report["GPR1200"]["map5_per_domain"]) == {"landmarks", "nature", "faces"}
    assert set(report["mine"]["map5_per_domain"]) == {"memes"}
    for name, src in (("GPR1200", EvalSource("GPR1200", "gpr1200", str(tmp_path / "GPR1200"))),
                      ("mine", EvalSource("mine", "folders", str(tmp_path / "mine"), "memes"))):
        frame = load_eval_source(src, ".")
        rel = [Path(p).relative_to(tmp_path).as_posix() for p in frame["path"]]
        done, _ = Embedder(model).embed_files(tmp_path, rel, progress=False)
        expected = score_source(name, frame, torch.stack([done[r][0] for r in rel]))
        assert report[name]["map5"] == expected.map5
        assert report[name]["num_queries"] == len(frame) == (15 if name == "GPR1200" else 9)
        assert (out / name / "report.html").is_file()
    assert "GPR1200: mP@5" in capsys.readouterr().out


def test_eval_without_a_source_says_how_to_name_one(tmp_path, capsys):
    model = tmp_path / "m.pt"
    torch.jit.script(PooledColours()).save(str(model))
    assert main(["eval", "--model", str(model), "--out", str(tmp_path / "o")]) == 2
    assert "--source KIND:PATH" in capsys.readouterr().err
    assert main(["eval", "--model", str(model), "--source", "photos"]) == 2
    assert "expected KIND:PATH[:DOMAIN]" in capsys.readouterr().err
