"""s3r/model.py: S3-Router's score-masked layers and the routed model (peer parity lives in test_checkpoint.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

import s3r.model as model_module
from s3r import MaskedConv1d, MaskedLinear, RouteConfig, Wav2Vec2Config, Wav2Vec2ForCTC, topk_mask
from s3r.model import Routable, WeightNormConv1d

torch.set_num_threads(1)


def tiny_config(**overrides) -> Wav2Vec2Config:
    base = dict(conv_dim=(16, 24, 20), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2), hidden_size=32,
                num_hidden_layers=2, num_attention_heads=4, intermediate_size=52, conv_pos_kernel=16, conv_pos_groups=4,
                vocab_size=7, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
    return Wav2Vec2Config(**{**base, **overrides})


def tiny_model(seed=0, **overrides) -> Wav2Vec2ForCTC:
    torch.manual_seed(seed)
    return Wav2Vec2ForCTC(tiny_config(**overrides)).eval()


@pytest.fixture(scope="module")
def wav():
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 2000, generator=g), torch.tensor([2000, 1400])


# ----------------------------------------------------------------------------------------------------------------
# The mask: exactly round(prune_rate * numel) entries with the largest |scores|

RATES = [0.05, 0.3, 0.5, 0.7, 0.9, 0.94, 0.999, 1.0]


def _layers():
    return [MaskedLinear(13, 7), MaskedLinear(33, 64), MaskedLinear(1, 1), MaskedConv1d(5, 3, 7), MaskedConv1d(8, 8, 3, groups=4)]


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("init", ["kaiming_uniform", "weight_rank", "weight_magnitude_with_scale", "weight_magnitude"])
def test_kept_count_is_exact(rate, init):
    torch.manual_seed(0)
    for layer in _layers():
        layer.route(rate, init)
        mask = layer.mask()
        assert mask.dtype == torch.bool and mask.shape == layer.weight.shape
        assert int(mask.sum()) == round(rate * layer.weight.numel()), (type(layer).__name__, tuple(layer.weight.shape))
        # the kept entries are the largest |scores|: nothing dropped is larger than anything kept
        s = layer.scores.detach().abs()
        if 0 < int(mask.sum()) < mask.numel():
            assert s[~mask].max() <= s[mask].min()


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.63, 0.9])
def test_kept_count_with_heavy_ties(rate):
    """Binary `weight_magnitude` scores and weights quantised to 3 values: almost every score ties."""
    torch.manual_seed(1)
    layer = MaskedLinear(31, 17)
    with torch.no_grad():
        layer.weight.copy_(torch.randint(-1, 2, layer.weight.shape).float())  # -1, 0, 1
    for init in ("weight_magnitude", "weight_magnitude_with_scale", "weight_rank"):
        layer.route(rate, init)
        assert int(layer.mask().sum()) == round(rate * layer.weight.numel()), init
    with torch.no_grad():  # all scores equal
        layer.scores.fill_(0.25)
    assert int(layer.mask().sum()) == round(rate * layer.weight.numel())


def test_weight_magnitude_scores_are_binary_topk():
    torch.manual_seed(2)
    layer = MaskedLinear(40, 30)
    layer.route(0.6, "weight_magnitude")
    k = round(0.6 * layer.weight.numel())
    assert torch.equal(layer.scores, topk_mask(layer.weight.abs(), k).float())
    assert torch.equal(layer.mask(), topk_mask(layer.weight.abs(), k))


def test_prune_rate_change_recomputes_mask():
    layer = MaskedLinear(20, 10)
    layer.route(0.9)
    assert int(layer.mask().sum()) == 180
    layer.prune_rate = 0.5
    assert int(layer.mask().sum()) == 100


@pytest.mark.parametrize("density", [0.0, 0.37, 1.0])
def test_fix_mask_is_what_a_fresh_selection_gives(density):
    layer = MaskedConv1d(8, 6, 3)
    mask = torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(0)) < density
    layer.fix_mask(mask)
    assert torch.equal(layer.mask(), mask) and not layer.scores.requires_grad
    layer._mask_key = None  # forget the installed mask: the top-k of the 0/1 scores must select it again
    assert torch.equal(layer.mask(), mask)
    assert torch.equal(layer.routed_weight(), layer.weight * mask)


# ----------------------------------------------------------------------------------------------------------------
# Score initialisations


@pytest.mark.parametrize("layer", [MaskedLinear(48, 24), MaskedConv1d(12, 10, 5)], ids=["linear", "conv"])
@pytest.mark.parametrize("rate", [0.3, 0.9])
def test_weight_rank_first_mask_is_magnitude_topk_at_kaiming_scale(layer, rate):
    torch.manual_seed(3)
    layer.route(rate, "weight_rank")
    w, s = layer.weight.detach(), layer.scores.detach()
    assert torch.equal(layer.mask(), topk_mask(w.abs(), round(rate * w.numel())))
    # ranks follow |W| everywhere, not only at the threshold
    assert torch.equal(s.abs().flatten().argsort(), w.abs().flatten().argsort())
    # scores keep kaiming_uniform(a=sqrt(5)) scale: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    fan_in = w[0].numel()
    bound = 1 / math.sqrt(fan_in)
    assert s.abs().max() <= bound + 1e-7
    assert abs(s.std().item() - bound / math.sqrt(3)) < 0.15 * bound
    assert abs(s.mean().item()) < 0.1 * bound
    assert s.dtype == torch.float32


@pytest.mark.parametrize("scale", [1.0, 0.5, 3.0])
def test_weight_magnitude_with_scale(scale):
    layer = MaskedLinear(16, 9)
    layer.route(0.5, "weight_magnitude_with_scale", scale)
    assert torch.equal(layer.scores, layer.weight.detach() / scale)
    assert torch.equal(layer.mask(), topk_mask(layer.weight.abs(), round(0.5 * layer.weight.numel())))


def test_kaiming_scores_are_random_not_magnitude():
    torch.manual_seed(4)
    layer = MaskedLinear(64, 64)
    layer.route(0.5, "kaiming_uniform")
    agree = (layer.mask() == topk_mask(layer.weight.abs(), 2048)).float().mean().item()
    assert 0.4 < agree < 0.6  # a random mask agrees with magnitude pruning about half the time at density 0.5


def test_unknown_init_score_is_refused():
    with pytest.raises(ValueError, match="init_score"):
        RouteConfig(init_score="magnitude")
    with pytest.raises(ValueError, match="prune_rate"):
        RouteConfig(prune_rate=0.0)


# ----------------------------------------------------------------------------------------------------------------
# Straight-through estimator: dL/ds = dL/dW_eff * W * sign(s); the frozen weights get nothing


def _effective_weight_grad(layer, x, g):
    """dL/dW_eff for L = sum(g * layer_forward(x; W_eff)), taken through the plain functional op."""
    w_eff = (layer.weight.detach() * layer.mask()).requires_grad_()
    if isinstance(layer, torch.nn.Linear):
        y = F.linear(x, w_eff, layer.bias)
    else:
        y = F.conv1d(x, w_eff, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    (y * g).sum().backward()
    return w_eff.grad


@pytest.mark.parametrize("make,x_shape", [(lambda: MaskedLinear(12, 6), (4, 5, 12)),
                                          (lambda: MaskedConv1d(6, 4, 3, padding=1, groups=2), (2, 6, 9))],
                         ids=["linear", "conv"])
def test_ste_gradient_reaches_scores_not_weights(make, x_shape):
    torch.manual_seed(6)
    layer = make()
    layer.route(0.5, "kaiming_uniform")
    with torch.no_grad():
        layer.scores[0].zero_()  # scores at exactly 0 get no gradient (sign(0) = 0): the weight_magnitude trap
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    x = torch.randn(x_shape)
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    expected = _effective_weight_grad(layer, x, g) * layer.weight.detach() * layer.scores.detach().sign()
    assert layer.weight.grad is None and layer.bias.grad is None
    torch.testing.assert_close(layer.scores.grad, expected, rtol=1e-5, atol=1e-6)
    assert torch.all(layer.scores.grad[0] == 0)
    assert (layer.scores.grad[~layer.mask()] != 0).any(), "pruned entries get gradients too (they can come back)"


def test_co_train_weight_gradient_is_masked():
    torch.manual_seed(7)
    layer = MaskedLinear(10, 8)
    layer.route(0.4)
    x = torch.randn(3, 10)
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    torch.testing.assert_close(layer.weight.grad, (g.T @ x) * layer.mask())


def test_model_step_trains_scores_and_head_only(wav):
    model = tiny_model().route(RouteConfig(prune_rate=0.8))
    model.train()
    out, _ = model(*wav)
    out.pow(2).mean().backward()
    for name, p in model.named_parameters():
        trains = name.endswith(".scores") or name.startswith("lm_head.")
        assert p.requires_grad == trains, name
        assert (p.grad is not None) == trains, name


# ----------------------------------------------------------------------------------------------------------------
# Routing the model: which layers, which parameters train


def test_prune_rate_one_equals_dense_exactly(wav):
    dense = tiny_model()
    routed = tiny_model().route(RouteConfig(prune_rate=1.0, route_feature_extractor=True, route_pos_conv=True,
                                            route_feature_projection=True))
    assert all(m.all() for m in routed.masks().values())
    with torch.no_grad():
        ref, ref_lengths = dense(*wav)
        out, out_lengths = routed(*wav)
    assert torch.equal(out, ref) and torch.equal(out_lengths, ref_lengths)
    out_grad, _ = routed(*wav)  # the autograd (straight-through) path too
    assert torch.equal(out_grad.detach(), ref)


def test_default_route_masks_attention_and_ffn_only():
    model = tiny_model().route(RouteConfig(prune_rate=0.9))
    names = set(model.masks())
    expected = {f"encoder.layers.{i}.{p}.weight" for i in range(2) for p in
                ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.out_proj",
                 "feed_forward.intermediate_dense", "feed_forward.output_dense")}
    assert names == expected


def test_fix_attn_routes_only_ffn_and_fix_fc_only_attention():
    model = tiny_model().route(RouteConfig(prune_rate=0.9, fix_attn=True))
    assert set(model.masks()) == {f"encoder.layers.{i}.feed_forward.{d}.weight" for i in range(2)
                                  for d in ("intermediate_dense", "output_dense")}
    for i in range(2):
        attn = model.encoder.layers[i].attention
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
            assert proj.scores is None and not proj.weight.requires_grad
    model = tiny_model().route(RouteConfig(prune_rate=0.9, fix_fc=True))
    assert all(".attention." in n for n in model.masks())


def test_optional_routes():
    model = tiny_model().route(RouteConfig(prune_rate=0.5, route_feature_extractor=True, route_pos_conv=True,
                                           route_feature_projection=True))
    names = set(model.masks())
    assert {"feature_extractor.conv_layers.0.conv.weight", "encoder.pos_conv_embed.conv.weight",
            "feature_projection.projection.weight"} <= names
    pos = model.encoder.pos_conv_embed.conv
    assert int(pos.mask().sum()) == round(0.5 * pos.weight_v.numel())
    d2v = tiny_model(feat_extract_norm="layer", conv_pos_kernel=5, conv_pos_depth=3)
    d2v.route(RouteConfig(prune_rate=0.5, route_pos_conv=True))
    assert {f"encoder.pos_conv_embed.layers.{i}.conv.weight" for i in range(3)} <= set(d2v.masks())


def _trainable(cfg: RouteConfig, **model_kw) -> set[str]:
    model = tiny_model(**model_kw).route(cfg)
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_trainable_parameter_sets_follow_flags():
    model = tiny_model()
    params = {n for n, _ in model.named_parameters()}
    scores = {f"encoder.layers.{i}.{p}.scores" for i in range(2) for p in
              ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.out_proj",
               "feed_forward.intermediate_dense", "feed_forward.output_dense")}
    head = {"lm_head.weight", "lm_head.bias"}
    extractor = {n for n in params if n.startswith("feature_extractor.")}
    assert _trainable(RouteConfig()) == scores | head
    assert _trainable(RouteConfig(trainable_proj=False)) == scores
    assert _trainable(RouteConfig(), mask_time_prob=0.5) == scores | head | {"masked_spec_embed"}
    biases = {n for n in params if n.endswith(".bias") and not n.startswith("feature_extractor.")}
    assert _trainable(RouteConfig(trainable_bias=True)) == scores | head | biases
    norms = {n for n in params if "layer_norm" in n and not n.startswith("feature_extractor.")}
    assert _trainable(RouteConfig(trainable_layer_norm=True)) == scores | head | norms
    pos = {n for n in params if n.startswith("encoder.pos_conv_embed.")}
    assert pos == {"encoder.pos_conv_embed.conv.weight_g", "encoder.pos_conv_embed.conv.weight_v",
                   "encoder.pos_conv_embed.conv.bias"}
    assert _trainable(RouteConfig(trainable_pos=True)) == scores | head | pos
    proj = {"feature_projection.projection.weight", "feature_projection.projection.bias"}
    assert _trainable(RouteConfig(trainable_feature_projection=True)) == scores | head | proj
    everything = (params | scores) - extractor - {"masked_spec_embed"}
    assert _trainable(RouteConfig(co_train=True)) == everything
    assert _trainable(RouteConfig(co_train=True, trainable_proj=False)) == everything - head


def test_set_vocab_size_keeps_head_trainability():
    model = tiny_model().route(RouteConfig(trainable_proj=False))
    model.set_vocab_size(5)
    assert model.lm_head.out_features == 5 and not model.lm_head.weight.requires_grad
    model.set_vocab_size(0)
    assert model.lm_head is None


def test_fold_masks_gives_the_same_dense_model(wav):
    model = tiny_model().route(RouteConfig(prune_rate=0.6, route_pos_conv=True, route_feature_projection=True))
    with torch.no_grad():
        ref, _ = model(*wav)
        masks = model.masks()
        model.fold_masks()
        out, _ = model(*wav)
    assert model.route_config is None and not model.masks()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    fc = model.encoder.layers[0].feed_forward.intermediate_dense
    assert torch.equal(fc.weight != 0, masks["encoder.layers.0.feed_forward.intermediate_dense.weight"])


# ----------------------------------------------------------------------------------------------------------------
# Mask cache and threshold selection


class _CountSelections:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = model_module._kth_largest

        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(model_module, "_kth_largest", counting)


@pytest.mark.parametrize("opt", ["foreach", "for-loop", "fused"])
def test_mask_cache_recomputes_after_optimizer_step_only(monkeypatch, wav, opt):
    model = tiny_model().route(RouteConfig(prune_rate=0.7))
    routed = [m for m in model.modules() if isinstance(m, Routable) and m.scores is not None]
    params = [p for p in model.parameters() if p.requires_grad]
    kw = {"foreach": dict(foreach=True), "for-loop": dict(foreach=False), "fused": dict(fused=True)}[opt]
    optimizer = torch.optim.Adam(params, lr=0.05, **kw)
    counter = _CountSelections(monkeypatch)
    model.train()
    n = len(routed)
    for step in range(3):
        before = counter.calls
        for _ in range(2):  # gradient accumulation: two forwards and backwards, one selection per layer
            out, _ = model(*wav)
            out.pow(2).mean().backward()
        assert counter.calls - before == n, "one selection per layer after each optimizer step"
        masks = [m.mask() for m in routed]
        assert all(m.mask() is mask for m, mask in zip(routed, masks)), "no recomputation without a step"
        for m in routed:  # the cached mask is the fresh top-k of the current (just stepped) scores
            assert torch.equal(m.mask(), topk_mask(m.scores.abs(), round(0.7 * m.scores.numel())))
        with torch.no_grad():
            model.eval()
            model(*wav)
            model.train()
        assert counter.calls - before == n
        optimizer.step()
        optimizer.zero_grad()


def test_mask_cache_follows_load_state_dict():
    layer = MaskedLinear(20, 10)
    layer.route(0.5)
    first = layer.mask()
    layer.load_state_dict({**layer.state_dict(), "scores": -torch.arange(200.0).view(10, 20)})
    assert not torch.equal(layer.mask(), first)
    assert torch.equal(layer.mask().flatten()[100:], torch.ones(100, dtype=torch.bool))


def test_kth_largest_with_and_without_hint():
    g = torch.Generator().manual_seed(8)
    a = torch.rand(10_000, generator=g)
    for k in (1, 17, 5000, 9999, 10_000):
        exact = a.kthvalue(a.numel() - k + 1).values.item()
        assert model_module._kth_largest(a, k, None, 0.0) == exact
        for hint, band in ((exact, 1e-3), (exact + 0.01, 0.02), (exact - 0.01, 0.005), (0.5, 1e-9), (2.0, 0.1), (-1.0, 0.5)):
            assert model_module._kth_largest(a, k, hint, band) == exact, (k, hint, band)


@pytest.mark.parametrize("lr", [1e-4, 3e-3, 0.5])
def test_hinted_selection_matches_fresh_kthvalue_over_adam_steps(lr):
    torch.manual_seed(9)
    layer = MaskedLinear(96, 80)
    layer.route(0.9, "weight_rank")
    opt = torch.optim.Adam([layer.scores], lr=lr)
    k = round(0.9 * layer.scores.numel())
    x = torch.randn(16, 96)
    for step in range(8):
        mask = layer.mask()
        fresh = layer.scores.detach().abs().flatten().kthvalue(layer.scores.numel() - k + 1).values
        assert torch.equal(mask, topk_mask(layer.scores.abs(), k)), step
        assert torch.equal(mask, layer.scores.detach().abs() >= fresh)  # no ties among random fp32 scores
        layer(x).sin().sum().backward()
        opt.step()
        opt.zero_grad()
    assert layer._threshold is not None and layer._band > 0  # the hint was in play


# ----------------------------------------------------------------------------------------------------------------
# Precision


def test_scores_stay_fp32_under_bf16_autocast(wav):
    model = tiny_model().route(RouteConfig(prune_rate=0.8, init_score="weight_rank"))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = model(*wav)
        loss = out.float().pow(2).mean()
    loss.backward()
    torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()
    for name, p in model.named_parameters():
        if name.endswith(".scores"):
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
    for m in model.modules():
        if isinstance(m, Routable) and m.scores is not None:
            assert int(m.mask().sum()) == round(0.8 * m.scores.numel())


def test_route_on_half_precision_weights_keeps_fp32_scores():
    layer = MaskedLinear(8, 4).to(torch.bfloat16)
    layer.route(0.5, "weight_magnitude_with_scale")
    assert layer.scores.dtype == torch.float32
    y = layer(torch.randn(2, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------------
# Shapes and padding


def test_output_lengths_and_padding(wav):
    model = tiny_model(feat_extract_norm="layer", conv_bias=True, layer_norm_first=True)
    x, lengths = wav
    with torch.no_grad():
        out, out_lengths = model(x, lengths)
        assert out.shape[:2] == (2, int(out_lengths.max())) and out.shape[2] == 7
        assert out_lengths.tolist() == [int(model.output_lengths(torch.tensor(n))) for n in lengths.tolist()]
        alone, _ = model(x[1:, : lengths[1]])
    torch.testing.assert_close(out[1, : out_lengths[1]], alone[0], rtol=1e-5, atol=1e-5)


def test_weight_norm_conv_keys():
    conv = WeightNormConv1d(8, 4, 2)
    assert set(conv.state_dict()) == {"weight_g", "weight_v", "bias"}
    torch.testing.assert_close(conv.dense_weight(), conv.weight_v)  # g starts as ||v||


# ----------------------------------------------------------------------------------------------------------------
# Fast paths (bench/speed.py): the same numbers as the plain PyTorch operations they replace


@pytest.mark.parametrize("shape", [(2, 32, 37, 16, 4, 8, True), (3, 24, 50, 7, 3, 3, False), (1, 16, 5, 8, 2, 4, True)])
def test_grouped_conv_gradients_match_conv1d(shape):
    B, C, T, K, G, P, bias = shape
    torch.manual_seed(0)
    x = torch.randn(B, C, T, requires_grad=True)
    w = torch.randn(C, C // G, K, requires_grad=True)
    b = torch.randn(C, requires_grad=True) if bias else None
    inputs = [x, w] + ([b] if bias else [])
    ref = F.conv1d(x, w, b, padding=P, groups=G)
    out = model_module.GroupedConv1d.apply(x, w, b, P, G)
    assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    for mine, theirs in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel, stride, c_in, bias", [(10, 5, 1, False), (3, 2, 6, True), (2, 2, 5, False), (4, 3, 3, True)])
def test_strided_conv_matches_conv1d(kernel, stride, c_in, bias):
    torch.manual_seed(0)
    x = torch.randn(2, 41, c_in, requires_grad=True)  # (B, S, C_in), channels last
    w = torch.randn(7, c_in, kernel, requires_grad=True)
    b = torch.randn(7) if bias else None
    out = model_module.strided_conv(x, w, b, stride)
    ref = F.conv1d(x.transpose(1, 2), w, b, stride=stride).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    for mine, theirs in zip(torch.autograd.grad(out, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_extractor_skips_padding_and_runs_frozen_in_place(wav, norm):
    model = tiny_model(feat_extract_norm=norm, conv_bias=norm == "layer")
    x, lengths = wav
    fe = model.feature_extractor
    with torch.no_grad():
        padded = fe(x, lengths)
        full = fe(x)  # every frame computed, as transformers does
    n = model.output_lengths(lengths)
    for b in range(len(n)):
        torch.testing.assert_close(padded[b, : n[b]], full[b, : n[b]], rtol=1e-5, atol=1e-6)
        assert not padded[b, n[b]:].any()
    with_grad = fe(x, lengths)  # the autograd path (out of place) gives the same numbers
    torch.testing.assert_close(with_grad.detach(), padded, rtol=1e-6, atol=1e-7)


def test_frozen_positional_conv_weight_is_cached_and_follows_updates():
    conv = WeightNormConv1d(8, 4, 2).requires_grad_(False)
    first = conv.dense_weight()
    assert conv.dense_weight() is first
    with torch.no_grad():
        conv.weight_g.mul_(2)
    torch.testing.assert_close(conv.dense_weight(), 2 * first)


@pytest.mark.slow
def test_torch_compile_trains_routed_model_without_recompiling(wav, monkeypatch):
    import torch._dynamo
    torch._dynamo.reset()
    model = tiny_model().route(RouteConfig(prune_rate=0.7)).train()
    compiled = torch.compile(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):  # masks change every step: they must not be guards of the compiled graphs
        if step == 1:
            monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
        out, _ = compiled(*wav)
        out.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", False)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(*wav)[0], model(*wav)[0], rtol=1e-5, atol=1e-5)
