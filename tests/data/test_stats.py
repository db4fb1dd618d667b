"""`data stats`: tables per source and merged, filtering, sample grids, overlap errors."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from guie.config import DataConfig
from guie.data.sources import filter_classes, merge_sources
from guie.data.stats import (class_histogram, format_stats, missing_sources, require_sources,
                             write_stats)
from guie.data.errors import DataError


def test_histogram_bins_cover_every_class():
    counts = np.array([1, 1, 2, 4, 5, 9, 60, 700])
    rows = {r["bin"]: (r["classes"], r["images"]) for r in class_histogram(counts)}
    assert rows["1"] == (2, 2) and rows["3-4"] == (1, 4) and rows["5-9"] == (2, 14)
    assert rows["50-99"] == (1, 60) and rows["500+"] == (1, 700)
    assert sum(c for c, _ in rows.values()) == len(counts)


def test_stats_tables_and_grids(sample_data, tmp_path):
    root, sources = sample_data
    cfg = DataConfig(min_per_class=5, max_per_class=4, split_seed=3)
    report = write_stats(sources, root, cfg, tmp_path, grid_images=6)

    df = merge_sources(sources, root)
    merged = report["merged"]
    assert (merged["images"], merged["classes"]) == (len(df), df["label"].nunique())
    assert (merged["label_min"], merged["label_max"]) == (0, df["label"].max())
    assert sum(r["classes"] for r in merged["histogram"]) == merged["classes"]
    tf, csv = (report["sources"][s.name] for s in sources)
    assert tf["images"] + csv["images"] == merged["images"]
    assert csv["label_min"] == sources[1].label_offset and csv["manifest"] is None
    kept = filter_classes(df, 5, 4, 0, 3)
    assert merged["filtering"]["config"]["images"] == len(kept)
    sweep = merged["filtering"]["sweep"]
    assert [r["classes"] for r in sweep] == sorted((r["classes"] for r in sweep), reverse=True)
    assert sweep[0]["images"] == sum(min(n, 4) for n in df["label"].value_counts())
    assert merged["disk_bytes"] > 0

    text = (tmp_path / "stats.txt").read_text()
    assert text.strip() == format_stats(report)
    for name in ("sample_tfrecord", "sample_csv", "merged", "min_per_class"):
        assert name in text
    assert json.loads((tmp_path / "stats.json").read_text())["merged"]["images"] == len(df)
    for src in sources:
        with Image.open(tmp_path / f"samples-{src.name}.png") as png:
            assert png.width > 300 and png.height > 100


def test_overlapping_label_ranges_are_an_error_unless_offset(sample_data, tmp_path):
    root, (tf, csv) = sample_data
    with pytest.raises(DataError, match="label ranges overlap.*label_offset"):
        write_stats((tf, replace(csv, label_offset=0)), root, DataConfig(), tmp_path)
    assert not (tmp_path / "stats.json").exists()


def test_missing_sources_name_what_is_missing_and_how_to_fetch_it(sample_data, tmp_path):
    root, (tf, csv) = sample_data
    hint = "`python submit.py data fetch --config x --dest d`"
    require_sources((tf, csv), root, hint)  # both there: nothing to say
    gone = replace(tf, name="gone", location="no-such-folder")
    assert missing_sources((tf, gone, csv), root) == [(gone, (root / "no-such-folder").absolute())]
    with pytest.raises(DataError) as caught:
        require_sources((tf, gone, csv), root, hint)
    looked_for = root.absolute() / "no-such-folder"
    assert str(caught.value) == (f"1 of 3 sources missing in {root}/ (gone) (looked for "
                                 f"{looked_for}); download them with {hint}")
    with pytest.raises(DataError, match=rf"^no data in {tmp_path}/: none of the 2 sources is "
                                        r"there \(looked for .*, \.\.\.\); download them with `"):
        require_sources((tf, csv), tmp_path, hint)
