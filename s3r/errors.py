"""The exceptions s3r raises for bad input: one line that names the file, key, flag or value at fault.

Under torchrun every rank meets the same configuration error; `is_rank0()` (from the environment torchrun sets,
so it works before the process group exists) lets the scripts print it once, and `ArgumentParser` does the same
for argparse's own errors.
"""
import argparse
import os
import sys


class S3RError(Exception):
    """A user-facing error (bad file, key, flag or data) whose one-line message names the culprit."""


class ConfigError(S3RError, ValueError):
    """An impossible Wav2Vec2Config or RouteConfig (a ValueError too, for code that catches those)."""


class ShapeError(S3RError, ValueError):
    """A tensor of the wrong shape handed to the model."""


def is_rank0() -> bool:
    """True in a single process and in torchrun's rank 0 (RANK is set by torchrun before any process group)."""
    return os.environ.get("RANK", "0") == "0"


def warn(msg: str) -> None:
    """`warning: msg` on stderr, once per run (rank 0)."""
    if is_rank0():
        print(f"warning: {msg}", file=sys.stderr)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the scripts: no abbreviated flags (`--prune-rat` is an error, not `--prune-rate`), and a bad
    command line is one line, `error: ...` with the program name, printed by rank 0 only (exit status 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        if is_rank0():
            print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


_setup = {"done": False}


def setup_phase(running: bool) -> None:
    """A script's set-up, the same on every rank, starts (True) or is over (False): after it an error may be one
    rank's own."""
    _setup["done"] = not running


def report(e: BaseException, rank: int | None = None) -> None:
    """`error: ...` on stderr: during set-up once (rank 0: every rank meets the same error), afterwards by the
    rank that met it, naming it."""
    if not _setup["done"]:
        if is_rank0():
            print(f"error: {e}", file=sys.stderr)
    else:
        print(f"error: {e}" + (f" (rank {rank})" if rank is not None else ""), file=sys.stderr)
