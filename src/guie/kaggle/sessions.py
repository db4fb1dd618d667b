"""Waiting on the session one push started, never on the one before it.

Every read names the version the push returned (`KernelCalls.version_label`), but whether Kaggle
honours the label (and in which format) is unconfirmed, and a push can answer without a version
number. So, independently of labels: each push carries a nonce in the notebook's parameters, the
kernel writes it first thing into its output (`guie-push.json`, `guie.kaggle.inputs.record_push`)
and echoes it in `guie-run.json` / `guie-export.json`. A terminal state whose output lacks this
push's nonce is a stale read of the previous session: "not yet", for at most `grace_s`, never
"foreign". After that the caller decides (a COMPLETE session without the nonce is then reported
as not this push's output; an ERROR as this push's failure, which may have ended before its
first cell wrote anything).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from guie.kaggle.inputs import PUSH_MARKER
from guie.kaggle.results import KernelOutput, KernelStatus

STALE_GRACE_S = 600.0  # how long a terminal state without this push's nonce counts as "not yet"


@dataclass(frozen=True)
class SessionResult:
    status: KernelStatus
    output: KernelOutput
    ours: bool  # the output holds this push's nonce (or there was none to check)
    found_nonce: str | None


def pushed_nonce(folder: Path) -> str | None:
    marker = Path(folder) / PUSH_MARKER
    try:
        return json.loads(marker.read_text()).get("push_nonce")
    except (OSError, ValueError, AttributeError):
        return None


def wait_for_push(client, ref: str, version: int | None, nonce: str | None, dest: Path,
                  only: Sequence[str] | None = None, poll_s: float = 15.0,
                  grace_s: float = STALE_GRACE_S, log: Callable[[str], None] = print,
                  on_poll: Callable[[KernelStatus], None] | None = None) -> SessionResult:
    """Wait until the kernel's session of this push has ended; download its output (the files
    in `only`, plus the push marker; everything when `only` is None)."""
    dest = Path(dest)
    wanted = None if only is None else [PUSH_MARKER, *only]
    deadline = None
    while True:
        status = client.wait_kernel(ref, poll_s=poll_s, version=version, on_poll=on_poll)
        for name in wanted or [PUSH_MARKER]:  # files of an earlier read must not answer for this
            (dest / name).unlink(missing_ok=True)
        output = client.download_kernel_output(ref, dest, only=wanted, version=version)
        found = pushed_nonce(dest)
        if not nonce or found == nonce:
            return SessionResult(status, output, True, found)
        deadline = deadline or time.monotonic() + grace_s
        if time.monotonic() > deadline:
            return SessionResult(status, output, False, found)
        log(f"kernel {ref} version {version or '?'}: reads {status.state}, but its output is not "
            f"this push's (push nonce {found or 'missing'}, expected {nonce}): the previous "
            "session, read too early; waiting")
        client._sleep(poll_s)  # the client's clock, so tests can drive it
