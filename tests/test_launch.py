"""Training under torchrun: two CPU processes (gloo) give the same kind of output as one."""
import json
from dataclasses import replace

import pytest

from guie.configs import get_config
from guie.launch import train_on_all_gpus


@pytest.mark.slow
def test_two_process_training_finishes_and_reports(sample_data, tmp_path, monkeypatch):
    root, sources = sample_data
    smoke = get_config("smoke")
    cfg = replace(smoke, data=replace(smoke.data, root=str(root), sources=tuple(sources),
                                      sample_instances=0, heldout_classes=20,
                                      distractor_classes=0, num_workers=0))
    cfg = cfg.replace_stage("stage1", epochs=1).replace_stage("stage2", epochs=0.2)
    monkeypatch.setenv("GUIE_NPROC", "2")
    report = train_on_all_gpus(cfg, str(tmp_path / "out"))
    assert report["status"] == "done"
    assert 0.0 <= report["map5_stage2"] <= 1.0
    assert json.loads((tmp_path / "out" / "train-report.json").read_text()) == report
    assert (tmp_path / "out" / "stage2" / "final.pt").exists()
