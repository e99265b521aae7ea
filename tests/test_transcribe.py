"""python -m s3r.transcribe: mixed batches through a bundle, long audio in windows, audio formats, errors."""
import json
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from transformers.pipelines.automatic_speech_recognition import chunk_iter

from s3r import Wav2Vec2Config, Wav2Vec2ForCTC, load_pretrained
from s3r.checkpoint import s3r_checkpoint, save_atomic
from s3r.classify import with_head
from s3r.decode import greedy_decode
from s3r.model import RouteConfig
from s3r.routes import load_bundle, make_bundle, route_from_model
from s3r.transcribe import Routes, chunk_windows, main, read_audio, transcribe_files


def tone_file(path, seconds, rate=16000, freq=220.0, seed=0, channels=1, **kw):
    """A tone with noise (different per seed), so that every file gives a model different logits."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    mono = 0.3 * np.sin(2 * np.pi * freq * t) + 0.1 * rng.standard_normal(len(t))
    sf.write(path, np.stack([mono * (c + 1) / channels for c in range(channels)], 1).astype(np.float32), rate, **kw)
    return str(path)


@pytest.fixture(scope="module")
def ab_bundle(route_files, tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle") / "ab.bundle"
    save_atomic(make_bundle(route_files / "pretrained.pt", {"a": route_files / "a.route",
                                                            "b": route_files / "b.route"}), path)
    return path


def alone(model, path):
    """A file's logits run alone, its whole recording in one forward pass: the reference."""
    with torch.no_grad():
        return model(read_audio(path)[None])[0][0]


@pytest.mark.parametrize("samples,chunk,left,right", [(1000, 300, 50, 50), (1000, 300, 0, 100), (300, 300, 50, 50),
                                                      (301, 300, 50, 50), (1234, 400, 100, 60), (50, 300, 50, 50)])
def test_windows_are_transformers_chunk_iter(samples, chunk, left, right):
    """(start, end, stride left, stride right) as transformers' own chunk_iter yields them."""
    class Identity:
        sampling_rate = 16000

        def __call__(self, chunk, **kw):
            return {"input_values": chunk}

    theirs = [(int(c["input_values"][0]), int(c["input_values"][0]) + c["stride"][0], *c["stride"][1:])
              for c in chunk_iter(np.arange(samples), Identity(), chunk, left, right)]
    assert chunk_windows(samples, chunk, left, right) == theirs


def test_mixed_batch_equals_each_checkpoint_alone(route_files, ab_bundle, tmp_path, monkeypatch):
    """Files of two routes, interleaved, at other rates and channel counts: each gets exactly the logits and text of
    its own checkpoint run on it alone, and the bundle switches route once per route, on the same weights."""
    files = [(tone_file(tmp_path / f"{i}.wav", 0.2 + 0.07 * i, rate, 150 + 40 * i, i, ch), route)
             for i, (rate, ch, route) in enumerate([(16000, 1, "a"), (8000, 2, "b"), (22050, 1, "a"),
                                                    (16000, 1, "b"), (44100, 2, "b"), (16000, 1, "a")])]
    routes = Routes(ab_bundle)
    weight = routes.bundle.model.encoder.layers[0].attention.q_proj.weight
    switches = []
    use = routes.bundle.use
    monkeypatch.setattr(routes.bundle, "use", lambda name: switches.append(name) or use(name))
    results = transcribe_files(routes, files, keep_logits=True)
    assert switches == ["a", "b"]
    assert routes.bundle.model.encoder.layers[0].attention.q_proj.weight is weight  # no weight reload
    own = {n: load_pretrained(route_files / f"{n}.pt") for n in "ab"}
    for (path, route), r in zip(files, results, strict=True):
        want = alone(own[route], path)
        assert r.route == route and r.error is None
        assert torch.equal(r.logits, want)
        assert r.text == greedy_decode(want[None], None, own[route].vocab)[0]
    other = alone(own["b"], files[0][0])  # the routes do differ on the same file
    assert not torch.allclose(other, results[0].logits, atol=1e-3)


