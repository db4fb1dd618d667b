"""torchrun/DDP plumbing: one process per GPU, or a single process (CPU or one GPU)."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as torch_dist


def init() -> tuple[int, int, torch.device]:
    """(rank, world_size, device); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch_dist.is_initialized():
        # Ranks wait while rank 0 trains a cached head stage or evaluates: far longer than
        # the 10-minute default, which would abort a healthy run. GUIE_DIST_TIMEOUT_S: tests.
        timeout_s = float(os.environ.get("GUIE_DIST_TIMEOUT_S", 12 * 3600))
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                      timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world, device


def is_main() -> bool:
    return not torch_dist.is_initialized() or torch_dist.get_rank() == 0


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def say(message: str) -> None:
    """One line on rank 0: what a resumed run picked up or skipped (printed, so it lands in
    the Kaggle log and the executed notebook, not only in a progress bar)."""
    if is_main():
        print(message, flush=True)
