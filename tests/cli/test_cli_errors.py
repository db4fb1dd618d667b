"""User mistakes end in one `error:` line and exit 2 in every command; bugs keep their traceback.

Each case runs `guie_cli.main.main(argv)` as `python submit.py ARGV` does and reads stderr.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import guie_cli.local
from guie_cli.main import USER_ERROR_STATUS, main, user_error_message


def run(argv: list[str], capsys) -> tuple[int, str]:
    status = main(argv)
    return status, capsys.readouterr().err


def assert_one_error_line(err: str, *expected: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], lines[0]


SHIPPED = "(shipped: "
CONFIG_MISTAKES = [
    (["stage2.epoch=3"],
     ["override `stage2.epoch=3`", "has no field `epoch`", "did you mean `stage2.epochs`?"]),
    (["stage2.epochs=three"],
     ["`stage2.epochs` takes a number, got 'three'", "(currently `stage2.epochs="]),
    (["--config", "tinyy"], ["unknown config `tinyy`", "did you mean `tiny`?", SHIPPED, "smoke"]),
    (["stage2epochs"], ["`stage2epochs` is not KEY=VALUE", "did you mean `stage2.epochs=VALUE`?"]),
    (["stage2.epochs"], ["has no value", "write `stage2.epochs=VALUE`"]),
    (["stage3.epochs=2"], ["no stage `stage3`", "its stages are `stage1`, `stage2`",
                           "`stage1.epochs=2`"]),
    (["epochs=2"], ["did you mean `stage1.epochs` or `stage2.epochs`?"]),
    (["export.compat=torch1.1"], ["takes one of none, torch1.11", "did you mean `torch1.11`?"]),
]


@pytest.mark.parametrize("argv, expected", CONFIG_MISTAKES)
def test_config_mistakes_in_local(argv, expected, tmp_path, capsys):
    status, err = run(["local", "--out", str(tmp_path), *argv], capsys)
    assert status == USER_ERROR_STATUS
    assert_one_error_line(err, *expected)
    assert not any(tmp_path.iterdir())  # stopped before doing anything


@pytest.mark.parametrize("command", [
    ["train"], ["export", "--checkpoint", "build/nothing"], ["local", "--in-process"]])
@pytest.mark.parametrize("argv, expected", [CONFIG_MISTAKES[0], CONFIG_MISTAKES[2]])
def test_config_mistakes_in_every_config_command(command, argv, expected, tmp_path, capsys):
    status, err = run([*command, "--out", str(tmp_path / "out"), *argv], capsys)
    assert status == USER_ERROR_STATUS
    assert_one_error_line(err, *expected)


@pytest.mark.parametrize("argv", [["data", "stats", "--config", "tinyy"],
                                  ["data", "fetch", "--config", "tinyy"]])
def test_unknown_config_in_data_commands(argv, capsys):
    status, err = run(argv, capsys)
    assert status == USER_ERROR_STATUS
    assert_one_error_line(err, "unknown config `tinyy`", "did you mean `tiny`?", SHIPPED)


def test_config_mistake_in_push(tmp_path, capsys):
    status, err = run(["push", "--dry-run", "--workdir", str(tmp_path), "--config", "smoke",
                       "stage2.epoch=3"], capsys)
    assert status == USER_ERROR_STATUS
    assert_one_error_line(err, "did you mean `stage2.epochs`?")


def test_data_stats_without_data_suggests_fetch(tmp_path, capsys):
    status, err = run(["data", "stats", "--root", str(tmp_path / "data"),
                       "--out", str(tmp_path / "stats")], capsys)
    assert status == USER_ERROR_STATUS
    assert_one_error_line(err, f"no data in {tmp_path / 'data'}/", "none of the 3 sources",
                          f"`python submit.py data fetch --config third_place --dest "
                          f"{tmp_path / 'data'}`")
    assert not (tmp_path / "stats").exists()


def test_data_stats_manifests_without_a_fetch_suggests_fetch(tmp_path, capsys):
    status, err = run(["data", "stats", "--manifests", "--root", str(tmp_path)], capsys)
    assert status == USER_ERROR_STATUS
    assert_one_error_line(err, "no guie-manifest.json under", "python submit.py data fetch")


@pytest.mark.parametrize("how", ["--debug first", "--debug after the command", "GUIE_DEBUG=1"])
def test_debug_shows_the_traceback(how, monkeypatch, capsys):
    argv = ["local", "--config", "tinyy"]
    if how == "--debug first":
        argv = ["--debug", *argv]
    elif how == "--debug after the command":
        argv = [*argv, "--debug"]
    else:
        monkeypatch.setenv("GUIE_DEBUG", "1")
    status, err = run(argv, capsys)
    assert status == USER_ERROR_STATUS
    assert err.startswith("Traceback (most recent call last):")
    assert 'guie/configs/__init__.py", line' in err and "raise ConfigError(" in err
    assert err.splitlines()[-1].startswith("error: unknown config `tinyy`")


def test_without_debug_there_is_no_traceback(monkeypatch, capsys):
    monkeypatch.setenv("GUIE_DEBUG", "0")
    status, err = run(["local", "--config", "tinyy"], capsys)
    assert status == USER_ERROR_STATUS and "Traceback" not in err


def test_a_bug_keeps_its_traceback(monkeypatch):
    # A ValueError from inside numpy is no message for the user: main must let it through.
    def broken(args):
        return np.zeros(3).reshape(2)
    monkeypatch.setattr(guie_cli.local, "cmd_train", broken)
    with pytest.raises(ValueError, match="cannot reshape"):
        main(["train"])
    monkeypatch.setattr(guie_cli.local, "cmd_train", lambda args: {}["missing"])
    with pytest.raises(KeyError):
        main(["train"])


def test_which_errors_are_the_users():
    from guie.config_io import ConfigError
    from guie.data.errors import DataError

    assert user_error_message(ConfigError("bad")) == "bad"
    assert user_error_message(DataError("no shards")) == "no shards"
    missing = FileNotFoundError(2, "No such file or directory", "build/x/final.pt")
    assert user_error_message(missing) == "build/x/final.pt: no such file or directory"
    template = Path(guie_cli.local.__file__).parents[2] / "kernels" / "train.ipynb.missing"
    assert user_error_message(FileNotFoundError(2, "No such file", str(template))) is None
    assert user_error_message(RuntimeError("CUDA error")) is None
    assert user_error_message(TypeError("bad operand")) is None
    try:
        np.zeros(3).reshape(2)
    except ValueError as exc:  # raised outside the kit's code
        assert user_error_message(exc) is None

    from guie.data.fetch import DatasetRef
    from guie.errors import UserError

    with pytest.raises(UserError) as checked:  # the kit's own check of a user value
        DatasetRef.parse("just-a-slug")
    assert isinstance(checked.value, ValueError)  # callers catching ValueError still do
    assert user_error_message(checked.value).startswith("'just-a-slug': expected a Kaggle dataset")
    with pytest.raises(ValueError) as slipped:  # "²".isdigit() passes the check, int() fails
        DatasetRef.parse("owner/slug/²")
    assert user_error_message(slipped.value) is None  # not a UserError: a bug
    # Only the type decides: a kit invariant's ValueError is a bug wherever it is raised.
    assert user_error_message(ValueError("internal invariant")) is None


def test_every_error_the_kit_declares_for_users_is_a_user_error():
    """The exception types the kit raises for user mistakes all derive from guie.errors.UserError,
    so the command line needs no table of them."""
    import importlib

    from guie.errors import UserError

    for module, name in [("guie.config_io", "ConfigError"), ("guie.data.errors", "DataError"),
                         ("guie.kaggle.results", "KaggleError"),
                         ("guie.kaggle.packaging", "PackagingError"),
                         ("guie.kaggle.notebooks", "NotebookError"),
                         ("guie.kaggle.platform", "PlatformError"),
                         ("guie.retrieval.index", "ModelContractError"),
                         ("guie.retrieval.model_file", "ModelFileError")]:
        assert issubclass(getattr(importlib.import_module(module), name), UserError), name


def test_a_bad_dataset_reference_in_data_fetch(capsys):
    status, err = run(["data", "fetch", "just-a-slug"], capsys)
    assert status == USER_ERROR_STATUS
    assert_one_error_line(err, "expected a Kaggle dataset as owner/slug or owner/slug/VERSION")


def test_usage_mistakes_end_in_an_error_line_with_the_nearest_choice(capsys):
    status, err = run(["lcoal"], capsys)
    assert status == USER_ERROR_STATUS
    assert err.splitlines()[0].startswith("usage: submit.py")
    assert err.splitlines()[-1].startswith("error: submit.py: argument COMMAND: invalid choice")
    assert err.rstrip().endswith("did you mean `local`?")

    status, err = run(["local", "--stage2.epochs=3"], capsys)
    assert status == USER_ERROR_STATUS
    assert err.splitlines()[-1].endswith("config overrides take no leading `--` (write "
                                         "`stage2.epochs=3`)")


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "--debug" in capsys.readouterr().out
