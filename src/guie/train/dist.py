"""torchrun/DDP plumbing: one process per GPU, or a single process (CPU or one GPU).

No silent hour-long waits. Two limits bound how long a rank waits for its peers:

- the **preflight**: right after the process group starts, an all_reduce of one number and one
  of 8 MiB must finish within `GUIE_PREFLIGHT_TIMEOUT_S` (default 90 s). NCCL sets up its transports
  (peer-to-peer, shared memory) here, and this is where the known 2xT4 notebook hang shows
  (Lightning issue 19425). A rank past the limit records `preflight_timeout` in the launcher's
  state folder and exits with PREFLIGHT_EXIT; `guie.launch` then relaunches once with
  `NCCL_P2P_DISABLE=1`, else ends the kernel with a message naming what to try;
- the **process-group timeout** for every later collective: `GUIE_DIST_TIMEOUT_S` (default
  1800 s). It must outlast the longest gap between two collectives in a healthy run: rank 0
  writing a ViT-H `last.pt` (weights + AdamW, ~7.6 GB: a minute or two on Kaggle's disk) or a slow
  evaluation; a hang then costs half an hour of the ~30 h weekly GPU quota, not the 12-hour
  session. A rank past it records `collective_timeout` (gloo raises; NCCL's watchdog aborts the
  process instead, and the launcher's message covers that case too).

Test hooks (environment, read by every rank): `GUIE_TEST_STALL_RANK=<global rank>` with
`GUIE_TEST_STALL_AT=preflight|barrier` makes that rank sleep `GUIE_TEST_STALL_S` (default 3600)
seconds before its preflight collective, or in its first `barrier()`: a stalled peer on demand.
"""
from __future__ import annotations

import datetime
import inspect
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist

PREFLIGHT_TIMEOUT_S = 90.0  # NCCL's transport set-up takes seconds; a hang never ends
COLLECTIVE_TIMEOUT_S = 1800.0  # see the module docstring: a checkpoint write, not a head stage
PREFLIGHT_EXIT = 75  # EX_TEMPFAIL: a rank gave up on the preflight (torchrun reports it; its own
COLLECTIVE_EXIT = 76  # exit status is always 1, so the launcher reads the state folder instead)
STATE_DIR_ENV = "GUIE_LAUNCH_STATE_DIR"  # where ranks record why they gave up (set by the launcher)
FSDP_MIN_TORCH = (2, 6)

_stalled_at: set[str] = set()


def init() -> tuple[int, int, torch.device]:
    """(rank, world_size, device); joins the process group when launched by torchrun, and runs
    the preflight collective there."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        limit = preflight_timeout_s()
        # The deadline covers the group's start too: with `device_id`, NCCL builds its
        # communicator (and probes peer-to-peer) inside init_process_group.
        with _Deadline(limit, lambda: _give_up_preflight(rank, world, backend, limit)):
            torch_dist.init_process_group(
                backend, timeout=datetime.timedelta(seconds=collective_timeout_s()),
                **_device_binding(device))
            _stall_if_asked("preflight")
            preflight(device)
    return rank, world, device


PREFLIGHT_BULK_ELEMENTS = 2**21  # 8 MiB of fp32: the size class of DDP's 25 MB buckets


def preflight(device: torch.device) -> None:
    """Two all_reduces of ones, one number and 8 MiB: NCCL sends small messages with one
    protocol and large ones with another, and training needs both (DDP's gradient buckets are
    large). Raises if a sum is wrong (ranks of different jobs)."""
    world = torch_dist.get_world_size()
    for elements in (1, PREFLIGHT_BULK_ELEMENTS):
        total = torch.ones(elements, device=device)
        torch_dist.all_reduce(total)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ends = (float(total[0]), float(total[-1]))
        if ends != (world, world):
            raise RuntimeError(f"preflight all_reduce of {elements} ones summed to {ends}, "
                               f"expected {world}: the ranks are not one job")


def preflight_timeout_s() -> float:
    return float(os.environ.get("GUIE_PREFLIGHT_TIMEOUT_S", PREFLIGHT_TIMEOUT_S))


def collective_timeout_s() -> float:
    return float(os.environ.get("GUIE_DIST_TIMEOUT_S", COLLECTIVE_TIMEOUT_S))


def is_main() -> bool:
    return not torch_dist.is_initialized() or torch_dist.get_rank() == 0


def barrier() -> None:
    if torch_dist.is_initialized():
        _stall_if_asked("barrier")
        torch_dist.barrier()


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


CLOSE_TIMEOUT_S = 60.0


def close() -> None:
    """Leave the process group (NCCL warns about leaked communicators otherwise). The work is
    done by now, so a teardown that hangs (a peer gone first) ends this process with status 0
    after CLOSE_TIMEOUT_S rather than keeping the kernel waiting."""
    if not torch_dist.is_initialized():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    with _Deadline(CLOSE_TIMEOUT_S, lambda: os._exit(0)):
        torch_dist.destroy_process_group()


def say(message: str) -> None:
    """One line on rank 0: what a resumed run picked up or skipped (printed, so it lands in
    the Kaggle log and the executed notebook, not only in a progress bar)."""
    if is_main():
        print(message, flush=True)


def is_collective_timeout(error: BaseException) -> bool:
    """A collective that gave up waiting for a peer: gloo raises a RuntimeError "Timed out
    waiting <n>ms for recv operation"; NCCL (with blocking wait) a DistBackendError naming the
    timeout. Only those: a DataLoader's or a file's timeout is not a peer's stall."""
    text = str(error)
    if isinstance(error, torch_dist.DistBackendError):
        return bool(re.search(r"timed out|timeout", text, re.IGNORECASE))
    return isinstance(error, RuntimeError) and torch_dist.is_initialized() \
        and bool(re.search(r"Timed out waiting \d+ ?ms", text))


