"""KaggleClient's kernel calls: push, status, output and log of one named version, and the
accelerator quota.

Why every read names a version: without one, GetKernelSessionStatus and ListKernelSessionOutput
describe whichever session Kaggle calls latest, which right after a re-push can still be the
previous one (kaggle-cli PR 1201: "`kernels status <kernel>/2` reported `ERROR`, which is version
3's status"; PR 1177). kaggle 2.2.4's own `kernels_status("owner/slug/N")` parses N and never
sends it, so the requests are built here with kagglesdk's `version_label`. Whether Kaggle wants
`v<N>` (what PR 1201 sends) or `N` is unconfirmed: `submit.py probe` checks it and records the
answer (`version_label` in platform.json), which the commands pass in as `label_format`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

from guie.kaggle.results import (KaggleError, KernelOutput, KernelPush, KernelStatus,
                                 NotFoundError, render_log)

DEFAULT_LABEL_FORMAT = "v{}"  # kaggle-cli PR 1201; a probe record may say "{}"
LABEL_FORMATS = ("v{}", "{}")


@dataclass(frozen=True)
class Quota:
    """The weekly GPU quota as Kaggle reports it (GetAcceleratorQuotaStatistics), in hours."""
    used_h: float
    reserved_h: float  # held by sessions running now
    total_h: float  # allowed this week (it floats)
    minimum_h: float  # guaranteed
    refresh_at: datetime | None

    @property
    def remaining_h(self) -> float:
        return self.total_h - self.used_h - self.reserved_h

    def describe(self) -> str:
        refresh = f", refreshes {self.refresh_at:%Y-%m-%d %H:%M} UTC" if self.refresh_at else ""
        return (f"{self.remaining_h:.2f} h left ({self.total_h:.2f} h allowed this "
                f"week, {self.used_h:.2f} h used, {self.reserved_h:.2f} h reserved by running "
                f"sessions{refresh}; from Kaggle)")


def kernel_ref_from_answer(ref: str | None, url: str | None, sent: str) -> str:
    """owner/slug of a pushed kernel from SaveKernel's `ref` (or its url), as Kaggle answers it:
    '/code/owner/slug', 'owner/slug' or a full URL; what was sent where the answer has none."""
    for text in (ref, url):
        path = text or ""
        if "://" in path:  # a URL: drop the scheme and host
            path = path.split("://", 1)[1].partition("/")[2]
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["code"]:
            parts = parts[1:]
        if len(parts) == 2:
            return "/".join(parts)
    return sent


class KernelCalls:
    """Mixed into `KaggleClient`: uses its `api`, `read`, `_write`, `_sdk_call`, `_download`,
    `_sleep`."""

    label_format = DEFAULT_LABEL_FORMAT
    label_fallback = True  # False: a refused label is an error (the probe's own check)

    def version_label(self, version: int | None) -> str | None:
        return self.label_format.format(int(version)) if version else None

    def _labelled(self, version: int | None, call: Callable[[str | None], Any]) -> Any:
        """call(label) for `version`. Where Kaggle refuses the label as malformed (HTTP 400), the
        other format is tried and kept; where it refuses both, the read goes unlabelled and the
        push nonce (guie.kaggle.sessions) is what tells the sessions apart."""
        if not version or not self.label_fallback:
            return call(self.version_label(version))
        formats = [self.label_format, *(f for f in LABEL_FORMATS if f != self.label_format)]
        for fmt in formats:
            try:
                answer = call(fmt.format(int(version)))
            except KaggleError as e:
                if e.http_status != 400:
                    raise
                continue
            self.label_format = fmt
            return answer
        return call(None)

    def push_kernel(self, folder: Path) -> KernelPush:
        """SaveKernel from folder/kernel-metadata.json (each push starts a new run). The kernel's
        reference is Kaggle's answer, not the id sent (they differ if Kaggle renamed it)."""
        sent = json.loads((Path(folder) / "kernel-metadata.json").read_text())["id"]
        answer = self._write(f"push kernel {sent}", lambda: self.api.kernels_push(str(folder)))
        invalid = {name: getattr(answer, f"invalid_{name}_sources") for name in
                   ("dataset", "competition", "kernel", "model")}
        problems = [f"unknown {name} sources {items}" for name, items in invalid.items() if items]
        if answer.error or problems:
            raise KaggleError(f"push kernel {sent}: "
                              f"{'; '.join(filter(None, [answer.error, *problems]))}")
        ref = kernel_ref_from_answer(answer.ref, answer.url, sent)
        url = answer.url or f"https://www.kaggle.com/code/{ref}"
        return KernelPush(ref, url, answer.version_number)

    def kernel_status(self, ref: str, version: int | None = None) -> KernelStatus:
        from kagglesdk.kernels.types.kernels_api_service import ApiGetKernelSessionStatusRequest

        what = f"kernel status {ref}" + (f" version {version}" if version else "")

        def status(label: str | None):
            request = ApiGetKernelSessionStatusRequest()
            request.user_name, request.kernel_slug = ref.split("/")[:2]
            request.version_label = label
            return self.read(what, lambda: self._sdk_call(
                lambda k: k.kernels.kernels_api_client.get_kernel_session_status(request)))
        answer = self._labelled(version, status)
        return KernelStatus(ref, answer.status.name, answer.failure_message or "")

    def wait_kernel(self, ref: str, timeout_s: float = 13 * 3600, poll_s: float = 15,
                    max_poll_s: float = 300,
                    on_poll: Callable[[KernelStatus], None] | None = None,
                    version: int | None = None) -> KernelStatus:
        """Poll with growing intervals until the kernel's run (of `version`) finishes."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.kernel_status(ref, version)
            if on_poll is not None:
                on_poll(status)
            if status.done:
                return status
            if time.monotonic() > deadline:
                raise KaggleError(f"kernel {ref}: still {status.state} after {timeout_s:.0f} s")
            self._sleep(poll_s)
            poll_s = min(poll_s * 1.5, max_poll_s)

    def _output_pages(self, ref: str, version: int | None):
        """ListKernelSessionOutput, page by page (each answer has files and the log)."""
        from kagglesdk.kernels.types.kernels_api_service import ApiListKernelSessionOutputRequest

        owner, slug = ref.split("/")[:2]
        token = ""
        while True:
            def page(label: str | None, token=token):
                request = ApiListKernelSessionOutputRequest()
                request.user_name, request.kernel_slug, request.page_size = owner, slug, 100
                request.page_token, request.version_label = token or None, label
                return self.read(f"list output of kernel {ref}", lambda: self._sdk_call(
                    lambda k: k.kernels.kernels_api_client.list_kernel_session_output(request)))
            answer = self._labelled(version, page)
            yield answer
            token = answer.next_page_token
            if not token:
                return

    def download_kernel_output(self, ref: str, dest: Path, only: Sequence[str] | None = None,
                               version: int | None = None) -> KernelOutput:
        """GET every file url of the kernel's output (or those named in `only`: a training
        output's checkpoints are gigabytes); writes the log as <slug>.log.

        Done here rather than with `kernels_output`, which writes an error page to disk as if it
        were the file when a url answers 4xx/5xx.
        """
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        files, log_raw = [], ""
        for answer in self._output_pages(ref, version):
            log_raw = log_raw or (answer.log or "")
            for item in answer.files or []:
                if only is None or item.file_name in only:
                    files.append(self._download(item.url, dest, item.file_name, f"output of {ref}"))
        log_path = None
        if log_raw:
            log_path = dest / f"{ref.split('/')[1]}.log"
            log_path.write_text(log_raw)
        return KernelOutput(tuple(files), log_path, render_log(log_raw))

    def kernel_output_names(self, ref: str, version: int | None = None) -> list[str]:
        """The file names of the output of the kernel's run (of `version`); nothing downloaded."""
        return [item.file_name for answer in self._output_pages(ref, version)
                for item in answer.files or []]

    def quota(self) -> Quota | None:
        """The GPU quota Kaggle reports (`KaggleApi.quota_view`), or None where the service has
        no GetAcceleratorQuotaStatistics or reports no GPU quota."""
        try:
            answer: Any = self.read("GPU quota", self.api.quota_view)
        except NotFoundError:
            return None
        gpu = answer.gpu_quota
        if gpu is None or gpu.total_time_allowed is None:
            return None

        def hours(delta) -> float:
            return delta.total_seconds() / 3600 if delta is not None else 0.0
        return Quota(hours(gpu.time_used), hours(gpu.time_reserved), hours(gpu.total_time_allowed),
                     hours(gpu.minimum_time_allowed), answer.quota_refresh_time)
