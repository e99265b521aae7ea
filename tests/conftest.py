"""Shared fixtures: small corpora in the real download layouts, written by tools/synth_corpus.py, and tiny
routed models.

`tiny_corpus(layout, num=..., **kw)` returns the corpus folder (the --data-root). Corpora are cached for the
session by their arguments; pass `fresh=True` for a private copy a test may damage. Without espeak-ng the
tool falls back to tone "speech", which is enough for every layout and loader test.
`tiny_arch` / `tiny_vocab` / `train_route` give a model small enough to train in a second (routes, export tests).
`fairseq_checkpoint(path, vocab_size=0, seed=0)` writes a random 2-layer, 32-wide wav2vec 2.0 in fairseq's own
format; `tiny_init` is one (pretraining format) and `corpus_root` a Libri-light + dev-other corpus for it (the
train.py and eval.py tests).
"""
import importlib.util
import os
import sys
import types
from pathlib import Path

import fairseq_fixtures as ff
import numpy as np
import pytest
import soundfile as sf
import torch

from s3r import Wav2Vec2Config, Wav2Vec2ForCTC, load_pretrained
from s3r.checkpoint import s3r_checkpoint, save_atomic
from s3r.routes import route_from_model
from s3r.text import Vocabulary

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # pyproject.toml registers the marker too; registering twice is harmless and keeps conftest standalone.
    config.addinivalue_line("markers", "slow: takes more than a few seconds (deselect with -m 'not slow')")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI (CI set, as .ci/run's machine sets it) a skipped test fails: every requirement is installed there,
    so a skip can only mean a missing one hides a code path."""
    report = (yield).get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome, report.longrepr = "failed", f"skipped in CI ({reason}): install what the README says"


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


# Sizes not divisible by 8 (10x10, 13x10, 10x13), so every routed layer's last byte of bits is padded.
TINY_ARCH = dict(conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2), hidden_size=10, num_hidden_layers=2,
                 num_attention_heads=2, intermediate_size=13, conv_pos_kernel=4, conv_pos_groups=2, layerdrop=0.0)
TINY_SYMBOLS = ["<s>", "<pad>", "</s>", "<unk>", "|", "a", "b"]


@pytest.fixture(scope="session")
def tiny_arch() -> dict:
    """Wav2Vec2Config fields of a 2-layer, 10-wide encoder (a copy: tests may override fields)."""
    return dict(TINY_ARCH)


@pytest.fixture(scope="session")
def tiny_vocab() -> Vocabulary:
    return Vocabulary(TINY_SYMBOLS)


@pytest.fixture(scope="session")
def train_route(tiny_vocab):
    """Factory: train_route(pretrained, seed, prune_rate, steps=4, **route_options) -> a routed model in eval mode,
    trained a few steps on random CTC targets, so that its scores are not the initial ones. Attention and FFN are
    routed from kaiming-uniform scores unless `route_options` say otherwise (tests count on it, not on defaults)."""

    def train(pretrained, seed: int, prune_rate: float, steps: int = 4, **route_options):
        torch.manual_seed(seed)
        route_options = {"init_score": "kaiming_uniform", "fix_attn": False, **route_options}
        model = load_pretrained(pretrained, prune_rate=prune_rate, vocab_size=len(tiny_vocab), **route_options)
        model.train()
        model.vocab = tiny_vocab
        params = [p for p in model.parameters() if p.requires_grad]
        wav, targets = torch.randn(2, 1600), torch.randint(4, len(tiny_vocab), (2, 5))
        for _ in range(steps):
            logits, lengths = model(wav)
            loss = torch.nn.functional.ctc_loss(logits.log_softmax(-1).transpose(0, 1), targets, lengths,
                                                torch.full((2,), 5), zero_infinity=True)
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():  # sign descent, Adam's first step; torch.optim would import torch._dynamo (~8 s)
                for p, g in zip(params, grads, strict=True):
                    p.sub_(0.05 * g.sign())
        return model.eval()

    return train


@pytest.fixture(scope="session")
def route_files(tmp_path_factory, tiny_arch, train_route) -> Path:
    """A folder with pretrained.pt (a headless tiny backbone), a.pt / b.pt (mask-mode checkpoints trained on it;
    b also unfreezes the layer norms) and their routes a.route / b.route."""
    d = tmp_path_factory.mktemp("routes")
    torch.manual_seed(0)
    save_atomic(s3r_checkpoint(Wav2Vec2ForCTC(Wav2Vec2Config(**tiny_arch))), d / "pretrained.pt")
    a = train_route(d / "pretrained.pt", seed=1, prune_rate=0.7)
    b = train_route(d / "pretrained.pt", seed=2, prune_rate=0.5, trainable_layer_norm=True)
    for name, model in (("a", a), ("b", b)):
        save_atomic(s3r_checkpoint(model, pretrained=str(d / "pretrained.pt")), d / f"{name}.pt")
        save_atomic(route_from_model(model, str(d / f"{name}.pt")), d / f"{name}.route")
    return d


# The train.py / eval.py model: a 2-layer, 32-wide wav2vec 2.0 whose conv stack downsamples 320x as the real one.
TINY_W2V = dict(conv_dim=(16,) * 7, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=52,
                conv_pos_kernel=16, conv_pos_groups=4)


def write_fairseq_checkpoint(path: Path, vocab_size: int = 0, seed: int = 0) -> Path:
    """A random TINY_W2V in fairseq's own format: pretraining (`Wav2Vec2Model`) or CTC (`wav2vec_ctc`)."""
    torch.manual_seed(seed)
    model = ff.perturb_(Wav2Vec2ForCTC(Wav2Vec2Config(**TINY_W2V, vocab_size=vocab_size)), seed)
    c = model.config
    hf_like = types.SimpleNamespace(state_dict=model.state_dict, config=types.SimpleNamespace(
        num_hidden_layers=c.num_hidden_layers, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_attention_heads=c.num_attention_heads, do_stable_layer_norm=False, conv_dim=c.conv_dim,
        conv_kernel=c.conv_kernel, conv_stride=c.conv_stride, conv_bias=False, feat_extract_norm="group",
        num_conv_pos_embeddings=c.conv_pos_kernel, num_conv_pos_embedding_groups=c.conv_pos_groups))
    write = ff.fairseq_ctc_checkpoint if vocab_size else ff.fairseq_pretraining_checkpoint
    torch.save(write("base", hf_like), path)
    return path


@pytest.fixture(scope="session")
def fairseq_checkpoint():
    """Factory: fairseq_checkpoint(path, vocab_size=0, seed=0) -> path of a random tiny fairseq checkpoint (a CTC
    one when vocab_size > 0)."""
    return write_fairseq_checkpoint


@pytest.fixture(scope="session")
def tiny_init(tmp_path_factory) -> Path:
    """A random tiny wav2vec 2.0 in fairseq's pretraining format (no CTC head)."""
    return write_fairseq_checkpoint(tmp_path_factory.mktemp("init") / "wav2vec_tiny.pt")


@pytest.fixture(scope="session")
def corpus_root(tmp_path_factory) -> Path:
    """librispeech_finetuning/ (28 utterances, 24 of them in train-1h) and LibriSpeech/dev-other (4), tone speech."""
    root = tmp_path_factory.mktemp("libri")
    synth.synth_corpus(root, "librilight", num=28, voice="tone", texts=synth.SENTENCES, workers=2)
    synth.synth_corpus(root, "librispeech", num=4, voice="tone", texts=synth.SENTENCES[5:], split="dev-other",
                       seed=1, workers=2)
    return root
