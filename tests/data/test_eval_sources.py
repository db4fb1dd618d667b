"""Evaluation sources: GPR1200's layout and domains, class folders, CSV, training duplicates."""
from __future__ import annotations

import shutil

import pandas as pd
import pytest

from eval_photos import build_folders, build_gpr1200
from guie.config import EvalSource
from guie.data.eval_sources import drop_training_duplicates, load_eval_source
from guie.data.errors import DataError


def test_gpr1200_layout_gives_classes_and_its_six_domains(tmp_path):
    build_gpr1200(tmp_path / "GPR1200", {0: "clock", 199: "horse", 200: "cell",
                                         450: "checkerboard", 1000: "lfw:3"})
    frame = load_eval_source(EvalSource("gpr", "gpr1200", "GPR1200"), tmp_path)
    assert len(frame) == 15 and frame["query"].all()  # leave-one-out: GPR1200's protocol
    by_class = frame.groupby("class_name")["domain"].first().to_dict()
    assert by_class == {"0": "landmarks", "199": "landmarks", "200": "nature", "450": "sketches",
                        "1000": "faces"}
    assert frame["label"].nunique() == 5 and (frame["offset"] == -1).all()
    # the images/ folder itself works too
    assert len(load_eval_source(EvalSource("gpr", "gpr1200", "GPR1200/images"), tmp_path)) == 15


def test_gpr1200_refuses_other_names(tmp_path):
    build_gpr1200(tmp_path / "g", {3: "horse"})
    (tmp_path / "g" / "images" / "holiday.jpg").write_bytes(
        (tmp_path / "g" / "images" / "3_horse0.jpg").read_bytes())
    with pytest.raises(DataError, match="holiday.jpg is not named <class>_<name>"):
        load_eval_source(EvalSource("g", "gpr1200", str(tmp_path / "g")), ".")


def test_class_folders_with_queries_per_class(tmp_path):
    build_folders(tmp_path / "mine", ["horse", "cell"], per_class=4)
    frame = load_eval_source(EvalSource("mine", "folders", "mine", domain="memes",
                                        queries_per_class=1), tmp_path)
    assert set(frame["domain"]) == {"memes"} and frame["query"].sum() == 2
    assert frame.groupby("class_name")["query"].sum().to_dict() == {"cell": 1, "horse": 1}
    with pytest.raises(DataError, match="no images in class sub-folders"):
        load_eval_source(EvalSource("x", "folders", str(tmp_path / "mine" / "horse")), ".")


def test_csv_with_domains_and_a_bad_row(tmp_path):
    build_folders(tmp_path / "imgs", ["horse"], per_class=2)
    csv = tmp_path / "bench.csv"
    csv.write_text("path,label,domain\nimgs/horse/0.jpg,cup,dishes\nimgs/horse/1.jpg,cup,\n")
    frame = load_eval_source(EvalSource("b", "csv", str(csv), domain="misc"), ".")
    assert frame["domain"].tolist() == ["dishes", "misc"]
    csv.write_text("path,label\nimgs/horse/9.jpg,cup\n")
    with pytest.raises(DataError, match=r"bench.csv, row 2: .*9.jpg does not exist"):
        load_eval_source(EvalSource("b", "csv", str(csv)), ".")


def test_an_image_also_in_the_training_data_is_dropped(tmp_path):
    build_folders(tmp_path / "bench", ["horse", "cell"], per_class=3)
    trained = tmp_path / "train" / "x.jpg"
    trained.parent.mkdir()
    shutil.copy(tmp_path / "bench" / "horse" / "1.jpg", trained)
    blob = tmp_path / "train" / "shard.bin"  # the same bytes as a record inside a shard
    payload = (tmp_path / "bench" / "cell" / "2.jpg").read_bytes()
    blob.write_bytes(b"header--" + payload + b"trailer")
    train = pd.DataFrame({"path": [str(trained), str(blob)], "offset": [-1, 8],
                          "length": [-1, len(payload)], "label": [0, 1]})
    frame = load_eval_source(EvalSource("bench", "folders", str(tmp_path / "bench")), ".")
    kept, dropped = drop_training_duplicates(frame, train)
    assert dropped == 2 and len(kept) == 4
    assert not {str(tmp_path / "bench" / "horse" / "1.jpg"),
                str(tmp_path / "bench" / "cell" / "2.jpg")} & set(kept["path"])
