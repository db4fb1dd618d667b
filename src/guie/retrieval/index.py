"""Embed a folder once with a TorchScript model and keep the result as a reusable index file.

The model is used through `torch.jit.load` alone (from a TorchScript file or straight from a
submission.zip, see `model_file`), so any model following the competition contract works:
forward takes [B, 3, H, W] RGB 0..255 (uint8 here) and returns [B, D] floats.

The saved index (one `.npz`, replaced atomically) holds the embeddings, each file's relative
path, size, mtime and image size, the files that were skipped and why, the model file's sha256
and the loading settings. A later run reuses every file whose size and mtime are unchanged,
embeds only new or changed ones and drops deleted ones; a different model, loading settings or
folder rebuilds it from scratch.

Batching: by default every image goes through the model alone at its own size, as the Kaggle
host feeds it. With `batch_size > 1`, images whose loaded size is identical (after `max_side`
and the pixel cap: typical for camera photos or fixed-size datasets) share a forward call, up
to `batch_size` at a time; images of a unique size still go alone. Nothing is padded or resized
for batching, so embeddings match the unbatched ones up to float noise.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from guie.errors import UserError, UserValueError
from guie.retrieval.images import DEFAULT_MAX_PIXELS, SkippedImage, list_files, load_image
from guie.retrieval.model_file import load_torchscript

INDEX_FORMAT_VERSION = 1
Embedded = tuple[torch.Tensor, tuple[int, int]]  # (embedding [D], original (width, height))
# Images held back waiting for same-size partners, in units of batch_size, before the fullest
# group is sent anyway (bounds memory when every image has a different size).
_PENDING_BATCHES = 4


@dataclass(frozen=True)
class IndexEntry:
    path: str  # relative to the index root, POSIX separators
    size_bytes: int
    mtime_ns: int
    width: int  # image size as shown (after EXIF orientation), before any downscale
    height: int


@dataclass(frozen=True)
class SkippedEntry:
    path: str
    size_bytes: int
    mtime_ns: int
    reason: str


@dataclass
class ImageIndex:
    root: Path
    model_sha256: str
    load_settings: dict
    entries: list[IndexEntry]
    embeddings: torch.Tensor  # [N, D] float32, row i belongs to entries[i]
    skipped: list[SkippedEntry] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return [e.path for e in self.entries]

    def save(self, path: Path) -> None:
        """Write to a temporary file next to `path`, then rename: never a half-written index."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": INDEX_FORMAT_VERSION,
            "root": str(self.root),
            "model_sha256": self.model_sha256,
            "load_settings": self.load_settings,
            "entries": [[e.path, e.size_bytes, e.mtime_ns, e.width, e.height]
                        for e in self.entries],
            "skipped": [[s.path, s.size_bytes, s.mtime_ns, s.reason] for s in self.skipped],
        }
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, embeddings=self.embeddings.numpy().astype(np.float32),
                         meta=np.frombuffer(json.dumps(meta).encode("ascii"), dtype=np.uint8))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> ImageIndex:
        with np.load(Path(path)) as data:
            meta = json.loads(data["meta"].tobytes().decode("ascii"))
            embeddings = torch.from_numpy(np.array(data["embeddings"], dtype=np.float32))
        if meta.get("format_version") != INDEX_FORMAT_VERSION:
            raise UserValueError(f"{path}: index format {meta.get('format_version')!r}, "
                                 f"expected {INDEX_FORMAT_VERSION}")
        entries = [IndexEntry(p, int(s), int(m), int(w), int(h))
                   for p, s, m, w, h in meta["entries"]]
        if embeddings.shape[0] != len(entries):
            raise UserValueError(f"{path}: {embeddings.shape[0]} embeddings for "
                                 f"{len(entries)} files")
        return cls(root=Path(meta["root"]), model_sha256=meta["model_sha256"],
                   load_settings=meta["load_settings"], entries=entries, embeddings=embeddings,
                   skipped=[SkippedEntry(p, int(s), int(m), r) for p, s, m, r in meta["skipped"]])