def record_collective_timeout(error: BaseException) -> None:
    """What a rank does when a collective timed out: state it, record it for the launcher."""
    limit = collective_timeout_s()
    print(f"guie: rank {rank()} of {world_size()} waited more than {limit:.0f} s "
          f"(GUIE_DIST_TIMEOUT_S) for its peers in a collective: another rank stalled or died "
          f"({str(error).splitlines()[0][:200]})", file=sys.stderr, flush=True)
    record_event("collective_timeout", backend=_backend_name(), seconds=limit)


def record_event(event: str, **details) -> None:
    """Write this rank's reason for giving up where the launcher reads it (nothing outside a
    launch: GUIE_LAUNCH_STATE_DIR unset)."""
    folder = os.environ.get(STATE_DIR_ENV)
    if not folder:
        return
    state = {"event": event, "rank": int(os.environ.get("RANK", "0")),
             "world": int(os.environ.get("WORLD_SIZE", "1")),
             "nccl_p2p_disable": os.environ.get("NCCL_P2P_DISABLE", ""), **details}
    path = Path(folder) / f"rank{state['rank']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state) + "\n")
    os.replace(tmp, path)


def fsdp_supported() -> tuple[bool, str]:
    """(whether this torch can run FSDP2, why): `torch.distributed.fsdp.fully_shard` became a
    public import in torch 2.6 (before it, FSDP2 lived in the private, changing
    `torch.distributed._composable.fsdp`). Kaggle runs its own torch, so the training code asks
    here and falls back to DDP with the message where the answer is no."""
    version = torch_version()
    need = ".".join(map(str, FSDP_MIN_TORCH))
    if version < FSDP_MIN_TORCH:
        return False, (f"torch {torch.__version__} is older than {need}: FSDP2's public "
                       f"`torch.distributed.fsdp.fully_shard` needs torch >= {need}")
    if not torch_dist.is_available():
        return False, f"torch {torch.__version__} was built without torch.distributed"
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: F401
    except ImportError as error:
        return False, f"torch {torch.__version__}: FSDP2 does not import ({error})"
    return True, f"torch {torch.__version__} >= {need}: FSDP2 (fully_shard) available"


def torch_version() -> tuple[int, int]:
    """(major, minor) of the running torch; "2.6.0a0+git..." and "2.14.1+cu130" alike."""
    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


class _Deadline:
    """Calls `on_expiry` from a timer thread if the block has not finished in `seconds`. A
    thread, not a signal: a hung NCCL call never returns to the interpreter's main loop, but it
    releases the GIL while it blocks."""

    def __init__(self, seconds: float, on_expiry):
        self._timer = threading.Timer(seconds, on_expiry)
        self._timer.daemon = True

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        return False


def _give_up_preflight(rank_: int, world: int, backend: str, limit: float) -> None:
    p2p_off = os.environ.get("NCCL_P2P_DISABLE") == "1"
    print(f"guie: rank {rank_} of {world}: the preflight all_reduce over {backend} did not finish "
          f"in {limit:.0f} s (GUIE_PREFLIGHT_TIMEOUT_S); the ranks cannot reach each other"
          + (" even with NCCL_P2P_DISABLE=1" if p2p_off else ""), file=sys.stderr, flush=True)
    try:
        record_event("preflight_timeout", backend=backend, seconds=limit)
    finally:
        # os._exit: the main thread is stuck in the collective; a normal exit would wait for it.
        os._exit(PREFLIGHT_EXIT)


def _device_binding(device: torch.device) -> dict:
    """`device_id=` for NCCL where this torch takes it (2.3+): the communicator is built, and
    its transports probed, inside init_process_group, under the preflight's deadline; and
    barrier() knows the rank's GPU instead of guessing it."""
    if device.type != "cuda":
        return {}
    if "device_id" not in inspect.signature(torch_dist.init_process_group).parameters:
        return {}
    return {"device_id": device}


def _backend_name() -> str:
    return torch_dist.get_backend() if torch_dist.is_initialized() else ""


def _stall_if_asked(point: str) -> None:
    """The test hook: this rank sleeps at `point` once (see the module docstring)."""
    if os.environ.get("GUIE_TEST_STALL_AT") != point or point in _stalled_at:
        return
    if os.environ.get("GUIE_TEST_STALL_RANK") != os.environ.get("RANK", "0"):
        return
    _stalled_at.add(point)
    seconds = float(os.environ.get("GUIE_TEST_STALL_S", 3600))
    print(f"guie: test hook: rank {os.environ.get('RANK')} stalls {seconds:.0f} s at {point}",
          file=sys.stderr, flush=True)
    time.sleep(seconds)