def test_batched_windows_equal_alone(tmp_path, tiny_arch, tiny_vocab):
    """--batch-size 3 pads the windows of a batch; padding changes no result (the group norm too): same logits."""
    torch.manual_seed(3)
    model = Wav2Vec2ForCTC(Wav2Vec2Config(**tiny_arch, vocab_size=len(tiny_vocab)))
    model.vocab = tiny_vocab
    save_atomic(s3r_checkpoint(model.eval()), tmp_path / "ln.pt")
    files = [(tone_file(tmp_path / f"{i}.flac", 0.1 + 0.05 * i, seed=i), None) for i in range(5)]
    results = transcribe_files(Routes(tmp_path / "ln.pt"), files, batch_size=3, keep_logits=True)
    for (path, _), r in zip(files, results, strict=True):
        torch.testing.assert_close(r.logits, alone(model, path), atol=1e-5, rtol=1e-5)


def local_model(tiny_arch, tiny_vocab):
    """A model without transformer blocks (layer-norm convs, a 4-frame positional conv): each frame sees only 3
    frames of input around it, so windows overlapping by more than that must stitch into the unchunked output."""
    torch.manual_seed(4)
    cfg = {**tiny_arch, "num_hidden_layers": 0, "feat_extract_norm": "layer", "vocab_size": len(tiny_vocab)}
    model = Wav2Vec2ForCTC(Wav2Vec2Config(**cfg)).eval()
    model.vocab = tiny_vocab
    return model


@pytest.mark.parametrize("chunk_s,stride_s", [(0.05, 0.01), (0.031, 0.006), (0.1, 0.03)])
def test_long_audio_windows_stitch_into_the_whole(tmp_path, tiny_arch, tiny_vocab, chunk_s, stride_s):
    """A long concatenation of three recordings, cut into windows (hop-aligned, as transformers aligns them): the
    stitched logits are the unchunked ones frame for frame, none lost or doubled, and inside each part they are
    that part's own logits (so the text is the parts' text wherever the context allows)."""
    model = local_model(tiny_arch, tiny_vocab)
    save_atomic(s3r_checkpoint(model), tmp_path / "local.pt")
    parts = [tone_file(tmp_path / f"p{i}.wav", s, freq=f, seed=i) for i, (s, f) in
             enumerate([(0.13, 300.0), (0.2, 500.0), (0.09, 700.0)])]
    whole = torch.cat([read_audio(p) for p in parts])
    sf.write(tmp_path / "long.wav", whole.numpy(), 16000, subtype="FLOAT")
    r = transcribe_files(Routes(tmp_path / "local.pt"), [(str(tmp_path / "long.wav"), None)], chunk_s=chunk_s,
                         stride_s=stride_s, keep_logits=True)[0]
    unchunked = alone(model, tmp_path / "long.wav")
    assert r.logits.shape == unchunked.shape
    torch.testing.assert_close(r.logits, unchunked, atol=1e-5, rtol=1e-5)
    start = 0
    for p in parts:  # 1.6 samples... each part's interior frames: its own logits
        own, first = alone(model, p), start // 10
        torch.testing.assert_close(r.logits[first + 3: first + own.shape[0] - 3], own[3:-3], atol=1e-5, rtol=1e-5)
        start += read_audio(p).numel()
    assert r.text == greedy_decode(unchunked[None], None, tiny_vocab)[0]


def test_audio_formats_and_rates(tmp_path):
    """flac/ogg/mp3 at 8, 22.05 and 44.1 kHz, stereo: mono at 16 kHz, the lossless one equal to torchaudio's
    resampling of its channel mean."""
    flac = tone_file(tmp_path / "a.flac", 0.5, 44100, channels=2)
    data, rate = sf.read(flac, dtype="float32")
    want = torchaudio.functional.resample(torch.from_numpy(data).mean(1), rate, 16000)
    torch.testing.assert_close(read_audio(flac), want, atol=1e-4, rtol=0)
    for name, rate in (("b.ogg", 22050), ("c.mp3", 8000)):
        wav = read_audio(tone_file(tmp_path / name, 0.5, rate))
        assert wav.dim() == 1 and abs(wav.numel() - 8000) < 1200  # codec padding: a frame or so


