import io
import json

import pytest
from PIL import Image

from guie.data.dataset import read_bytes
from guie.data.sample import build_sample_data
from guie.data.sources import merge_sources


def test_sample_has_both_formats_and_a_contiguous_label_space(sample_data):
    root, (tf_src, csv_src) = sample_data
    assert tf_src.kind == "tfrecord" and csv_src.kind == "csv"
    assert len(list((root / "tfrecord").glob("sample-train-*.tfrec"))) >= 2
    assert (root / "csv" / "labels.csv").is_file() and (root / "README.txt").is_file()
    df = merge_sources((tf_src, csv_src), root)
    assert sorted(df["label"].unique()) == list(range(160))
    assert df.groupby("label").size().eq(5).all()
    tf_labels = df.loc[df.source == tf_src.name, "label"]
    assert tf_labels.min() == 0 and tf_labels.max() == csv_src.label_offset - 1
    assert df["domain"].nunique() >= 6
    assert not set(df.loc[df.source == tf_src.name, "domain"]) & \
        set(df.loc[df.source == csv_src.name, "domain"])


def test_sample_sizes_include_strips_and_tiny_images(sample_data):
    root, sources = sample_data
    df = merge_sources(sources, root)
    sizes = [Image.open(io.BytesIO(read_bytes(r.path, r.offset, r.length))).size
             for r in df.itertuples()]
    ratios = [max(w, h) / min(w, h) for w, h in sizes]
    assert max(ratios) >= 3
    assert min(max(s) for s in sizes) <= 32
    assert max(max(s) for s in sizes) >= 120


def test_sample_is_deterministic_and_reused(tmp_path):
    a = build_sample_data(tmp_path / "a", num_instances=24, views_per_instance=2, seed=3)
    b = build_sample_data(tmp_path / "b", num_instances=24, views_per_instance=2, seed=3)
    assert a == b
    for rel in ("tfrecord/sample-train-00.tfrec", "csv/labels.csv"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()

    manifest = tmp_path / "a" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert build_sample_data(tmp_path / "a", num_instances=24, views_per_instance=2,
                             seed=3) == a
    assert manifest.stat().st_mtime_ns == stamp  # complete build: nothing rewritten

    build_sample_data(tmp_path / "a", num_instances=24, views_per_instance=2, seed=4)
    assert json.loads(manifest.read_text())["params"]["seed"] == 4
    (tmp_path / "a" / "csv" / "labels.csv").unlink()  # incomplete build -> rebuilt
    build_sample_data(tmp_path / "a", num_instances=24, views_per_instance=2, seed=4)
    assert (tmp_path / "a" / "csv" / "labels.csv").is_file()


def test_manifest_names_each_photos_label_range(sample_data):
    from guie.data.sample_split import photo_label_ranges
    from guie.data.sources import merge_sources

    root, sources = sample_data
    photos = photo_label_ranges(root)
    labels = merge_sources(sources, root)["label"]
    covered = sorted(label for p in photos for label in range(*p["labels"]))
    assert covered == sorted(labels.unique())  # every label in exactly one photo's range
    assert len(photos) >= 15


def test_photo_split_holds_out_whole_photos(sample_data):
    from guie.config import DataConfig
    from guie.data.sample_split import photo_label_ranges, photo_split
    from guie.data.sources import merge_sources

    root, sources = sample_data
    cfg = DataConfig(heldout_classes=20, distractor_classes=10, distractors_per_class=2)
    photos = photo_label_ranges(root)
    split, held = photo_split(merge_sources(sources, root), cfg, photos)
    of = {label: p["photo"] for p in photos for label in range(*p["labels"])}
    train_photos = {of[label] for label in split.train["label"]}
    eval_photos = {of[label] for label in split.query["label"]} | \
        {of[label] for label in split.index["label"]}
    assert eval_photos <= set(held) and not (train_photos & set(held))
    assert split.query["label"].nunique() == 20 and len(split.query) == 20
    assert split.index["distractor"].sum() == 20  # 10 classes x 2 images
    again, held_again = photo_split(merge_sources(sources, root), cfg, photos)
    assert held_again == held and again.query.equals(split.query)
    other, held_other = photo_split(merge_sources(sources, root),
                                    DataConfig(heldout_classes=20, distractor_classes=10,
                                               split_seed=1), photos)
    assert held_other != held
    with pytest.raises(ValueError, match="takes every sample photo"):
        photo_split(merge_sources(sources, root), DataConfig(heldout_classes=160), photos)
