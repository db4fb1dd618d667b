"""What `search --model` was given, and the TorchScript model in it.

Users hold three kinds of `.pt`/`.zip` file, and torch.jit.load explains none of them ("your
checkpoint file is corrupted", "PytorchStreamReader failed locating file constants.pkl"):
- a TorchScript file (`saved_model.pt`): loaded as it is;
- `submission.zip`, what `export` and the inference kernel write and what Kaggle scores: the
  `saved_model.pt` at its root is loaded straight from the zip, as the host would;
- a training checkpoint (`stage*/final.pt`, `last.pt`: `torch.save` of weights and optimizer
  state), which holds no program to run: refused with the command that exports it.
Both TorchScript files and checkpoints are zip archives; TorchScript ones carry `code/`.
"""
from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path

import torch

from guie.errors import UserError

SUBMISSION_MEMBER = "saved_model.pt"  # where the Kaggle host looks inside submission.zip
_PICKLE_MAGIC = b"\x80"  # torch.save's legacy (pre-zip) format starts with a pickle protocol


class ModelFileError(UserError):
    """`--model` names no loadable TorchScript model; the message says what it is instead and
    which command makes the right file."""


def load_torchscript(path: Path | str, device: torch.device | str = "cpu"
                     ) -> torch.jit.ScriptModule:
    """The TorchScript model in `path` (a TorchScript file or a submission.zip), in eval mode."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(_folder_message(path))
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if SUBMISSION_MEMBER in names:
                # torch.jit.load reads a file object whole anyway; nothing is extracted to disk.
                data = archive.read(SUBMISSION_MEMBER)
                return _jit_load(io.BytesIO(data), f"{path} ({SUBMISSION_MEMBER} inside)", device)
        kind = _archive_kind(names)
        if kind == "checkpoint":
            raise ModelFileError(checkpoint_message(path))
        if kind is None:
            raise ModelFileError(_zip_message(path, names))
    else:
        with open(path, "rb") as f:
            if f.read(1) == _PICKLE_MAGIC:
                raise ModelFileError(checkpoint_message(path))
    return _jit_load(str(path), str(path), device)


def _jit_load(source, shown: str, device) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # TorchScript is what the competition host loads: torch's deprecation notice is noise.
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=FutureWarning)
        try:
            return torch.jit.load(source, map_location=device).eval()
        except RuntimeError as exc:
            text = str(exc).strip()
            first_line = text.splitlines()[0] if text else type(exc).__name__
            raise ModelFileError(f"{shown} is not a TorchScript model torch can load ({first_line})"
                                 f"; `python submit.py export` writes one") from exc


def _archive_kind(names: list[str]) -> str | None:
    """'torchscript', 'checkpoint' (torch.save) or None (some other zip) from the member names."""
    if any("/code/" in n for n in names) and any(n.endswith("/constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("/data.pkl") for n in names):
        return "checkpoint"
    return None


def checkpoint_message(path: Path) -> str:
    """What a training checkpoint is and how to turn it into something `search` loads."""
    run = path.parent.parent if path.parent.name.startswith("stage") else path.parent
    message = (f"{path} is a training checkpoint (weights and optimizer state saved by torch.save),"
               f" not a TorchScript model; ")
    exported = next((p for p in (run / "submission.zip", run / SUBMISSION_MEMBER) if p.is_file()),
                    None)
    if exported is not None:  # `local` exports next to its stages
        return message + f"this run's export is {exported}: use `--model {exported}`"
    return message + (f"export it with `python submit.py export --config {_trained_config(run)} "
                      f"--checkpoint {run} --out {run / 'export'}` (with the config and overrides "
                      f"it was trained with) and use `--model {run / 'export' / 'submission.zip'}`")


def _trained_config(run: Path) -> str:
    """The shipped config a training output folder names in its config.json, else CONFIG."""
    from guie.configs import list_configs

    try:
        name = json.loads((run / "config.json").read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        return "CONFIG"
    return name if name in list_configs() else "CONFIG"


def _folder_message(path: Path) -> str:
    found = [p for p in (path / "submission.zip", path / SUBMISSION_MEMBER) if p.is_file()]
    return (f"--model {path} is a folder; " + (f"did you mean `--model {found[0]}`?" if found else
            "give the exported saved_model.pt or submission.zip (`python submit.py export` "
            "writes both)"))


def _zip_message(path: Path, names: list[str]) -> str:
    nested = [n for n in names if n.rsplit("/", 1)[-1] == SUBMISSION_MEMBER]
    if nested:
        return (f"{path} holds {nested[0]}, but the Kaggle host reads {SUBMISSION_MEMBER} only "
                f"at the zip's root: zip it without its folder (`python submit.py export` does)")
    return (f"{path} is a zip without {SUBMISSION_MEMBER} at its root, so not a submission "
            f"(it holds {', '.join(names[:3]) or 'nothing'}{', ...' if len(names) > 3 else ''})")
