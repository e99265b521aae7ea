"""Shared fixtures: small corpora in the real download layouts, written by tools/synth_corpus.py.

`tiny_corpus(layout, num=..., **kw)` returns the corpus folder (the --data-root). Corpora are cached for the
session by their arguments; pass `fresh=True` for a private copy a test may damage. Without espeak-ng the
tool falls back to tone "speech", which is enough for every layout and loader test.
"""
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # pyproject.toml registers the marker too; registering twice is harmless and keeps conftest standalone.
    config.addinivalue_line("markers", "slow: takes more than a few seconds (deselect with -m 'not slow')")


def _load_synth():
    spec = importlib.util.spec_from_file_location("synth_corpus", REPO / "tools" / "synth_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


synth = _load_synth()


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the audio scan cache of s3r.data out of the user's ~/.cache during tests."""
    old = os.environ.get("S3R_CACHE")
    os.environ["S3R_CACHE"] = str(tmp_path_factory.mktemp("s3r-cache"))
    torch.set_num_threads(1)  # tiny tensors; the test machine's cores are shared
    yield
    if old is None:
        os.environ.pop("S3R_CACHE", None)
    else:
        os.environ["S3R_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """Factory: tiny_corpus("librispeech"|"librilight"|"commonvoice"|"manifest", num=6, fresh=False, **kw)."""
    made = {}

    def make(layout: str, num: int = 6, fresh: bool = False, **kw) -> Path:
        kw.setdefault("texts", synth.SENTENCES)  # not the machine's fortunes: tests must not depend on them
        key = (layout, num, tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(kw.items())))
        if fresh or key not in made:
            out = tmp_path_factory.mktemp(layout)
            synth.synth_corpus(out, layout, num=num, workers=2, **kw)
            if fresh:
                return out
            made[key] = out
        return made[key]

    return make


@pytest.fixture
def write_audio(tmp_path):
    """Factory: write_audio(name, seconds=1.0, rate=16000, channels=1) -> path of a noisy tone file."""

    def write(name: str, seconds: float = 1.0, rate: int = 16000, channels: int = 1, **kw) -> Path:
        t = np.arange(int(seconds * rate)) / rate
        mono = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * np.random.default_rng(0).standard_normal(len(t))
        data = np.stack([mono * (c + 1) / channels for c in range(channels)], axis=1).astype(np.float32)
        path = tmp_path / name
        sf.write(path, data, rate, **kw)
        return path

    return write


@pytest.fixture
def run_cli():
    """Run a `python -m ...` command line in a subprocess at the repository root; returns CompletedProcess."""
    import subprocess

    def run(*args: str, timeout: float = 120):
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env,
                              timeout=timeout)

    return run
