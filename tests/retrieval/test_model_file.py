"""`search --model`: a submission.zip is searched directly; a training checkpoint, a zip without
saved_model.pt or a folder ends in one `error:` line saying what it is and what to run."""
from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import pytest
import torch

from guie.retrieval.model_file import ModelFileError, load_torchscript
from guie.train.checkpoint import save_checkpoint
from guie_cli.main import main


def zip_model(model_path: Path, zip_path: Path, member: str = "saved_model.pt",
              compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(zip_path, "w", compression=compression) as archive:
        archive.write(model_path, member)
    return zip_path


@pytest.fixture()
def small_index(tmp_path, load_photo) -> Path:
    root = tmp_path / "index"
    for label, name in (("cat", "chelsea"), ("cup", "coffee"), ("rocket", "rocket")):
        (root / label).mkdir(parents=True)
        load_photo(name).save(root / label / f"{name}.png")
        load_photo(name).resize((90, 60)).save(root / label / f"{name}_small.jpg")
    return root


def search(model: Path, index: Path, out: Path, capsys) -> tuple[int, str, list[dict]]:
    status = main(["search", "--model", str(model), "--index", str(index), "--query", str(index),
                   "--out", str(out), "--k", "2"])
    err = capsys.readouterr().err
    rows = []
    if (out / "neighbours.csv").exists():
        with open(out / "neighbours.csv", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    return status, err, rows


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_search_takes_a_submission_zip(compression, model_path, small_index, tmp_path, capsys):
    submission = zip_model(model_path, tmp_path / "submission.zip", compression=compression)
    status, _, from_file = search(model_path, small_index, tmp_path / "from_file", capsys)
    assert status == 0
    status, err, from_zip = search(submission, small_index, tmp_path / "from_zip", capsys)
    assert status == 0, err
    assert from_zip == from_file and len(from_zip) == 6 * 2
    page = (tmp_path / "from_zip" / "report.html").read_text(encoding="utf-8")
    assert str(submission) in page


def test_the_zip_and_the_file_give_one_model(model_path, tmp_path):
    submission = zip_model(model_path, tmp_path / "submission.zip")
    images = torch.randint(0, 256, (2, 3, 37, 91), dtype=torch.uint8)
    torch.testing.assert_close(load_torchscript(submission)(images),
                               load_torchscript(model_path)(images), rtol=0, atol=0)


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("name", ["final.pt", "last.pt"])
def test_a_training_checkpoint_says_which_command_exports_it(name, small_index, tmp_path, capsys):
    run = tmp_path / "run"
    checkpoint = save_checkpoint({"model": {"head.weight": torch.zeros(64, 8)}, "step": 3},
                                 run / "stage2" / name)
    status, err, _ = search(checkpoint, small_index, tmp_path / "out", capsys)
    assert status == 2
    line = one_error_line(err)
    assert f"{checkpoint} is a training checkpoint" in line and "not a TorchScript model" in line
    assert f"`python submit.py export --config CONFIG --checkpoint {run} --out {run / 'export'}`"\
        in line
    assert f"--model {run / 'export' / 'submission.zip'}" in line
    assert "corrupted" not in line and "PytorchStreamReader" not in line

    (run / "config.json").write_text('{"name": "smoke", "seed": 0}')  # the run's resolved config
    status, err, _ = search(checkpoint, small_index, tmp_path / "out", capsys)
    assert status == 2 and "`python submit.py export --config smoke --checkpoint" in err

    (run / "submission.zip").write_bytes(b"")  # `local` exported next to its stages
    status, err, _ = search(checkpoint, small_index, tmp_path / "out", capsys)
    assert status == 2 and f"this run's export is {run / 'submission.zip'}" in one_error_line(err)


def test_a_legacy_checkpoint_is_recognised(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"model": {}}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ModelFileError, match="is a training checkpoint"):
        load_torchscript(path)


def test_other_files_say_what_they_are(model_path, tmp_path, small_index, capsys):
    nested = zip_model(model_path, tmp_path / "nested.zip", member="submission/saved_model.pt")
    with pytest.raises(ModelFileError, match="holds submission/saved_model.pt, but the Kaggle "
                                             "host reads saved_model.pt only at the zip's root"):
        load_torchscript(nested)
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("notes.txt", "hello")
    with pytest.raises(ModelFileError, match="zip without saved_model.pt at its root, so not a "
                                             r"submission \(it holds notes.txt\)"):
        load_torchscript(other)
    text = tmp_path / "model.pt"
    text.write_text("not a model\n")
    with pytest.raises(ModelFileError, match="is not a TorchScript model torch can load"):
        load_torchscript(text)

    folder = tmp_path / "build"
    folder.mkdir()
    zip_model(model_path, folder / "submission.zip")
    status, err, _ = search(folder, small_index, tmp_path / "out", capsys)
    assert status == 2
    assert one_error_line(err).endswith(f"is a folder; did you mean `--model "
                                        f"{folder / 'submission.zip'}`?")
