"""s3r/fast.py: every speed path gives the reference's numbers (1e-5, forward and gradients), and the switches
(S3R_REFERENCE=1, fast.set_enabled) really turn them off."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from s3r import fast
from s3r.model import RouteConfig, Wav2Vec2Config, Wav2Vec2ForCTC, kept_count, topk_mask

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
TOL = dict(rtol=1e-5, atol=1e-5)


def assert_near(actual, expected, msg=""):
    """Within 1e-5 of the largest |expected| (float32 sums in another order differ by ~1e-6 of their size)."""
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(actual)) and torch.equal(actual[~finite], expected[~finite]), msg
    err = (actual[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    assert err <= 1e-5 * max(1.0, expected[finite].abs().max().item()), f"{msg}: max abs error {err:.3g}"


VARIANTS = {  # the four encoder families, as tiny models
    "base": dict(),  # post-LN, group-norm extractor, weight-normed positional conv
    "large": dict(feat_extract_norm="layer", conv_bias=True, layer_norm_first=True),  # pre-LN, layer-norm extractor
    "data2vec": dict(feat_extract_norm="layer", conv_pos_kernel=5, conv_pos_depth=3),  # positional conv stack
    "hubert": dict(feat_proj_layer_norm=False),
}
MODES = {  # what trains: (route config or None for dense finetuning, extractor trainable)
    "ft": (None, False),
    "ft-extractor": (None, True),
    "route": (RouteConfig(prune_rate=0.7, fix_attn=False, trainable_pos=True), False),
    "co_train": (RouteConfig(prune_rate=0.6, co_train=True, route_pos_conv=True), False),
}


def tiny_model(variant: str, seed: int = 0) -> Wav2Vec2ForCTC:
    cfg = dict(conv_dim=(16, 24, 20), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2), hidden_size=32,
               num_hidden_layers=2, num_attention_heads=4, intermediate_size=52, conv_pos_kernel=16,
               conv_pos_groups=4, vocab_size=7, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
               layerdrop=0.0)
    torch.manual_seed(seed)
    return Wav2Vec2ForCTC(Wav2Vec2Config(**{**cfg, **VARIANTS[variant]}))


@pytest.fixture(autouse=True)
def speed_paths_on(monkeypatch):
    """These tests exercise the speed paths (the `reference` fixture turns them off where a test compares), so they
    run the same whether or not the suite itself runs with S3R_REFERENCE=1."""
    monkeypatch.setattr(fast, "_enabled", True)


@pytest.fixture
def reference(monkeypatch):
    """Call with True to run the reference alone, False for the speed paths."""
    return lambda on: monkeypatch.setattr(fast, "_enabled", not on)


BATCHES = {"padded": torch.tensor([2000, 1400, 1011]), "unpadded": torch.tensor([2000, 2000, 2000])}


def batch(name):
    g = torch.Generator().manual_seed(5)
    lengths = BATCHES[name]
    wav = torch.randn(len(lengths), 2000, generator=g) * (torch.arange(2000) < lengths[:, None])
    return wav, lengths


def step(model, wav, lengths):
    """Logits and the gradient of every trainable parameter for a loss over the valid frames."""
    model.zero_grad(set_to_none=True)
    out, out_lengths = model(wav, lengths)
    valid = (torch.arange(out.shape[1])[None, :] < out_lengths[:, None]).unsqueeze(-1)  # (B, T, 1)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (torch.where(valid, out, 0.0) * g).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("padding", list(BATCHES))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fast_equals_reference(variant, mode, padding, reference):
    route, extractor = MODES[mode]
    model = tiny_model(variant)
    if route is not None:
        model.route(route)
    elif not extractor:
        model.freeze_feature_encoder()
    model.train()
    wav, lengths = batch(padding)
    results = {}
    for ref in (True, False):
        reference(ref)
        results[ref] = step(model, wav, lengths)
        with torch.no_grad():
            model.eval()
            results[ref] += (model(wav, lengths)[0],)  # inference: no autograd
            model.train()
    (out, grads, inference), (out_fast, grads_fast, inference_fast) = results[True], results[False]
    assert_near(out_fast, out, "logits")  # padded frames too: -inf except the blank in both
    assert_near(inference_fast, inference, "inference logits")
    assert grads.keys() == grads_fast.keys()
    expected = {"lm_head.weight", "encoder.pos_conv_embed.layers.0.conv.weight" if variant == "data2vec"
                else "encoder.pos_conv_embed.conv.weight_v"}
    if route is not None:
        expected.add("encoder.layers.0.feed_forward.intermediate_dense.scores")
    if route is None or route.co_train:
        expected.add("encoder.layers.1.attention.q_proj.weight")
    if extractor:
        expected.add("feature_extractor.conv_layers.0.conv.weight")
    assert expected <= grads.keys()
    for name in grads:
        assert_near(grads_fast[name], grads[name], name)


@pytest.mark.parametrize("variant", ["base", "large"])
def test_extractor_each_utterance_alone_even_one_too_short_for_a_frame(variant, reference):
    """An utterance of 8 samples (the first conv's kernel is 10) has no frame: its row is all padding (zero)."""
    extractor = tiny_model(variant).feature_extractor
    wav, _ = batch("padded")
    lengths = torch.tensor([2000, 1400, 8])
    frames = extractor.output_lengths(lengths)
    assert frames.tolist() == [99, 69, 0]  # (L - 10) // 5 + 1, then (L - 3) // 2 + 1, then (L - 2) // 2 + 1
    outs = {}
    for ref in (True, False):
        reference(ref)
        outs[ref] = extractor(wav, lengths)
    assert outs[True].shape == outs[False].shape == (3, 99, 20)
    for b, n in enumerate(frames.tolist()[:2]):
        assert_near(outs[False][b, :n], outs[True][b, :n], f"utterance {b}")
    assert torch.all(outs[False][1, 69:] == 0) and torch.all(outs[False][2] == 0)


def test_padded_frames_are_certain_blanks_and_valid_frames_match_unpadded(reference):
    model = tiny_model("large").eval()  # a group norm (base) reads the padding, as in fairseq and HF
    wav, lengths = batch("padded")
    for ref in (True, False):
        reference(ref)
        with torch.no_grad():
            out, out_lengths = model(wav, lengths)
            alone, _ = model(wav[2:, : lengths[2]])
        n = int(out_lengths[2])
        torch.testing.assert_close(out[2, :n], alone[0], **TOL)
        assert torch.all(out[2, n:, 0] == 0) and torch.all(out[2, n:, 1:] == float("-inf"))


# ----------------------------------------------------------------------------------------------------------------
# The switches


def test_python_switch_turns_every_speed_path_off(monkeypatch):
    calls = []
    for name in ("each_utterance", "conv1d", "strided_conv"):
        real = getattr(fast, name)
        monkeypatch.setattr(fast, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    for cls, name in ((fast.MaskCache, "get"), (fast.ValidFrames, "pack")):
        real = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, *a, _real=real, _name=name: calls.append(_name) or
                            _real(self, *a))
    model = tiny_model("large").route(RouteConfig(prune_rate=0.8, trainable_pos=True)).train()
    wav, lengths = batch("padded")
    try:
        fast.set_enabled(False)
        assert not fast.enabled()
        model(wav, lengths)[0].sum().backward()
        assert calls == []
        fast.set_enabled(True)
        model(wav, lengths)[0].sum().backward()
        assert {"each_utterance", "conv1d", "strided_conv", "get", "pack"} <= set(calls)
    finally:
        fast.set_enabled(None)


SUBPROCESS = """
import torch
from s3r import fast
from s3r.model import RouteConfig, Wav2Vec2Config, Wav2Vec2ForCTC
def refuse(*args):
    raise SystemExit("a speed path ran")
fast.each_utterance = fast.conv1d = fast.ValidFrames.pack = fast.MaskCache.get = refuse
cfg = Wav2Vec2Config(conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2), hidden_size=16, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=20, conv_pos_kernel=4, conv_pos_groups=2, vocab_size=5)
model = Wav2Vec2ForCTC(cfg).route(RouteConfig(prune_rate=0.5))
model(torch.randn(2, 800), torch.tensor([800, 500]))[0].sum().backward()
print("enabled", fast.enabled())
"""


@pytest.mark.parametrize("value, on", [("1", False), ("0", True), (None, True)])
def test_environment_switch(value, on):
    env = {k: v for k, v in os.environ.items() if k != "S3R_REFERENCE"}
    if value is not None:
        env["S3R_REFERENCE"] = value
    proc = subprocess.run([sys.executable, "-c", SUBPROCESS], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    if on:  # the speed paths ran (and were refused)
        assert proc.returncode != 0 and "a speed path ran" in proc.stderr, proc.stderr[-2000:]
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == "enabled False"


# ----------------------------------------------------------------------------------------------------------------
# Mask cache


class _CountSelections:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = fast.kth_largest

        def counting(*args):
            self.calls += 1
            return real(*args)

        monkeypatch.setattr(fast, "kth_largest", counting)


@pytest.mark.parametrize("opt, refresh", [("foreach", False), ("for-loop", False), ("fused", True)])
def test_mask_cache_selects_once_per_optimizer_step(monkeypatch, opt, refresh):
    """Ordinary optimizers bump the scores' version counter; a fused one needs model.refresh_masks()."""
    model = tiny_model("base").route(RouteConfig(prune_rate=0.7, fix_attn=False))
    routed = list(model.routed().values())
    kw = {"foreach": dict(foreach=True), "for-loop": dict(foreach=False), "fused": dict(fused=True)}[opt]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05, **kw)
    counter = _CountSelections(monkeypatch)
    wav, lengths = batch("padded")
    model.train()
    for _ in range(3):
        before = counter.calls
        for _ in range(2):  # gradient accumulation: two forwards and backwards, one selection per layer
            model(wav, lengths)[0].clamp(min=-1e4).pow(2).mean().backward()
        with torch.no_grad():
            model(wav, lengths)
        assert counter.calls - before == len(routed)
        for m in routed:  # the cached mask is the fresh top-k of the current scores
            assert m.mask() is m.mask()
            assert torch.equal(m.mask(), topk_mask(m.scores.abs(), kept_count(m.scores.numel(), 0.7)))
        optimizer.step()
        optimizer.zero_grad()
        if refresh:
            model.refresh_masks()


def test_mask_cache_follows_load_state_dict_and_prune_rate():
    layer = tiny_model("base").encoder.layers[0].feed_forward.output_dense
    layer.add_scores(0.5)
    first = layer.mask()
    layer.load_state_dict({**layer.state_dict(), "scores": -torch.arange(float(layer.weight.numel())).view_as(first)})
    assert not torch.equal(layer.mask(), first)
    assert torch.equal(layer.mask(), topk_mask(layer.scores.abs(), kept_count(first.numel(), 0.5)))
    layer.prune_rate = 0.25
    assert int(layer.mask().sum()) == kept_count(first.numel(), 0.25)


def test_kth_largest_with_and_without_hint():
    g = torch.Generator().manual_seed(8)
    a = torch.rand(10_000, generator=g)
    for k in (1, 17, 5000, 9999, 10_000):
        exact = a.kthvalue(a.numel() - k + 1).values.item()
        assert fast.kth_largest(a, k, None, 0.0) == exact
        for hint, band in ((exact, 1e-3), (exact + 0.01, 0.02), (exact - 0.01, 0.005), (0.5, 1e-9), (2.0, 0.1),
                           (-1.0, 0.5)):
            assert fast.kth_largest(a, k, hint, band) == exact, (k, hint, band)


@pytest.mark.parametrize("lr", [1e-4, 3e-3, 0.5])
def test_hinted_selection_matches_reference_over_adam_steps(lr):
    layer = tiny_model("base").encoder.layers[0].feed_forward.intermediate_dense
    layer.add_scores(0.9, "weight_rank")
    opt = torch.optim.Adam([layer.scores], lr=lr)
    x = torch.randn(16, layer.in_features)
    for i in range(8):
        assert torch.equal(layer.mask(), topk_mask(layer.scores.abs(), kept_count(layer.scores.numel(), 0.9))), i
        layer(x).sin().sum().backward()
        opt.step()
        opt.zero_grad()
    assert layer._mask_cache.threshold is not None and layer._mask_cache.band > 0  # the hint was in play


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.63, 0.9])
def test_cache_breaks_ties_by_position_like_the_reference(rate):
    layer = tiny_model("base").encoder.layers[0].feed_forward.output_dense
    with torch.no_grad():
        layer.weight.copy_(torch.randint(-1, 2, layer.weight.shape).float())  # -1, 0, 1: almost every score ties
    for init in ("weight_magnitude", "weight_magnitude_with_scale", "weight_rank"):
        layer.add_scores(rate, init)
        assert torch.equal(layer.mask(), topk_mask(layer.scores.abs(), kept_count(layer.weight.numel(), rate))), init


