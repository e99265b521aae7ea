"""What the benchmarks share: the one-line description of the machine that heads every results file."""
from __future__ import annotations

import os
import platform
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
