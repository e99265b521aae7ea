"""Running under torchrun: process group setup, stop signals, DataLoader workers, lost peers, shutdown.

The whole API a training script needs:

    ddp, rank, world, device = setup_distributed("auto")   # one process when torchrun did not start us
    loader.worker_init_fn = worker_init_fn                  # Ctrl-C is the main process's to handle
    with StopSignal() as stop:                              # SIGTERM / SIGINT set stop.requested
        ...                                                 # the loop all-reduces it, so every rank stops together
    parts = gather(obj, ddp, world)                         # [obj of rank 0, obj of rank 1, ...]
    peer_lost(exc)                                          # is this error another rank going away?
    shutdown(clean)                                         # in main's `finally`, after the DDP model is gone
"""
from __future__ import annotations

import gc
import os
import re
import signal

import torch
import torch.distributed as dist

from .errors import S3RError

# What gloo and NCCL say when another process of the group died or hung.
PEER_LOST = re.compile(r"closed by peer|Connection reset|remote worker|NCCL|Timed out|timed out")


def setup_distributed(device: str) -> tuple[bool, int, int, torch.device]:
    """(ddp, rank, world size, device): torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them, one process."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise S3RError("--device cuda: no CUDA device is visible")
    if not ddp:
        return False, 0, 1, torch.device("cuda" if cuda else "cpu")
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    return True, rank, world, torch.device(f"cuda:{local_rank}" if cuda else "cpu")


def gather(obj, ddp: bool, world: int) -> list:
    """Every rank's `obj`, in rank order, on every rank (picklable objects)."""
    if not ddp:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


class StopSignal:
    """SIGTERM / SIGINT set `requested` (the current update finishes, then the run saves); a second Ctrl-C
    interrupts at once. The previous handlers come back on exit."""

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def __enter__(self) -> StopSignal:
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def worker_init_fn(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C: the main process handles it (it saves first)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def rank() -> int | None:
    """This process's rank in the process group, or None outside one."""
    return dist.get_rank() if dist.is_initialized() else None


def peer_lost(e: BaseException) -> bool:
    """True if `e` is what a collective raises when another rank failed (its own message is then above)."""
    return dist.is_initialized() and (isinstance(e, dist.DistError) or bool(PEER_LOST.search(str(e))))


def shutdown(clean: bool) -> None:
    """Destroy the process group at exit. The caller drops its DDP model and optimizer first (gc runs here), or
    gloo can abort; after an error, only gloo's group is destroyed (NCCL's may hang on a lost peer)."""
    gc.collect()
    if dist.is_initialized() and (clean or dist.get_backend() == "gloo"):
        dist.destroy_process_group()
