"""Find an attached Kaggle input by reference, at run time, in whatever layout Kaggle mounts it.

Kaggle has moved its mounts (field guide 5a): attached datasets now appear at
`/kaggle/input/datasets/<owner>/<slug>/`, competition data at `/kaggle/input/competitions/<slug>/`
and the outputs of attached notebooks at `/kaggle/input/notebooks/<owner>/<slug>/`, while older
sessions show `/kaggle/input/<slug>/`. No announcement fixes either, so the kernels carry
references (`dataset:owner/slug`, `competition:slug`, `notebook:owner/slug`) and resolve each
here: the current layout, then the legacy one, then a bounded search of the input root for a
marker file the kit wrote into that input (or, for inputs the kit did not write, a folder named
after the slug). A missing input stops the kernel at once with the reference and what the input
root holds.

Standard library only: the training and inference kernels run this module's text (injected by
the notebook builder) before `guie` itself is importable, to find the source dataset.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

KAGGLE_INPUT = "/kaggle/input"
KINDS = ("dataset", "competition", "notebook")
# Where each kind lives under the input root in the current layout.
CURRENT_FOLDERS = {"dataset": "datasets", "competition": "competitions", "notebook": "notebooks"}
# Files the kit writes into the inputs it creates, found by the search when no layout matches.
SOURCE_MARKER = "guie-source.json"  # the source dataset's root: {"hash": ...}
WHEELS_MARKER = "guie-wheels.json"  # the wheels dataset's root: {"requirements": [...]}
RUN_MARKER = "guie-run.json"  # a training kernel's output: which run it holds
PUSH_MARKER = "guie-push.json"  # every kernel's output: the nonce of the push it ran
WEIGHTS_PREFIX = "kaggle:"  # model.pretrained_path = "kaggle:OWNER/SLUG/FILE"
SEARCH_DEPTH = 4  # /kaggle/input/datasets/<owner>/<slug> is 3 deep; one more for wrappers
LISTED_ENTRIES = 60  # how much of the input root an error message lists


class InputNotFound(FileNotFoundError):
    pass


@dataclass(frozen=True)
class InputRef:
    kind: str  # dataset, competition or notebook
    owner: str  # "" for a competition
    slug: str

    @classmethod
    def parse(cls, text: str) -> "InputRef":
        """`dataset:owner/slug`, `notebook:owner/slug` or `competition:slug`."""
        kind, sep, rest = text.partition(":")
        parts = rest.split("/")
        if not sep or kind not in KINDS:
            raise ValueError(f"input reference {text!r}: expected KIND:OWNER/SLUG with KIND one "
                             f"of {', '.join(KINDS)}")
        if kind == "competition":
            if len(parts) != 1 or not parts[0]:
                raise ValueError(f"input reference {text!r}: expected competition:SLUG")
            return cls(kind, "", parts[0])
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"input reference {text!r}: expected {kind}:OWNER/SLUG")
        return cls(kind, parts[0], parts[1])

    def __str__(self) -> str:
        return f"{self.kind}:{self.owner + '/' if self.owner else ''}{self.slug}"

    @property
    def ref(self) -> str:
        """owner/slug, as kernel-metadata.json names it (the slug alone for a competition)."""
        return f"{self.owner}/{self.slug}" if self.owner else self.slug

    def candidates(self, input_root: str | os.PathLike) -> list[Path]:
        """The folders the current layout, then the legacy one, would mount it at."""
        root = Path(input_root)
        current = root / CURRENT_FOLDERS[self.kind]
        current = current / self.owner / self.slug if self.owner else current / self.slug
        return [current, root / self.slug]


def _walk_dirs(root: Path, max_depth: int):
    """Every folder under root down to max_depth (breadth first), symlinks followed once."""
    level, seen = [root], set()
    for _ in range(max_depth):
        following = []
        for folder in level:
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                if entry.is_dir():
                    real = os.path.realpath(entry.path)
                    if real not in seen:
                        seen.add(real)
                        following.append(Path(entry.path))
                        yield Path(entry.path)
        level = following


def describe_input_root(input_root: str | os.PathLike, depth: int = 2) -> str:
    """What the input root holds, `depth` levels deep, one path per line."""
    root = Path(input_root)
    if not root.is_dir():
        return f"  ({root} does not exist)"
    found = [p.relative_to(root).as_posix() + "/" for p in _walk_dirs(root, depth)]
    files = [p.name for p in root.iterdir() if p.is_file()] if root.is_dir() else []
    lines = sorted(found + files)
    shown = lines[:LISTED_ENTRIES]
    more = [f"  ... and {len(lines) - len(shown)} more"] if len(lines) > len(shown) else []
    return "\n".join([f"  {line}" for line in shown] + more) or f"  ({root} is empty)"


def resolve_input(reference: str | InputRef, input_root: str | os.PathLike = KAGGLE_INPUT,
                  marker: str | None = None) -> Path:
    """The folder an attached input is mounted at; InputNotFound with what is there otherwise.

    marker: a file the kit wrote at the input's root; a candidate folder without it does not
    count, and the search looks for it. Without a marker the search takes a folder named after
    the slug.
    """
    ref = reference if isinstance(reference, InputRef) else InputRef.parse(reference)
    root = Path(input_root)

    def matches(folder: Path) -> bool:
        return folder.is_dir() and (marker is None or (folder / marker).is_file())

    for folder in ref.candidates(root):
        if matches(folder):
            return folder
    if root.is_dir():
        for folder in _walk_dirs(root, SEARCH_DEPTH):
            if (folder / marker).is_file() if marker else (folder.name == ref.slug):
                return folder
    what = f" (looked for the kit's {marker})" if marker else ""
    raise InputNotFound(
        f"{ref}: not attached to this kernel{what}. Tried "
        f"{', '.join(str(c) for c in ref.candidates(root))} and searched {root} "
        f"{SEARCH_DEPTH} levels deep. {root} holds:\n{describe_input_root(root)}\n"
        f"Attach {ref.ref} to the kernel (kernel-metadata.json) or push it again with "
        "`submit.py push`.")


def record_push(out_dir: str | os.PathLike, push_nonce: str) -> None:
    """A kernel's first act: write the nonce of the push it runs into its output, so that a read
    of "the latest session" that still shows the previous push is told apart (Kaggle can answer
    the first reads after a re-push with the previous session: kaggle-cli PRs 1177, 1201)."""
    os.makedirs(out_dir, exist_ok=True)
    Path(out_dir, PUSH_MARKER).write_text(json.dumps({"push_nonce": push_nonce}) + "\n")


def parse_weights_ref(value: str) -> tuple[InputRef, str]:
    """`kaggle:OWNER/SLUG/FILE` -> (dataset reference, FILE); FILE may be '' (the folder)."""
    body = value[len(WEIGHTS_PREFIX):] if value.startswith(WEIGHTS_PREFIX) else None
    parts = body.split("/", 2) if body is not None else []
    if len(parts) < 2 or not all(parts[:2]):
        raise ValueError(f"{value!r}: a Kaggle reference is {WEIGHTS_PREFIX}OWNER/SLUG/FILE")
    return InputRef("dataset", parts[0], parts[1]), (parts[2] if len(parts) == 3 else "")


def is_kaggle_ref(value: str) -> bool:
    return value.startswith(WEIGHTS_PREFIX)


def resolve_kaggle_path(value: str, input_root: str | os.PathLike = KAGGLE_INPUT) -> str:
    """A `kaggle:OWNER/SLUG/FILE` value as the path it is mounted at; other values unchanged."""
    if not is_kaggle_ref(value):
        return value
    ref, inner = parse_weights_ref(value)
    folder = resolve_input(ref, input_root)
    path = folder / inner if inner else folder
    if not path.exists():
        raise InputNotFound(f"{value}: {ref.ref} is attached at {folder}, but it has no {inner!r}; "
                            f"it holds:\n{describe_input_root(folder)}")
    return str(path)


def source_search_path(source_dir: str | os.PathLike) -> list[str]:
    """Where the packed `guie` may sit inside the source dataset: Kaggle unpacks the uploaded
    src.zip into src/ or into the dataset root, or keeps the zip (importable with zipimport)."""
    folder = Path(source_dir)
    return [str(folder / "src"), str(folder), str(folder / "src.zip")]
