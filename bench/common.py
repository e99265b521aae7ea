"""What the benchmarks share: the one-line description of the machine, and CPU peak memory in a fresh process."""
from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch


def describe_machine(args) -> str:
    """CPU model, cores, threads, dtype, torch version and CPU capability (or the CUDA device): `args` needs
    .device, .dtype and .threads."""
    if args.device == "cuda":
        return f"{torch.cuda.get_device_name()}, {args.dtype}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {args.threads} torch thread(s), {args.dtype}, torch {torch.__version__}"
            f" ({torch.backends.cpu.get_cpu_capability()})")


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: the peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def cpu_peak_mib(run: Callable[[], object]) -> tuple[float, float]:
    """(resting MiB, peak MiB above it) of `run()` on CPU: freed memory handed back to the OS (malloc_trim, and
    MALLOC_MMAP_THRESHOLD_ from run_memory_worker), the peak RSS counter reset, `run()`, the peak read."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak RSS) to the current RSS
    rest = status_kib("VmRSS")
    run()
    return rest / 1024, (status_kib("VmHWM") - rest) / 1024


def run_memory_worker(module: str, spec: dict, what: str, cwd: Path | None = None) -> dict:
    """`python -m MODULE --memory-worker SPEC` in a fresh process, glibc returning every block above 64 KiB to the
    OS when freed (so RSS follows what is live); returns the JSON its last line prints."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-m", module, "--memory-worker", json.dumps(spec)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"memory worker {what} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
