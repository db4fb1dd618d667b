import numpy as np
import pandas as pd
import pytest

from guie.config import DataConfig, DataSource
from guie.data.errors import DataError
from guie.data.sources import (
    COLUMNS, describe, filter_classes, load_source, load_split, merge_sources,
    split_heldout,
)
from guie.data.tfrecord import encode_example, write_tfrecord


def _shards(folder, labels_per_shard):
    folder.mkdir(parents=True, exist_ok=True)
    for k, labels in enumerate(labels_per_shard):
        write_tfrecord(folder / f"x-train-{k:02d}.tfrec",
                       [encode_example(b"img", lab) for lab in labels])


def _csv(folder, rows, header="path,label", make_files=True):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [header]
    for path, label in rows:
        lines.append(f"{path},{label}")
        if make_files:
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(b"jpeg")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder / "labels.csv"


def _table(counts: dict[int, int]) -> pd.DataFrame:
    labels = np.repeat(list(counts), list(counts.values()))
    n = len(labels)
    return pd.DataFrame({"path": [f"/img/{i}.jpg" for i in range(n)], "offset": -1,
                         "length": -1, "label": labels.astype(np.int64), "domain": "d",
                         "source": "s"})


def test_load_tfrecord_source(tmp_path):
    _shards(tmp_path / "tf", [[0, 1, 1], [2, 2]])
    src = DataSource(name="tf", kind="tfrecord", location="tf", domain="landmarks",
                     label_offset=10)
    df = load_source(src, tmp_path)
    assert tuple(df.columns) == COLUMNS
    assert df["label"].tolist() == [10, 11, 11, 12, 12]
    assert df["offset"].dtype == np.int64 and (df["offset"] > 0).all()
    assert df["path"].str.startswith(str(tmp_path)).all()
    assert set(df["domain"]) == {"landmarks"} and set(df["source"]) == {"tf"}
    with pytest.raises(DataError, match="no shards match"):
        load_source(DataSource(name="e", kind="tfrecord", location="tf", pattern="*.nope"),
                    tmp_path)


def test_load_csv_source(tmp_path):
    csv = _csv(tmp_path / "c", [("a/1.jpg", 0), ("b/2.jpg", 3)])
    df = load_source(DataSource(name="c", kind="csv", location=str(csv), label_offset=5), "/x")
    assert df["label"].tolist() == [5, 8]
    assert df["path"].tolist() == [str(tmp_path / "c/a/1.jpg"), str(tmp_path / "c/b/2.jpg")]
    assert df["offset"].tolist() == [-1, -1] and df["length"].tolist() == [-1, -1]


@pytest.mark.parametrize("rows,header,pattern", [
    ([("a.jpg", 0)], "file,label", r"labels\.csv: header \(row 0\) lacks column\(s\) \['path'\]"),
    ([("a.jpg", 0), ("b.jpg", "x")], "path,label", r"labels\.csv: row 2 \(line 3\), field 'label'"),
    ([("a.jpg", 0), ("b.jpg", -1)], "path,label", r"row 2 \(line 3\), field 'label'"),
])
def test_csv_errors_name_file_row_field(tmp_path, rows, header, pattern):
    csv = _csv(tmp_path, rows, header=header)
    with pytest.raises(DataError, match=pattern):
        load_source(DataSource(name="c", kind="csv", location=str(csv)), tmp_path)


def test_csv_missing_image(tmp_path):
    _csv(tmp_path, [("a.jpg", 0), ("b.jpg", 1)])
    (tmp_path / "b.jpg").unlink()
    with pytest.raises(DataError,
                       match=r"labels\.csv: row 2 \(line 3\), field 'path': image 'b\.jpg'"):
        load_source(DataSource(name="c", kind="csv", location="labels.csv"), tmp_path)