# ----------------------------------------------------------------------------------------------------------------
# The kernels one by one


@pytest.mark.parametrize("shape", [(2, 32, 37, 16, 4, 8, True), (3, 24, 50, 7, 3, 3, False), (1, 16, 5, 8, 2, 4, True)])
def test_grouped_conv_gradients_match_conv1d(shape):
    B, C, T, K, G, P, bias = shape
    torch.manual_seed(0)
    x = torch.randn(B, C, T, requires_grad=True)
    w = torch.randn(C, C // G, K, requires_grad=True)
    b = torch.randn(C, requires_grad=True) if bias else None
    inputs = [x, w] + ([b] if bias else [])
    ref = F.conv1d(x, w, b, padding=P, groups=G)
    out = fast.GroupedConv1d.apply(x, w, b, P, G)
    assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    for mine, theirs in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g), strict=True):
        torch.testing.assert_close(mine, theirs, **TOL)


@pytest.mark.parametrize("kernel, stride, c_in, bias", [(10, 5, 1, False), (3, 2, 6, True), (2, 2, 5, False),
                                                        (4, 3, 3, True)])
def test_strided_conv_matches_conv1d(kernel, stride, c_in, bias):
    torch.manual_seed(0)
    x = torch.randn(2, 41, c_in, requires_grad=True)  # (B, S, C_in), channels last
    w = torch.randn(7, c_in, kernel, requires_grad=True)
    b = torch.randn(7) if bias else None
    out = fast.strided_conv(x, w, b, stride)
    ref = F.conv1d(x.transpose(1, 2), w, b, stride=stride).transpose(1, 2)
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn_like(ref)
    for mine, theirs in zip(torch.autograd.grad(out, (x, w), g), torch.autograd.grad(ref, (x, w), g), strict=True):
        torch.testing.assert_close(mine, theirs, **TOL)