def test_cli_bad_files_do_not_stop_the_rest(route_files, ab_bundle, tmp_path, capsys):
    good = [tone_file(tmp_path / f"g{i}.wav", 0.1, seed=i) for i in range(2)]
    (tmp_path / "text.wav").write_text("not audio")
    (tmp_path / "empty.flac").write_bytes(b"")
    tone_file(tmp_path / "short.wav", 0.01)
    bad = [str(tmp_path / n) for n in ("text.wav", "empty.flac", "short.wav", "missing.mp3")]
    out = tmp_path / "out.json"
    code = main([str(ab_bundle), f"a={good[0]}", *bad, f"b={good[1]}", "--route", "b", "--json", str(out)])
    o, e = capsys.readouterr()
    assert code == 1
    lines = o.strip().splitlines()
    assert [line.split("\t")[:2] for line in lines] == [[good[0], "a"], [good[1], "b"]]
    errors = e.strip().splitlines()
    assert len(errors) == 5 and errors[-1] == "4 of 6 file(s) could not be read"
    for path, line in zip(bad, errors, strict=False):
        assert line.startswith(f"error: {path}")
    assert "too short" in errors[2] and "no such file" in errors[3]
    rows = json.loads(out.read_text())
    assert [r.get("route") for r in rows] == ["a", "b", "b", "b", "b", "b"]  # the route each file was given
    assert rows[0]["text"] == lines[0].split("\t")[2] and "error" in rows[1]


