"""What `data fetch` needs from the host of its datasets: three calls, as a protocol, and their
typed answers. `guie.kaggle.client.KaggleClient` implements it, so the data layer imports
nothing of the Kaggle layer; the host's failures reach the caller as the host's own errors."""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class RemoteDataset:
    current_version: int
    title: str
    license_name: str
    total_bytes: int | None  # of the whole version, as the host reports it


@dataclass(frozen=True)
class RemoteFile:
    name: str  # its path inside the dataset, as the host reports it (not checked)
    total_bytes: int


class DatasetHost(Protocol):
    def dataset_info(self, ref: str) -> RemoteDataset:
        """The dataset `owner/slug` as it is now."""

    def dataset_files(self, ref: str, version: int | None,
                      page_size: int) -> tuple[list[RemoteFile], bool]:
        """The first `page_size` files of a version (None: the current one), and whether that
        page is all of them."""

    def download_dataset_file(self, ref: str, version: int | None, file_name: str | None,
                              folder: Path, refused_names: Collection[str] = (),
                              progress: bool = False) -> tuple[Path, dict[str, str]]:
        """Download one file of a version (`file_name` None: the version as one archive) into
        `folder`, resuming a partial download there; (its path, the response headers). The
        host names the file; a name in `refused_names` is refused."""