@dataclass(frozen=True)
class UpdateStats:
    embedded: int  # files embedded in this run
    reused: int  # files (embedded or skipped) taken unchanged from the saved index or a donor
    removed: int  # files in the saved index that no longer exist
    newly_skipped: int  # files tried in this run that turned out unusable
    rebuilt_because: str | None  # why the saved index was not used, or None where it was

    def describe(self) -> str:
        text = (f"{self.embedded} embedded, {self.reused} reused, {self.removed} removed, "
                f"{self.newly_skipped} newly skipped")
        return text + (f" (rebuilt: {self.rebuilt_because})" if self.rebuilt_because else "")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ModelContractError(UserError, RuntimeError):
    """The model's output does not follow the contract: fatal, unlike a per-image failure."""


class Embedder:
    """A TorchScript model plus the image-loading settings that determine its embeddings."""

    def __init__(self, model_path: Path | str, device: str = "cpu", max_side: int | None = None,
                 batch_size: int = 1, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        if batch_size < 1:
            raise UserValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_side is not None and max_side < 1:
            raise UserValueError(f"max_side must be >= 1, got {max_side}")
        self.model_path = Path(model_path)
        self.device = torch.device(device)
        # A TorchScript file or a submission.zip; anything else is a ModelFileError saying what.
        self.model = load_torchscript(self.model_path, self.device)
        self.model_sha256 = file_sha256(self.model_path)
        self.max_side = max_side
        self.max_pixels = max_pixels
        self.batch_size = batch_size

    @property
    def load_settings(self) -> dict:
        """Everything besides the model that changes embeddings (batching does not)."""
        return {"max_side": self.max_side, "max_pixels": self.max_pixels}

    def embed_files(self, root: Path, rel_paths: Sequence[str], progress: bool = True,
                    desc: str = "embedding") -> tuple[dict[str, Embedded], dict[str, str]]:
        """Embed root/rel for each rel: ({rel: (embedding [D], (w, h))}, {rel: skip reason})."""
        done: dict[str, Embedded] = {}
        skipped: dict[str, str] = {}
        pending: dict[tuple[int, ...], list[tuple[str, torch.Tensor, tuple[int, int]]]] = {}
        for rel in tqdm(rel_paths, desc=desc, unit="img", disable=not progress):
            try:
                image = load_image(Path(root) / rel, self.max_side, self.max_pixels)
            except SkippedImage as exc:
                skipped[rel] = exc.reason
                continue
            group = pending.setdefault(image.pixels.shape, [])
            group.append((rel, image.to_tensor(), image.original_size))
            if len(group) >= self.batch_size:
                self._run(pending.pop(image.pixels.shape), done, skipped)
            elif sum(map(len, pending.values())) >= _PENDING_BATCHES * self.batch_size:
                fullest = max(pending, key=lambda shape: len(pending[shape]))
                self._run(pending.pop(fullest), done, skipped)
        for group in pending.values():
            self._run(group, done, skipped)
        return done, skipped

    def _run(self, group: list[tuple[str, torch.Tensor, tuple[int, int]]],
             done: dict, skipped: dict[str, str]) -> None:
        batch = torch.cat([tensor for _, tensor, _ in group]).to(self.device)
        try:
            out = self._forward(batch)
        except ModelContractError:
            raise
        except Exception as exc:  # noqa: BLE001 - a model failing on one image skips that image
            if len(group) > 1:
                for item in group:  # find which image fails; the others still count
                    self._run([item], done, skipped)
                return
            skipped[group[0][0]] = f"model failed on this image ({type(exc).__name__}: {exc})"
            return
        for (rel, _, size), row in zip(group, out, strict=True):
            if torch.isfinite(row).all():
                done[rel] = (row, size)
            else:
                skipped[rel] = "model returned non-finite values (NaN or inf)"

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(batch)
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != batch.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelContractError(
                f"{self.model_path}: for input {tuple(batch.shape)} the model returned {shape}; "
                f"the contract is a float tensor [B, D] (D = 64)")
        return out.detach().float().cpu()


def update_index(root: Path | str, embedder: Embedder, cache_path: Path | str,
                 exclude: Sequence[Path] = (), only: Sequence[str] | None = None,
                 donor: ImageIndex | None = None, progress: bool = True,
                 desc: str = "embedding") -> tuple[ImageIndex, UpdateStats]:
    """Bring the index of `root` saved at `cache_path` up to date and return it.

    `only` restricts the index to these relative paths (one query file); `donor` is another
    index built by the same embedder whose embeddings are reused for the same files (a query
    folder inside the index folder costs nothing).
    """
    root = Path(root).resolve()
    cache_path = Path(cache_path)
    listed = (sorted(only) if only is not None else
              [p.relative_to(root).as_posix() for p in list_files(root, tuple(exclude))])
    stats = {rel: st for rel in listed if (st := _stat(root / rel)) is not None}
    rel_paths = [rel for rel in listed if rel in stats]  # a file deleted meanwhile is gone

    previous, rebuilt_because = _load_compatible(cache_path, root, embedder)
    known = _known_files(previous) if previous is not None else {}
    if donor is not None and donor.model_sha256 == embedder.model_sha256 \
            and donor.load_settings == embedder.load_settings:
        known = {**_donated(donor, root), **known}
    to_embed = [rel for rel in rel_paths if (rel, *stats[rel]) not in known]
    fresh, fresh_skipped = embedder.embed_files(root, to_embed, progress=progress, desc=desc)

    entries, rows, skipped = [], [], []
    for rel in rel_paths:
        size_bytes, mtime_ns = stats[rel]
        if rel in fresh:
            row, (width, height) = fresh[rel]
            result: tuple | str = (row, width, height)
        elif rel in fresh_skipped:
            result = fresh_skipped[rel]
        else:
            result = known[(rel, size_bytes, mtime_ns)]
        if isinstance(result, str):
            skipped.append(SkippedEntry(rel, size_bytes, mtime_ns, result))
        else:
            row, width, height = result
            entries.append(IndexEntry(rel, size_bytes, mtime_ns, width, height))
            rows.append(row)
    dim = rows[0].shape[0] if rows else 0
    index = ImageIndex(root=root, model_sha256=embedder.model_sha256,
                       load_settings=embedder.load_settings, entries=entries,
                       embeddings=torch.stack(rows) if rows else torch.zeros(0, dim),
                       skipped=skipped)
    removed = 0 if previous is None else len(
        ({e.path for e in previous.entries} | {s.path for s in previous.skipped}) - set(rel_paths))
    update = UpdateStats(embedded=len(fresh), reused=len(rel_paths) - len(to_embed),
                         removed=removed, newly_skipped=len(fresh_skipped),
                         rebuilt_because=rebuilt_because)
    if previous is None or to_embed or removed:
        index.save(cache_path)
    return index, update


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _known_files(index: ImageIndex) -> dict[tuple[str, int, int], tuple | str]:
    """(path, size, mtime) -> (embedding row, width, height), or the reason it was skipped."""
    known: dict[tuple[str, int, int], tuple | str] = {
        (e.path, e.size_bytes, e.mtime_ns): (index.embeddings[i], e.width, e.height)
        for i, e in enumerate(index.entries)}
    known.update({(s.path, s.size_bytes, s.mtime_ns): s.reason for s in index.skipped})
    return known


def _donated(donor: ImageIndex, root: Path) -> dict[tuple[str, int, int], tuple | str]:
    """The donor's files that lie under `root`, keyed by their path relative to `root`."""
    if root.is_relative_to(donor.root):
        inner = root.relative_to(donor.root).as_posix()
        strip = "" if inner == "." else inner + "/"
        return {(path[len(strip):], size, mtime): value
                for (path, size, mtime), value in _known_files(donor).items()
                if path.startswith(strip)}
    if donor.root.is_relative_to(root):
        prefix = donor.root.relative_to(root).as_posix() + "/"
        return {(prefix + path, size, mtime): value
                for (path, size, mtime), value in _known_files(donor).items()}
    return {}


def _load_compatible(cache_path: Path, root: Path, embedder: Embedder
                     ) -> tuple[ImageIndex | None, str | None]:
    """The saved index if it can be reused, else (None, why not)."""
    if not cache_path.exists():
        return None, "no saved index"
    try:
        previous = ImageIndex.load(cache_path)
    except Exception as exc:  # noqa: BLE001 - an unreadable cache is rebuilt, never fatal
        return None, f"saved index unreadable ({type(exc).__name__}: {exc})"
    if previous.model_sha256 != embedder.model_sha256:
        return None, "the model file changed"
    if previous.load_settings != embedder.load_settings:
        return None, (f"loading settings changed ({previous.load_settings} -> "
                      f"{embedder.load_settings})")
    if previous.root != root:
        return None, f"the folder changed ({previous.root} -> {root})"
    return previous, None
