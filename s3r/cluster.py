"""Running under torchrun on a cluster: process group, stop signals, DataLoader workers, lost peers, checkpoints.

The whole API a training script needs:

    ddp, rank, world, device = setup_distributed("auto")   # one process when torchrun did not start us
    loader.worker_init_fn = worker_init_fn                  # workers leave signals to the main process
    with StopSignal() as stop:                              # SIGTERM / SIGINT set stop.requested
        with signals_deferred():                            # around anything that forks DataLoader workers
            batches = iter(loader)
        ...                                                 # the loop all-reduces stop.requested: all ranks stop
    parts = gather(obj, ddp, world)                         # [obj of rank 0, obj of rank 1, ...]
    any_rank(flag, ddp, device)                             # flag on any rank, on all of them
    peer_lost(exc)                                          # is this error another rank going away?
    shutdown(clean)                                         # in main's `finally`, after the DDP model is gone
    ckpt = load_last(save_dir)                              # checkpoint_last.pt, or None; unreadable: one line
    save_dir / numbered_name(epoch, update); prune_numbered(save_dir, keep)   # fairseq's interval checkpoints

How a cluster stops a job: SLURM (`scancel`, preemption, the time limit; `#SBATCH --signal=TERM@120` sends it
early) and Kubernetes send SIGTERM, then SIGKILL after a grace period. torchrun passes SIGTERM on to each rank's
whole process group (the DataLoader workers too), waits `--shutdown-timeout` (TORCH_ELASTIC_SHUTDOWN_TIMEOUT,
30 s by default), then SIGKILLs. A rank that dies makes torchrun SIGTERM the others and, under `--max-restarts N`,
start the group again, which resumes from checkpoint_last.pt.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import CheckpointError, torch_load
from .errors import S3RError

# What gloo and NCCL say when another process of the group died or hung.
PEER_LOST = re.compile(r"closed by peer|Connection reset|remote worker|NCCL|Timed out|timed out")
# How long a collective waits for a rank that neither answers nor closes its connection (a vanished node), before
# it raises. torch's default for gloo is 30 minutes; no legitimate wait here (validation, rank 0 saving) is that long.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


# ----------------------------------------------------------------------------------------------------------------
# Process group


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
    backend = "nccl" if cuda else "gloo"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and world > 1:  # torchrun's own store, see below
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                              timeout=COLLECTIVE_TIMEOUT)
        store = dist.PrefixStore(group_namespace(store, rank, world), store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    else:
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return True, rank, world, torch.device(f"cuda:{local_rank}" if cuda else "cpu")


def group_namespace(store: dist.Store, rank: int, world: int, timeout: datetime.timedelta = COLLECTIVE_TIMEOUT) -> str:
    """A key prefix of torchrun's store that no earlier worker group has written to.

    torchrun (torch 2.5 and later) keeps one TCPStore for the whole job, across `--max-restarts` restarts, and
    init_process_group's keys carry no restart number: a restarted group can read the addresses its dead
    predecessor published, and gloo then connects to a closed port ("Gloo connectFullMesh failed ... Connection
    refused") or to one that nobody serves (a hang); pytorch/pytorch#135712. Every key here may be stale too, so
    rank 0 makes up a fresh name and every other rank asks for it under a name of its own making."""
    if rank != 0:
        me = uuid.uuid4().hex
        store.set(f"s3r/hello/{rank}", me)
        name = store.get(f"s3r/welcome/{me}").decode()  # waits (up to the store's timeout) for this group's rank 0
        store.add(f"s3r/{name}/joined", 1)
        return f"s3r/{name}/"
    name, answered, deadline = uuid.uuid4().hex, set(), time.monotonic() + timeout.total_seconds()
    while store.add(f"s3r/{name}/joined", 0) < world - 1:
        for r in range(1, world):  # a stale hello gets an answer that nobody reads
            if store.check([f"s3r/hello/{r}"]) and (hello := store.get(f"s3r/hello/{r}").decode()) not in answered:
                answered.add(hello)
                store.set(f"s3r/welcome/{hello}", name)
        if time.monotonic() > deadline:
            raise dist.DistError(f"the other {world - 1} rank(s) did not join rank 0 within {timeout}")
        time.sleep(0.01)
    return f"s3r/{name}/"


def gather(obj, ddp: bool, world: int) -> list:
    """Every rank's `obj`, in rank order, on every rank (picklable objects)."""
    if not ddp:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, ddp: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any (a collective: every rank calls it at the same point)."""
    if not ddp:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


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


# ----------------------------------------------------------------------------------------------------------------
# Signals


class StopSignal:
    """SIGTERM / SIGINT set `requested`: the current update finishes, the run saves and exits 0. Further SIGTERMs
    only repeat the request (SLURM signals every process of a job step and torchrun forwards its own as well); a
    second Ctrl-C interrupts at once. The previous handlers come back on exit."""

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopSignal:
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGTERM / SIGINT blocked in this thread while the block runs, then delivered: wrap whatever forks DataLoader
    workers (iter(loader)), so that they start with the signals blocked until `worker_init_fn` ignores them."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def worker_init_fn(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM / SIGINT to the main process and die with it.

    torchrun signals each rank's whole process group: a worker killed by SIGTERM makes the main process raise
    "DataLoader worker (pid ...) is killed by signal: Terminated" from wherever it is, and nothing is saved. The
    parent-death signal: a worker that outlived a SIGKILLed rank would hold that rank's gloo sockets (inherited at
    the fork) open, and its peers would wait on them instead of failing at once."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the main process was gone before prctl
            os._exit(0)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints of an interrupted run

NUMBERED = re.compile(r"checkpoint_(\d+)_(\d+)\.pt")


def numbered_name(epoch: int, update: int) -> str:
    """fairseq's name of an interval checkpoint, `checkpoint_<epoch>_<update>.pt` (epoch counted from 1)."""
    return f"checkpoint_{epoch}_{update}.pt"


def numbered_checkpoints(save_dir: str | Path) -> list[Path]:
    """The numbered checkpoints in `save_dir`, newest (highest update) first."""
    found = [(int(m.group(2)), p) for p in Path(save_dir).glob("checkpoint_*_*.pt")
             if (m := NUMBERED.fullmatch(p.name))]
    return [p for _, p in sorted(found, key=lambda x: x[0], reverse=True)]


def prune_numbered(save_dir: str | Path, keep: int) -> list[Path]:
    """fairseq's keep_interval_updates: delete all but the `keep` newest numbered checkpoints (keep < 0: none);
    returns the deleted ones."""
    old = numbered_checkpoints(save_dir)[keep:] if keep >= 0 else []
    for p in old:
        p.unlink(missing_ok=True)
    return old


def load_last(save_dir: str | Path) -> dict | None:
    """checkpoint_last.pt of `save_dir`, or None when there is none. One that cannot be read is a one-line
    CheckpointError naming it and the newest numbered checkpoint that can be: never a silent fresh start."""
    last = Path(save_dir) / "checkpoint_last.pt"
    if not last.exists():
        return None
    try:
        return torch_load(last)
    except CheckpointError as e:
        reason = str(e)
    for p in numbered_checkpoints(save_dir):
        try:
            update = torch_load(p)["train_state"]["update"]
        except (CheckpointError, KeyError, TypeError):
            continue
        raise CheckpointError(f"{reason}; the newest readable numbered checkpoint is {p} (update {update}): copy it "
                              f"to {last} to resume from there, or move {last} away to start over")
    raise CheckpointError(f"{reason}; {save_dir} holds no readable numbered checkpoint (--keep-interval-updates): "
                          f"move {last} away to start over")