@pytest.mark.parametrize("args,message", [
    (["x.wav"], "holds 2 routes (a, b): pass --route"),
    (["x.wav", "--route", "c"], "--route c: no such route"),
    (["x.wav", "--route", "auto"], "no classification route whose labels are route names"),
    (["x.wav", "--chunk-s", "1", "--stride-s", "0.5", "--route", "a"], "--chunk-s must exceed twice --stride-s"),
    (["x.wav", "--route", "a", "--kenlm", "zz=lm.bin"], "--kenlm zz=lm.bin: no route 'zz'"),
])
def test_cli_errors_are_one_line(ab_bundle, tmp_path, capsys, args, message):
    tone_file(tmp_path / "x.wav", 2.0)
    args = [str(tmp_path / a) if a == "x.wav" else a for a in args]
    assert main([str(ab_bundle), *args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_installed_route_is_bytes_and_training_still_gets_float_scores(route_files, ab_bundle):
    """A switched-in route holds its mask as uint8 scores sharing the mask's bytes (no fp32 copy); routing the same
    model for training makes fp32 scores that take gradients."""
    bundle = load_bundle(ab_bundle)
    model = bundle.use("a")
    q = model.encoder.layers[0].attention.q_proj
    assert q.scores.dtype == torch.uint8 and not q.scores.requires_grad
    assert q.mask().data_ptr() == q.scores.data_ptr()
    assert torch.equal(q.mask(), load_pretrained(route_files / "a.pt").encoder.layers[0].attention.q_proj.mask())
    model.route(RouteConfig(prune_rate=0.5, init_score="kaiming_uniform", fix_attn=False))
    assert q.scores.dtype == torch.float32 and q.scores.requires_grad
    assert all(m.scores.dtype == torch.float32 for m in model.routed().values())
    model.route(RouteConfig(prune_rate=0.5, fix_attn=True))  # the attention layers the route masked: dense again
    assert q.scores is None and torch.equal(q.mask(), torch.ones_like(q.weight, dtype=torch.bool))
    model.route(RouteConfig(prune_rate=0.5, init_score="kaiming_uniform", fix_attn=False))
    model.train()
    model(torch.randn(1, 800))[0].sum().backward()
    assert q.scores.grad is not None and q.scores.grad.abs().sum() > 0


@pytest.mark.slow  # a fresh interpreter imports torch: 3-20 s depending on the machine's load
def test_python_m_entry_point(ab_bundle, tmp_path, run_cli):
    f = tone_file(tmp_path / "x.ogg", 0.3, 48000)
    proc = run_cli("-m", "s3r.transcribe", str(ab_bundle), f, "--route", "a")
    assert proc.returncode == 0, proc.stderr
    path, route, text = proc.stdout.rstrip("\n").split("\t")
    assert (path, route) == (f, "a") and set(text) <= set("ab |")


@pytest.fixture(scope="module")
def lid_bundle(route_files, tmp_path_factory):
    """Six audio files, and a bundle of a, b and `lid`: a classification route over the same weights whose labels
    name a and b, its bias set so that it calls half of the files a (a random route would call them all one)."""
    d = tmp_path_factory.mktemp("lid")
    files = [tone_file(d / f"t{i}.wav", 0.2 + 0.05 * i, freq=300 + 100 * i, seed=i) for i in range(3)]
    rng = np.random.default_rng(1)
    for i in range(3):
        sf.write(d / f"n{i}.flac", (0.3 * rng.standard_normal(3200 + 800 * i)).astype(np.float32), 16000)
        files.append(str(d / f"n{i}.flac"))
    base = load_pretrained(route_files / "pretrained.pt")
    torch.manual_seed(7)
    lid = with_head(base, replace(base.config, labels=("a", "b"), classifier_proj_size=6))
    lid.route(RouteConfig(prune_rate=0.7, init_score="kaiming_uniform", fix_attn=False)).eval()
    margins = torch.stack([alone(lid, f) for f in files]) @ torch.tensor([1.0, -1.0])  # logit a - logit b
    with torch.no_grad():
        lid.classifier.bias[0] -= margins.median() + 1e-4 * (margins.max() - margins.min())
    save_atomic(s3r_checkpoint(lid, pretrained=str(route_files / "pretrained.pt")), d / "lid.pt")
    save_atomic(route_from_model(lid, str(d / "lid.pt")), d / "lid.route")
    save_atomic(make_bundle(route_files / "pretrained.pt", {"a": route_files / "a.route", "b": route_files / "b.route",
                                                            "lid": d / "lid.route"}), d / "abl.bundle")
    return d, files


def test_auto_routes_each_file_by_the_language_id_route(route_files, lid_bundle):
    """--route auto: each file goes to the route that the LID checkpoint, run alone on it, names; its transcript is
    that route's own checkpoint's."""
    d, paths = lid_bundle
    lid = load_pretrained(d / "lid.pt")
    own = {n: load_pretrained(route_files / f"{n}.pt") for n in "ab"}
    results = transcribe_files(Routes(d / "abl.bundle"), [(p, None) for p in paths], default_route="auto",
                               keep_logits=True)
    picked = []
    for path, r in zip(paths, results, strict=True):
        probs = alone(lid, path).softmax(-1)
        want = ("a", "b")[int(probs.argmax())]
        assert r.route == want and r.auto["route"] == "lid" and r.auto["label"] == want
        assert r.auto["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert torch.equal(r.logits, alone(own[want], path))
        picked.append(want)
    assert sorted(picked) == ["a"] * 3 + ["b"] * 3


def test_classification_route_prints_label_and_probability(lid_bundle, capsys):
    d, paths = lid_bundle
    assert main([str(d / "abl.bundle"), *paths[:2], "--route", "lid"]) == 0
    lid = load_pretrained(d / "lid.pt")
    for path, line in zip(paths, capsys.readouterr().out.splitlines(), strict=False):
        probs = alone(lid, path).softmax(-1)
        assert line == f"{path}\tlid\t{'ab'[int(probs.argmax())]} ({float(probs.max()):.3f})"
