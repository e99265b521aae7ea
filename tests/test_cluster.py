"""s3r.cluster and train.py on a cluster: stop signals with DataLoader workers on, a rank killed under torchrun
--max-restarts (the restart resumes and ends bit-equal), restarted groups against torchrun's stale store keys,
time-based and numbered checkpoints, an unreadable checkpoint_last.pt.

Runs are conftest's tiny random wav2vec 2.0 (`tiny_init`) on its tone corpus (`corpus_root`); torchrun runs are
2 gloo processes on CPU.
"""
import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from test_train import ENV, args, assert_same_checkpoint, log_lines

import train
from s3r import cluster
from s3r.checkpoint import torch_load

# train.main in a file of its own under torchrun, so that every rank leaves its exit code behind (a rank killed by
# a signal leaves none).
RANK_MAIN = """
import os, sys
import train
code = train.main(sys.argv[1:])
with open(os.path.join(os.environ["S3R_TEST_RC_DIR"], f"rank{os.environ['RANK']}.rc"), "a") as f:
    f.write(f"{code}\\n")
sys.exit(code)
"""


def torchrun_cmd(tmp_path: Path, *train_args, restarts: int = 0) -> list[str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "rank_main.py"
    script.write_text(RANK_MAIN)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            f"--max-restarts={restarts}", str(script), *map(str, train_args)]


def popen(cmd: list[str], out: Path) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(ENV, S3R_TEST_RC_DIR=str(out))
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(out / "stdout", "w"), stderr=open(out / "stderr", "w"))


def rank_codes(out: Path) -> dict[int, list[int]]:
    return {r: [int(c) for c in (out / f"rank{r}.rc").read_text().split()] for r in (0, 1)
            if (out / f"rank{r}.rc").exists()}


