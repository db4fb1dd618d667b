"""`submit.py local --config smoke`: the whole path, through the command line's own entry (the
run is the session's `smoke_run` fixture, shared with tests/kaggle/test_local_run.py)."""
import json
import zipfile

import pytest


@pytest.mark.slow
def test_local_smoke_end_to_end(smoke_run):
    out = smoke_run
    report = json.loads((out / "report.json").read_text())
    for key in ("map5_untrained", "map5_features", "map5_stage1", "map5_stage2", "map5_export"):
        assert 0.0 <= report[key] <= 1.0, key
    # the reloaded export fed uint8 images one by one scores what the eager model scored
    assert abs(report["map5_export"] - report["map5_stage2"]) <= 0.02
    assert set(report["map5_export_per_domain"]) == set(report["map5_stage2_per_domain"])
    for stage in ("stage1", "stage2"):
        assert (out / stage / "config.json").exists() and (out / stage / "final.pt").exists()
    assert (out / "curves.csv").exists() and (out / "curves.png").stat().st_size > 10_000
    with zipfile.ZipFile(out / "submission.zip") as zf:
        assert zf.namelist() == ["saved_model.pt"]


def _untrained(**export):
    """The no-training path on the tiny backbone: 128-d features, reduced at export."""
    from dataclasses import replace

    from guie.config import ExperimentConfig, ExportConfig, ModelConfig, PreprocessConfig

    return ExperimentConfig(stages=(), preprocess=PreprocessConfig(image_size=64),
                            model=ModelConfig(backbone="guie-tiny-vit", head="identity",
                                              use_projection=False),
                            export=replace(ExportConfig(), **export))


def test_export_refuses_what_the_competition_or_the_compat_export_cannot_take(tmp_path):
    from guie.export.build import export_submission

    with pytest.raises(ValueError, match="128-d but the competition takes 64"):
        export_submission(_untrained(), str(tmp_path), str(tmp_path))
    with pytest.raises(ValueError, match=r"export.tta=\['flip'\]: the torch1.11 export"):
        export_submission(_untrained(reduction="avg_pool", tta=("flip",)), str(tmp_path),
                          str(tmp_path), compat="torch1.11")
    zip_path = export_submission(_untrained(reduction="avg_pool"), str(tmp_path), str(tmp_path))
    assert zip_path.name == "submission.zip"
