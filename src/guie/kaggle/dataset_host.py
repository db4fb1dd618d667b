"""KaggleClient's side of `guie.data.remote.DatasetHost`: the dataset reads `data fetch` makes
(GetDataset, ListDatasetFiles, DownloadDataset), kept apart from the rest of the client."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Collection
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from guie.data.remote import RemoteDataset, RemoteFile
from guie.kaggle.results import KaggleError


class DatasetHostCalls:
    """Mixed into `KaggleClient`: uses its `api`, `read` (retrying idempotent reads) and
    `_sdk_call`."""

    def _get_dataset(self, ref: str, what: str) -> Any:
        from kagglesdk.datasets.types.dataset_api_service import ApiGetDatasetRequest

        request = ApiGetDatasetRequest()
        request.owner_slug, request.dataset_slug = ref.split("/")
        return self.read(what, lambda: self._sdk_call(
            lambda k: k.datasets.dataset_api_client.get_dataset(request)))

    def dataset_info(self, ref: str) -> RemoteDataset:
        answer = self._get_dataset(ref, f"dataset {ref}")
        return RemoteDataset(answer.current_version_number, answer.title, answer.license_name,
                             answer.total_bytes)

    def dataset_files(self, ref: str, version: int | None,
                      page_size: int) -> tuple[list[RemoteFile], bool]:
        """(the first page of a version's files, whether that page is all of them)."""
        spec = ref + (f"/{version}" if version else "")
        answer = self.read(f"list files of {spec}", lambda: self.api.dataset_list_files(
            spec, page_size=page_size))
        if answer.error_message:
            raise KaggleError(f"list files of {spec}: {answer.error_message}")
        return ([RemoteFile(f.name, f.total_bytes) for f in answer.dataset_files or []],
                not answer.next_page_token)

    def download_dataset_file(self, ref: str, version: int | None, file_name: str | None,
                              folder: Path, refused_names: Collection[str] = (),
                              progress: bool = False) -> tuple[Path, dict[str, str]]:
        """DownloadDataset, then the official client's `download_file`, which resumes a partial
        file with a Range request when the server answers `Accept-Ranges: bytes` and the
        partial's ETag marker (`<file>.kaggle-partial`) still matches."""
        from kagglesdk.datasets.types.dataset_api_service import ApiDownloadDatasetRequest

        what = f"{ref} v{version}: {file_name or 'archive'}"
        request = ApiDownloadDatasetRequest()
        request.owner_slug, request.dataset_slug = ref.split("/")
        request.dataset_version_number, request.file_name = version, file_name
        response, http = self.read(f"download {what}", lambda: self._sdk_call(
            lambda k: (k.datasets.dataset_api_client.download_dataset(request), k.http_client())))
        try:
            # Like the official client: the file is named after the storage URL it was
            # redirected to, which ends in ".zip" where Kaggle serves a file compressed.
            name = unquote(PurePosixPath(urlsplit(response.url).path).name)
            if name in ("", ".", "..", *refused_names):
                raise KaggleError(f"download {what}: refusing the file name {name!r}")
            path = Path(folder) / name
            headers = dict(response.headers)
            try:
                with contextlib.redirect_stdout(sys.stderr):  # the client prints its progress
                    self.api.download_file(response, str(path), http, quiet=not progress,
                                           resume=True)
            except (OSError, ValueError) as e:  # requests' and urllib3's errors are OSErrors
                raise KaggleError(f"download {what}: {e}. The partial file {path} is kept: run "
                                  "the same command again to resume it") from e
        finally:
            response.close()
        return path, headers