def wait_for_update(save_dir: Path, update: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Until rank 0 has logged training update `update` (or later)."""
    t0 = time.time()
    while True:
        try:
            if any(line.get("update", -1) >= update and "loss" in line for line in log_lines(save_dir)):
                return
        except (OSError, ValueError):  # not there yet, or a line half written
            pass
        assert proc.poll() is None, (save_dir.parent / "stderr").read_text()[-3000:]
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def assert_no_traceback_from_ranks(err: str) -> None:
    """torchrun prints a traceback of its own when it is signalled (SignalException); the ranks print none."""
    for bad in ("DataLoader worker", "terminate called", "Aborted", "core dumped", "error:"):
        assert bad not in err, err[-3000:]
    assert err.count("Traceback") == err.count("multiprocessing.api.SignalException: Process"), err[-3000:]


# ----------------------------------------------------------------------------------------------------------------
# Stop signals


def test_repeated_sigterm_only_repeats_the_request_and_a_second_ctrl_c_interrupts():
    with cluster.StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # SLURM's own and torchrun's: the process must live on
        time.sleep(0.05)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGTERM) != stop._handle


class _Slow(torch.utils.data.Dataset):
    """Items that take a while and say which process made them."""

    def __init__(self, n: int, seconds: float):
        self.n, self.seconds = n, seconds

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        time.sleep(self.seconds)
        return torch.tensor([i, os.getpid()])


@pytest.mark.parametrize("init", [cluster.worker_init_fn, None])
def test_dataloader_worker_survives_sigterm(init):
    """torchrun SIGTERMs the whole process group: with worker_init_fn the worker carries on (the main process
    decides when to stop); without it the worker dies and the main process raises (the failure this prevents)."""
    loader = torch.utils.data.DataLoader(_Slow(12, 0.02), num_workers=1, worker_init_fn=init)
    with cluster.signals_deferred() if init else contextlib.nullcontext():
        batches = iter(loader)
    worker = int(next(batches)[0, 1])
    if init is None:
        with pytest.raises(RuntimeError, match="DataLoader worker"):  # raised by a SIGCHLD handler, wherever
            os.kill(worker, signal.SIGTERM)
            for _ in batches:
                time.sleep(0.05)
    else:
        os.kill(worker, signal.SIGTERM)
        assert [int(b[0, 0]) for b in batches] == list(range(1, 12))


WORKER_ORPHAN = """
import os, sys, time, torch
from s3r import cluster
class Slow(torch.utils.data.Dataset):
    def __len__(self): return 10
    def __getitem__(self, i):
        print(os.getpid(), flush=True)
        time.sleep(600)
init = cluster.worker_init_fn if sys.argv[1] == "init" else None
loader = torch.utils.data.DataLoader(Slow(), num_workers=1, worker_init_fn=init)
next(iter(loader))
"""


def test_dataloader_worker_dies_with_its_main_process(tmp_path):
    """A SIGKILLed rank's worker must not live on holding the rank's (inherited) sockets open."""
    proc = subprocess.Popen([sys.executable, "-c", WORKER_ORPHAN, "init"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            text=True)
    worker = int(proc.stdout.readline())
    proc.kill()
    proc.wait(timeout=30)

    def alive() -> bool:  # a zombie nobody reaps (PID 1 in a container may not) is dead too
        try:
            return Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    t0 = time.time()
    while alive() and time.time() - t0 < 60:  # without the parent-death signal it sleeps on for 600 s
        time.sleep(0.1)
    assert not alive()


# ----------------------------------------------------------------------------------------------------------------
# torchrun's store across restarts


def _join(store_port: int, world: int) -> list[str]:
    names, errors = [None] * world, []

    def one(rank):
        try:
            store = torch.distributed.TCPStore("127.0.0.1", store_port, world, is_master=False)
            names[rank] = cluster.group_namespace(store, rank, world)
        except Exception as e:  # noqa: BLE001  reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and all(names), errors
    return names


def test_every_restarted_group_gets_a_namespace_of_its_own():
    """One store for the whole job, as torchrun keeps it: stale hellos of dead ranks must not confuse a new group."""
    server = torch.distributed.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    server.set("s3r/hello/1", "a-rank-that-died")
    server.set("s3r/hello/2", "another")
    seen = set()
    for _ in range(3):  # three groups in a row, each leaving its keys behind
        names = _join(server.port, 3)
        assert len(set(names)) == 1 and names[0] not in seen
        seen.add(names[0])


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: by time, numbered, an unreadable checkpoint_last.pt


def saved_updates(monkeypatch) -> list[tuple[str, int]]:
    calls = []
    real = train.save_atomic

    def record(obj, path):
        calls.append((Path(path).name, obj["train_state"]["update"]))
        real(obj, path)

    monkeypatch.setattr(train, "save_atomic", record)
    return calls


def test_save_interval_minutes_writes_checkpoint_last_between_update_saves(tiny_init, corpus_root, tmp_path,
                                                                          monkeypatch):
    calls = saved_updates(monkeypatch)
    common = ("--max-updates", 3, "--valid", "", "--save-interval", 1000)
    assert train.main(args(tiny_init, corpus_root, tmp_path / "a", *common, "--save-interval-minutes", 10)) == 0
    assert calls == [("checkpoint_last.pt", 3)]  # 10 minutes never passed: only the final save
    calls.clear()
    assert train.main(args(tiny_init, corpus_root, tmp_path / "b", *common, "--save-interval-minutes", 1e-6)) == 0
    assert calls == [("checkpoint_last.pt", 1), ("checkpoint_last.pt", 2), ("checkpoint_last.pt", 3)]
    assert_same_checkpoint(tmp_path / "a" / "checkpoint_last.pt", tmp_path / "b" / "checkpoint_last.pt")


@pytest.mark.parametrize("keep, kept", [(2, [4, 5]), (-1, [1, 2, 3, 4, 5]), (0, [])])
def test_keep_interval_updates_keeps_the_newest_numbered_checkpoints(tiny_init, corpus_root, tmp_path, keep, kept):
    assert train.main(args(tiny_init, corpus_root, tmp_path, "--max-updates", 5, "--valid", "", "--save-interval", 1,
                           "--keep-interval-updates", keep)) == 0
    numbered = sorted(cluster.numbered_checkpoints(tmp_path), key=lambda p: p.name)
    states = [torch_load(p)["train_state"] for p in numbered]
    assert sorted(s["update"] for s in states) == kept
    for p, s in zip(numbered, states, strict=True):  # fairseq's names: checkpoint_<epoch from 1>_<update>.pt
        assert p.name == f"checkpoint_{s['epoch'] + 1}_{s['update']}.pt"
    if kept:
        assert_same_checkpoint(cluster.numbered_checkpoints(tmp_path)[0], tmp_path / "checkpoint_last.pt")


def test_unreadable_checkpoint_last_names_the_newest_readable_numbered_one(tiny_init, corpus_root, tmp_path, capsys):
    run = lambda: train.main(args(tiny_init, corpus_root, tmp_path, "--max-updates", 6, "--valid", "",  # noqa: E731
                                  "--save-interval", 1, "--keep-interval-updates", 3))
    assert train.main(args(tiny_init, corpus_root, tmp_path, "--max-updates", 4, "--valid", "", "--save-interval", 1,
                           "--keep-interval-updates", 3)) == 0
    last = tmp_path / "checkpoint_last.pt"
    newest, second = cluster.numbered_checkpoints(tmp_path)[:2]  # updates 4 and 3
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    newest.write_text("not a checkpoint")
    capsys.readouterr()
    assert run() == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    assert str(last) in lines[0] and second.name in lines[0] and "update 3" in lines[0] and newest.name not in lines[0]
    for p in cluster.numbered_checkpoints(tmp_path):
        p.unlink()
    assert run() == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and str(last) in err and "no readable numbered checkpoint" in err
    assert [line.get("event") for line in log_lines(tmp_path) if "event" in line] == ["start"]  # never started over


# ----------------------------------------------------------------------------------------------------------------
# torchrun: SIGTERM, a killed rank


@pytest.mark.slow
def test_sigterm_to_torchrun_with_dataloader_workers_saves_and_every_rank_exits_0(tiny_init, corpus_root, tmp_path):
    save_dir = tmp_path / "run"
    train_args = args(tiny_init, corpus_root, save_dir, "--valid", "", "--num-workers", 1)  # DataLoader workers on
    proc = popen(torchrun_cmd(tmp_path, *train_args, "--max-updates", 10000), tmp_path)
    wait_for_update(save_dir, random.randint(3, 20), proc)
    proc.send_signal(signal.SIGTERM)  # what scancel / kubectl delete do to the job's main process
    proc.wait(timeout=120)
    err = (tmp_path / "stderr").read_text()
    assert rank_codes(tmp_path) == {0: [0], 1: [0]}, err[-3000:]
    assert "forcefully exiting via" not in err  # torchrun never needed SIGKILL: inside its grace period
    assert_no_traceback_from_ranks(err)
    update = torch_load(save_dir / "checkpoint_last.pt")["train_state"]["update"]
    assert f"stopped by a signal at update {update}" in err and log_lines(save_dir)[-1]["update"] == update
    # the same command again resumes there
    proc = popen(torchrun_cmd(tmp_path, *train_args, "--max-updates", update + 2), tmp_path / "again")
    assert proc.wait(timeout=240) == 0, (tmp_path / "again" / "stderr").read_text()[-3000:]
    resumed = [line for line in log_lines(save_dir) if line.get("event") == "resume"]
    assert [line["update"] for line in resumed] == [update]
    assert torch_load(save_dir / "checkpoint_last.pt")["train_state"]["update"] == update + 2


@pytest.mark.slow
def test_killed_rank_under_max_restarts_resumes_and_ends_bit_equal(tiny_init, corpus_root, tmp_path):
    """SIGKILL one rank at a random update: the other exits with one line, torchrun restarts the group, which
    resumes from checkpoint_last.pt and ends exactly where an uninterrupted run ends."""
    n = 24
    common = ("--max-updates", n, "--valid", "", "--num-workers", 1, "--save-interval", 4)
    ref = popen(torchrun_cmd(tmp_path / "ref", *args(tiny_init, corpus_root, tmp_path / "ref" / "run", *common)),
                tmp_path / "ref")
    assert ref.wait(timeout=240) == 0, (tmp_path / "ref" / "stderr").read_text()[-3000:]
    rng = random.Random()
    target = rng.randint(5, n - 6)  # after the first checkpoint (update 4), before the end
    out = tmp_path / "killed"
    proc = popen(torchrun_cmd(out, *args(tiny_init, corpus_root, out / "run", *common), restarts=2), out)
    wait_for_update(out / "run", target, proc)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2
    os.kill(int(rng.choice(ranks)), signal.SIGKILL)
    assert proc.wait(timeout=300) == 0, f"killed after update {target}: " + (out / "stderr").read_text()[-3000:]
    err = (out / "stderr").read_text()
    assert "Traceback" not in err, err[-3000:]
    events = [(line["event"], line["update"]) for line in log_lines(out / "run") if "event" in line]
    assert events[0] == ("start", 0) and events[1][0] == "resume" and events[1][1] < n, events
    assert_same_checkpoint(out / "run" / "checkpoint_last.pt", tmp_path / "ref" / "run" / "checkpoint_last.pt")
