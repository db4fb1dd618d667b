"""Training under torchrun: two CPU processes (gloo) give the same kind of output as one."""
import json
from dataclasses import replace

import pytest

from guie.config import load_config
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
    cfg = replace(cfg, max_hours=5.0)  # the session budget travels in the config, as data
    monkeypatch.setenv("GUIE_NPROC", "2")
    report = train_on_all_gpus(cfg, str(tmp_path / "out"))
    assert report["status"] == "done" and report["processes"] == 2
    assert 0.0 <= report["map5_stage2"] <= 1.0
    assert json.loads((tmp_path / "out" / "train-report.json").read_text()) == report
    assert (tmp_path / "out" / "stage2" / "final.pt").exists()
    # the workers loaded the resolved config as data, and config.json is what they ran
    assert load_config(tmp_path / "out" / "launch-config-node0.json") == cfg
    assert load_config(tmp_path / "out" / "config.json") == cfg


@pytest.mark.slow
def test_a_rank_whose_whole_batch_is_corrupt_keeps_step_with_the_other(sample_data, tmp_path,
                                                                         monkeypatch):
    """Two of every three images unreadable, one image per rank per step: often one rank's
    batch is empty while the other's is not. That rank must still join the all-reduce (a
    zero-weighted step), else the ranks' collectives drift apart: with this seed the two ranks
    meet 21 and 22 empty batches of 35, so without it the run fails (a rank waits on an
    all-reduce its peer never sends; the short process-group timeout bounds the wait)."""
    import pandas as pd

    from guie.config import DataSource

    root, sources = sample_data
    csv = next(s for s in sources if s.kind == "csv")
    rows = pd.read_csv(root / csv.location)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    rows["path"] = [str(broken) if i % 3 else str(root / "csv" / p)
                    for i, p in enumerate(rows["path"])]
    rows.to_csv(tmp_path / "labels.csv", index=False)
    smoke = get_config("smoke")
    cfg = replace(smoke, data=replace(
        smoke.data, root=str(tmp_path), sample_instances=0, heldout_classes=0,
        distractor_classes=0, num_workers=0,
        sources=(DataSource("mostly-broken", "csv", "labels.csv"),)))
    cfg = replace(cfg, stages=(replace(cfg.stage("stage2"), batch_size=1, epochs=0.2),))
    monkeypatch.setenv("GUIE_NPROC", "2")
    monkeypatch.setenv("GUIE_DIST_TIMEOUT_S", "60")
    report = train_on_all_gpus(cfg, str(tmp_path / "out"))
    assert report["status"] == "done"
    history = pd.read_csv(tmp_path / "out" / "stage2" / "history.csv")
    assert history["loss"].isna().any() and history["loss"].notna().any()
