"""The fake Kaggle's HTTP handler: RPCs by POST, blob uploads by PUT, files and kernel outputs by
GET (dataset files with `Accept-Ranges`, ETag, `x-goog-hash` and `Range`/`If-Range`, as Kaggle's
storage serves them)."""
from __future__ import annotations

import base64
import hashlib
import re
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote, urlsplit

import google_crc32c


def make_handler(fake) -> type:
    """The HTTP side of `FakeKaggle`: POST RPCs, PUT blob uploads, GET files and outputs."""
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        def _path(self) -> str:
            # Absolute-form request lines arrive when the client goes through HTTP_PROXY.
            path = unquote(urlsplit(self.path).path)
            return path[len("/api"):] if path.startswith("/api/") else path

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, headers: dict, body: bytes = b"") -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            path = self._path()
            if not path.startswith("/v1/"):
                return self._send(404, {})
            status, headers, body = fake.handle_rpc(path[len("/v1/"):], self._body(),
                                                    self.headers.get("Authorization"))
            self._send(status, headers, body)

        def do_PUT(self) -> None:  # noqa: N802
            path = self._path()
            if not path.startswith("/upload/"):
                return self._send(404, {})
            status, headers = fake.handle_put(path[len("/upload/"):], self.headers, self._body())
            if status == -1:  # a broken connection: no answer at all
                self.close_connection = True
                self.connection.shutdown(2)
                return None
            self._send(status, headers)

        def do_GET(self) -> None:  # noqa: N802
            path = self._path()
            with fake._lock:
                fake.calls.append(("GET", {"path": path}))
                faults = [f for f in fake.faults if f.rpc == "GET" and f.times > 0]
                if faults:
                    faults[0].times -= 1
                    return self._send(faults[0].status, faults[0].headers)
            if path.startswith("/files/"):
                return self._serve_file(path)
            if path.startswith("/output/") and path.count("/") >= 5:
                data = fake.output_file(path[len("/output/"):])
                if data is not None:
                    return self._send(200, {"Content-Type": "application/octet-stream"}, data)
            self._send(404, {})

        def _serve_file(self, path: str) -> None:
            found = fake.file_object(path)
            if found is None:
                return self._send(404, {})
            data, created = found
            crc = google_crc32c.value(data).to_bytes(4, "big")
            etag = f'"{hashlib.md5(data).hexdigest()}"'
            headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                       "ETag": etag, "Last-Modified": format_datetime(created, usegmt=True),
                       "x-goog-hash": f"crc32c={base64.b64encode(crc).decode()},"
                                      f"md5={base64.b64encode(hashlib.md5(data).digest()).decode()}"}
            if path.rsplit("/", 1)[-1] in fake.corrupt_transfer:
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            status, start, requested = 200, 0, self.headers.get("Range")
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", requested or "")
            if_range = self.headers.get("If-Range")
            if match and (if_range is None or if_range == etag):
                start = int(match.group(1))
                end = int(match.group(2)) + 1 if match.group(2) else len(data)
                if start >= len(data):
                    fake.downloads.append({"path": path, "range": requested, "status": 416,
                                           "start": start, "sent": 0})
                    return self._send(416, {"Content-Range": f"bytes */{len(data)}"})
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
                status, data = 206, data[start:end]
            with fake._lock:
                brk = next((b for b in fake.download_breaks if b.times > 0
                            and path.endswith("/" + b.name)
                            and start < b.at_byte < start + len(data)), None)
                if brk is not None:
                    brk.times -= 1
            body = data if brk is None else data[:brk.at_byte - start]
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(body)
                self.wfile.flush()
                sent = len(body)
            except OSError:  # the client went away
                sent = 0
            fake.downloads.append({"path": path, "range": requested, "status": status,
                                   "start": start, "sent": sent})
            if brk is not None:  # a broken connection: fewer bytes than Content-Length said
                self.close_connection = True
                self.connection.shutdown(2)

    return Handler
