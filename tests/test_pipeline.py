"""`submit.py local --config smoke`: the whole path, through the command line's own entry."""
import json
import zipfile

import pytest

from guie_cli.main import main


@pytest.mark.slow
def test_local_smoke_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the smoke config builds its sample data under build/
    out = tmp_path / "out"
    assert main(["local", "--config", "smoke", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("map5_untrained", "map5_stage1", "map5_stage2", "map5_export"):
        assert 0.0 <= report[key] <= 1.0, key
    # the reloaded export fed uint8 images one by one scores what the eager model scored
    assert abs(report["map5_export"] - report["map5_stage2"]) <= 0.02
    assert set(report["map5_export_per_domain"]) == set(report["map5_stage2_per_domain"])
    for stage in ("stage1", "stage2"):
        assert (out / stage / "config.json").exists() and (out / stage / "final.pt").exists()
    assert (out / "curves.csv").exists() and (out / "curves.png").stat().st_size > 10_000
    with zipfile.ZipFile(out / "submission.zip") as zf:
        assert zf.namelist() == ["saved_model.pt"]