def test_overlapping_label_ranges_are_an_error(tmp_path):
    _shards(tmp_path / "tf", [[0, 1, 2, 3]])
    _csv(tmp_path / "c", [("a.jpg", 0), ("b.jpg", 1)])
    tf = DataSource(name="tf", kind="tfrecord", location="tf")
    csv = DataSource(name="c", kind="csv", location="c/labels.csv", label_offset=2)
    with pytest.raises(DataError, match=r"'tf' has labels 0\.\.3 .* 'c' has 2\.\.3.*label_offset"):
        merge_sources([tf, csv], tmp_path)
    merged = merge_sources([tf, DataSource(**{**csv.__dict__, "label_offset": 4})], tmp_path)
    assert sorted(merged["label"].unique().tolist()) == [0, 1, 2, 3, 4, 5]


def test_filter_classes():
    df = _table({0: 1, 1: 3, 2: 10})
    out = filter_classes(df, min_per_class=2, max_per_class=4, resample_min_per_class=0, seed=0)
    assert out["label"].value_counts().to_dict() == {1: 3, 2: 4}
    again = filter_classes(df, 2, 4, 0, seed=0)
    pd.testing.assert_frame_equal(out, again)
    assert set(out["path"]) <= set(df["path"])

    up = filter_classes(df, 1, 0, resample_min_per_class=7, seed=1)
    counts = up["label"].value_counts().to_dict()
    assert counts == {0: 7, 1: 7, 2: 10}
    # 3 images resampled to 7: every one twice, one of them thrice.
    assert sorted(up[up.label == 1]["path"].value_counts().tolist()) == [2, 2, 3]


def test_split_heldout_sizes_and_disjointness():
    df = _table({lab: 2 + lab % 4 for lab in range(40)})
    cfg = DataConfig(heldout_classes=6, queries_per_class=2, distractor_classes=5,
                     distractors_per_class=2, split_seed=3)
    split = split_heldout(df, cfg)
    q_classes = set(split.query["label"])
    d_classes = set(split.index.loc[split.index["distractor"], "label"])
    assert len(q_classes) == 6 and len(d_classes) == 5 and not q_classes & d_classes
    assert not (q_classes | d_classes) & set(split.train["label"])
    assert (split.query["label"].value_counts() == 2).all()
    counts = df["label"].value_counts()
    assert all(counts[c] >= 3 for c in q_classes)  # a query needs at least one match
    assert len(split.index) == sum(counts[c] - 2 for c in q_classes) + 5 * 2
    assert set(split.index.loc[~split.index["distractor"], "label"]) == q_classes
    assert not set(split.query["path"]) & set(split.index["path"])
    assert len(split.train) == len(df) - sum(counts[c] for c in q_classes | d_classes)
    again = split_heldout(df, cfg)
    pd.testing.assert_frame_equal(split.query, again.query)
    with pytest.raises(DataError, match="need 50 held-out classes"):
        split_heldout(df, DataConfig(heldout_classes=50))


def test_load_split_filters_training_only(tmp_path):
    _shards(tmp_path / "tf", [[lab for lab in range(10) for _ in range(2 + lab)]])
    cfg = DataConfig(sources=(DataSource(name="tf", kind="tfrecord", location="tf"),),
                     root=str(tmp_path), min_per_class=5, heldout_classes=3,
                     queries_per_class=1, split_seed=0)
    split = load_split(cfg)
    assert split.train["label"].value_counts().min() >= 5
    held = set(split.query["label"])
    full = merge_sources(cfg.sources, cfg.root)["label"].value_counts()
    assert len(split.query) + len(split.index) == sum(full[c] for c in held)
    stats = describe(split.train)
    assert stats["per_source"]["tf"]["classes"] == stats["classes"]
    assert describe(split.train.iloc[:0])["images"] == 0


def test_load_split_builds_the_sample_when_asked(tmp_path):
    cfg = DataConfig(root=str(tmp_path), sample_instances=12, sample_views=3, min_per_class=2,
                     heldout_classes=2, queries_per_class=1)
    split = load_split(cfg)
    assert (tmp_path / "manifest.json").is_file()
    assert len(split.query) == 2 and len(split.index) == 4
    assert split.train["label"].nunique() == 10
