"""Structured routes: route granularities, their gradients and inits, compact models, route files."""
import math

import pytest
import torch
import torch.nn.functional as F

from s3r import ConfigError, MaskedLinear, RouteConfig, Wav2Vec2Config, Wav2Vec2ForCTC, load_pretrained
from s3r.checkpoint import s3r_checkpoint, save_atomic, weights_fingerprint
from s3r.compact import CompactError, compact, is_n_of_m, parameter_counts, to_semi_structured
from s3r.model import kept_count
from s3r.routes import RouteError, apply_route, route_from_model
from s3r.structured import add_group_scores

# hidden 32 = 4 heads of 8; FFN 52 neurons; every routed input size divisible by 4 (for 2:4)
TINY = dict(conv_dim=(16, 24, 20), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2), hidden_size=32,
            num_hidden_layers=2, num_attention_heads=4, intermediate_size=52, conv_pos_kernel=16, conv_pos_groups=4,
            vocab_size=7, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
C, H, D, FFN = 32, 4, 8, 52
STRUCTURED = ["row", "column", "neuron", "head", "neuron+head", "2:4"]


def routed(granularity, prune_rate=0.5, init="kaiming_uniform", seed=0, **config):
    torch.manual_seed(seed)
    model = Wav2Vec2ForCTC(Wav2Vec2Config(**{**TINY, **config})).eval()
    return model.route(RouteConfig(prune_rate=prune_rate, route_granularity=granularity, fix_attn=False,
                                   init_score=init))


def same_masks(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def wav():
    g = torch.Generator().manual_seed(5)
    return torch.randn(3, 2400, generator=g), torch.tensor([2400, 1700, 900])  # padded: frames differ per row


# ----------------------------------------------------------------------------------------------------------------
# Kept counts and what each granularity routes


# (layer suffix -> score shape) for the first transformer layer, written out per granularity
SCORE_SHAPES = {
    "weight": {"q_proj": (C, C), "k_proj": (C, C), "v_proj": (C, C), "out_proj": (C, C),
               "intermediate_dense": (FFN, C), "output_dense": (C, FFN)},
    "row": {"q_proj": (C, 1), "k_proj": (C, 1), "v_proj": (C, 1), "out_proj": (C, 1),  # upstream Linear_ST_OutStr
            "intermediate_dense": (FFN, 1), "output_dense": (C, 1)},
    "column": {"q_proj": (1, C), "k_proj": (1, C), "v_proj": (1, C), "out_proj": (1, C),  # upstream Linear_ST_InStr
               "intermediate_dense": (1, C), "output_dense": (1, FFN)},
    "neuron": {"q_proj": (C, C), "k_proj": (C, C), "v_proj": (C, C), "out_proj": (C, C), "output_dense": (1, FFN)},
    "head": {"out_proj": (1, H, 1), "intermediate_dense": (FFN, C), "output_dense": (C, FFN)},
    "neuron+head": {"out_proj": (1, H, 1), "output_dense": (1, FFN)},
    "2:4": {"q_proj": (C, C), "k_proj": (C, C), "v_proj": (C, C), "out_proj": (C, C),
            "intermediate_dense": (FFN, C), "output_dense": (C, FFN)},
}


@pytest.mark.parametrize("granularity", list(SCORE_SHAPES))
@pytest.mark.parametrize("rate", [0.25, 0.5, 0.7, 0.9])
def test_score_shapes_and_kept_counts(granularity, rate):
    if granularity == "2:4" and rate != 0.5:
        with pytest.raises(ConfigError, match="prune_rate"):
            RouteConfig(prune_rate=rate, route_granularity="2:4")
        return
    model = routed(granularity, rate)
    layer0 = {k.split(".")[-2]: m for k, m in model.masks().items() if k.startswith("encoder.layers.0.")}
    assert {k: tuple(m.shape) for k, m in layer0.items()} == SCORE_SHAPES[granularity]
    for name, module in model.named_modules():
        if getattr(module, "scores", None) is None:
            continue
        mask, s = module.mask(), module.scores.detach().abs()
        if granularity == "2:4":  # exactly 2 of every 4 consecutive inputs, the 2 largest |scores|
            groups, kept = s.view(s.shape[0], -1, 4), mask.view(mask.shape[0], -1, 4)
            assert torch.all(kept.sum(-1) == 2)
            assert torch.all(groups.masked_fill(~kept, -1).amax(-1) >= groups.masked_fill(kept, 2).amin(-1))
        else:  # per tensor: kept_count(groups, rate) groups, the largest |scores|
            assert int(mask.sum()) == kept_count(mask.numel(), rate), name
            if not mask.all():
                assert s[~mask].max() <= s[mask].min()
        # the effective weight zeroes each dropped group's weights: whole rows, columns, or D columns per head
        with torch.no_grad():
            w = module.routed_weight() != 0
        if granularity in ("row", "column") or ".output_dense" in name and "neuron" in granularity:
            assert torch.equal(w, mask.expand_as(w))
        if name.endswith("out_proj") and "head" in granularity:
            assert torch.equal(w, mask.flatten().repeat_interleave(D)[None, :].expand(C, C))


def test_routed_forward_is_the_hand_masked_dense_model(wav):
    """neuron+head: zero the dropped neurons' fc2 columns and heads' out_proj columns in a plain copy by hand."""
    model = routed("neuron+head", 0.5)
    dense = Wav2Vec2ForCTC(model.config).eval()
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith(".scores")})
    with torch.no_grad():
        for a, b in zip(model.encoder.layers, dense.encoder.layers, strict=True):
            neurons = a.feed_forward.output_dense.scores.abs().flatten().topk(26).indices
            heads = a.attention.out_proj.scores.abs().flatten().topk(2).indices
            b.feed_forward.output_dense.weight[:, [i for i in range(FFN) if i not in neurons]] = 0
            b.attention.out_proj.weight[:, [i for i in range(C) if i // D not in heads]] = 0
        torch.testing.assert_close(model(*wav)[0], dense(*wav)[0], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Straight-through gradients: each group's score gets the sum over its weights of dL/dW_eff * W, times sign(s)


@pytest.mark.parametrize("granularity, view, reduce", [
    ("row", None, lambda t: t.sum(1, keepdim=True)),
    ("column", None, lambda t: t.sum(0, keepdim=True)),
    ("column", (12, 4, 4), lambda t: t.view(12, 4, 4).sum((0, 2), keepdim=True)),  # one score per head of 4 inputs
    ("2:4", None, lambda t: t),
])
def test_straight_through_gradient(granularity, view, reduce):
    torch.manual_seed(1)
    layer = MaskedLinear(16, 12)
    add_group_scores(layer, 0.5, "kaiming_uniform", granularity=granularity, view=view)
    x, g = torch.randn(9, 16), torch.randn(9, 12)
    (layer(x) * g).sum().backward()
    dw_eff = g.T @ x  # dL/dW_eff of y = x W_eff^T + b, by hand
    expected = reduce(dw_eff * layer.weight.detach()) * layer.scores.detach().sign()
    torch.testing.assert_close(layer.scores.grad, expected, rtol=1e-5, atol=1e-6)
    dropped = ~layer.mask()
    assert dropped.any() and (layer.scores.grad[dropped] != 0).all(), "dropped groups get gradients: they can return"
    kept = (layer.routed_weight() != 0).detach()  # (random weights are never exactly 0)
    torch.testing.assert_close(layer.weight.grad, dw_eff * kept)  # (co_train) W learns where it is kept


def test_neuron_gradient_is_that_of_the_hidden_unit_gate():
    """A neuron's score gets dL/dm for y = fc2(act(fc1 x) * m): the first-order effect of (re)moving the unit,
    nonzero for dropped neurons (masking fc1's row as well would zero it: act(0) = 0 and fc2's column = 0)."""
    model = routed("neuron", 0.5)
    ffn = model.encoder.layers[0].feed_forward
    x, g = torch.randn(2, 7, C), torch.randn(2, 7, C)
    (ffn(x) * g).sum().backward()
    fc1, fc2 = ffn.intermediate_dense, ffn.output_dense
    m = fc2.mask().flatten().float().requires_grad_()
    y = F.linear(F.gelu(F.linear(x, fc1.weight, fc1.bias)) * m, fc2.weight, fc2.bias)
    (y * g).sum().backward()
    torch.testing.assert_close(fc2.scores.grad.flatten(), m.grad * fc2.scores.detach().flatten().sign(),
                               rtol=1e-5, atol=1e-6)
    assert (fc2.scores.grad.flatten()[~fc2.mask().flatten()] != 0).all()
    assert fc1.scores is None and not fc1.weight.requires_grad


# ----------------------------------------------------------------------------------------------------------------
# Inits over the groups' magnitudes


def group_l1(model, granularity):
    """{layer: L1 norm of each group's weights} of layer 0, by hand (fc1 row + bias + fc2 column for a neuron,
    q/k/v rows + biases + out_proj columns for a head), and the number of weights per group."""
    ffn, attn = model.encoder.layers[0].feed_forward, model.encoder.layers[0].attention
    out = {}
    if "neuron" in granularity:
        fc1, fc2 = ffn.intermediate_dense, ffn.output_dense
        out["output_dense"] = (fc1.weight.abs().sum(1) + fc1.bias.abs() + fc2.weight.abs().sum(0), 2 * C + 1)
    if "head" in granularity:
        per_head = sum((p.weight.abs().sum(1) + p.bias.abs()).view(H, D).sum(1)
                       for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        out["out_proj"] = (per_head + attn.out_proj.weight.abs().view(C, H, D).sum((0, 2)), 3 * D * (C + 1) + C * D)
    if granularity == "row":
        out["intermediate_dense"] = (ffn.intermediate_dense.weight.abs().sum(1), C)
    if granularity == "column":
        out["output_dense"] = (ffn.output_dense.weight.abs().sum(0), FFN)
    return {k: (v.detach(), n) for k, (v, n) in out.items()}


@pytest.mark.parametrize("granularity", ["row", "column", "neuron", "head", "neuron+head"])
def test_weight_rank_first_mask_is_structured_magnitude_pruning(granularity):
    model = routed(granularity, 0.5, init="weight_rank")
    for layer, (l1, _) in group_l1(model, granularity).items():
        module = model.encoder.layers[0].get_submodule(
            {"output_dense": "feed_forward.output_dense", "intermediate_dense": "feed_forward.intermediate_dense",
             "out_proj": "attention.out_proj"}[layer])
        k = kept_count(l1.numel(), 0.5)
        magnitude_pruned = torch.zeros_like(l1, dtype=torch.bool).scatter_(0, l1.topk(k).indices, True)
        assert torch.equal(module.mask().flatten(), magnitude_pruned)
        # the scores keep the per-weight kaiming scale (|s| <= 1/sqrt(fan_in)) so Adam can reorder them
        assert module.scores.abs().max() <= 1 / math.sqrt(module.weight.shape[1])


@pytest.mark.parametrize("granularity", ["neuron", "head"])
def test_weight_magnitude_with_scale_is_the_groups_mean_magnitude(granularity):
    torch.manual_seed(0)
    model = Wav2Vec2ForCTC(Wav2Vec2Config(**TINY)).eval()
    model.route(RouteConfig(prune_rate=0.5, route_granularity=granularity, fix_attn=False,
                            init_score="weight_magnitude_with_scale", score_scale=0.5))
    for layer, (l1, count) in group_l1(model, granularity).items():
        module = model.encoder.layers[0].get_submodule(
            "feed_forward.output_dense" if layer == "output_dense" else "attention.out_proj")
        torch.testing.assert_close(module.scores.flatten(), l1 / count / 0.5)


def test_weight_magnitude_init_is_binary_over_groups():
    model = routed("neuron", 0.5, init="weight_magnitude")
    fc2 = model.encoder.layers[0].feed_forward.output_dense
    l1, _ = group_l1(model, "neuron")["output_dense"]
    assert set(fc2.scores.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(fc2.scores.flatten().bool(), fc2.mask().flatten())
    assert torch.equal(fc2.mask().flatten(), torch.zeros(FFN, dtype=torch.bool).scatter_(0, l1.topk(26).indices, True))


# ----------------------------------------------------------------------------------------------------------------
# Compact models


@pytest.mark.parametrize("granularity", ["neuron", "head", "neuron+head"])
@pytest.mark.parametrize("rate", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("pre_ln", [False, True])
def test_compact_model_gives_the_routed_logits(granularity, rate, pre_ln, wav, tmp_path):
    model = routed(granularity, rate, seed=3, layer_norm_first=pre_ln)
    small = compact(model)
    heads = kept_count(H, rate) if "head" in granularity else H
    width = kept_count(FFN, rate) if "neuron" in granularity else FFN
    assert small.config.num_heads_per_layer == ((heads,) * 2 if "head" in granularity else None)
    assert small.config.intermediate_sizes == ((width,) * 2 if "neuron" in granularity else None)
    counts, full = parameter_counts(small), parameter_counts(model)
    assert counts["ffn"] == 2 * (2 * C * width + width + C)  # per layer: fc1 (F', C) + (F',), fc2 (C, F') + (C,)
    assert counts["attention"] == 2 * (4 * C * heads * D + 3 * heads * D + C)
    assert counts["total"] == full["total"] - (full["ffn"] - counts["ffn"]) - (full["attention"] - counts["attention"])
    with torch.no_grad():
        expected, lengths = model(*wav)
        got, got_lengths = small(*wav)
    assert torch.equal(lengths, got_lengths)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    save_atomic(s3r_checkpoint(small), tmp_path / "small.pt")  # an ordinary s3r checkpoint
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "small.pt").eval()(*wav)[0], expected, rtol=0, atol=1e-5)


def test_compact_leaves_the_routed_model_alone(wav):
    model = routed("neuron", 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compact(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.route_config is not None


def test_compact_refuses_what_it_cannot_shrink():
    with pytest.raises(CompactError, match="not a routed model"):
        compact(Wav2Vec2ForCTC(Wav2Vec2Config(**TINY)))
    with pytest.raises(CompactError, match="--dense"):
        compact(routed("weight", 0.5))


def test_two_four_compacts_to_the_folded_dense_model(wav):
    model = routed("2:4", 0.5)
    small = compact(model)
    assert small.config.intermediate_sizes is None and small.route_config is None
    for layer in small.encoder.layers:
        for lin in (layer.attention.q_proj, layer.attention.out_proj, layer.feed_forward.intermediate_dense,
                    layer.feed_forward.output_dense):
            assert is_n_of_m(lin.weight, 2, 4) and not is_n_of_m(lin.weight, 1, 4)
    assert to_semi_structured(small) == 0  # CPU fp32: no kernels, everything stays dense
    with torch.no_grad():
        torch.testing.assert_close(small(*wav)[0], model(*wav)[0], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Route files: one bit per group


@pytest.mark.parametrize("granularity", ["neuron+head", "row", "2:4"])
def test_route_file_round_trip(granularity, wav, tmp_path):
    torch.manual_seed(0)
    save_atomic(s3r_checkpoint(Wav2Vec2ForCTC(Wav2Vec2Config(**{**TINY, "vocab_size": 0}))), tmp_path / "pre.pt")
    torch.manual_seed(1)
    model = load_pretrained(tmp_path / "pre.pt", prune_rate=0.5, vocab_size=7, route_granularity=granularity,
                            fix_attn=False).eval()
    route = route_from_model(model, "trained")
    groups = {"neuron+head": {"out_proj": H, "output_dense": FFN}, "row": {"q_proj": C, "intermediate_dense": FFN},
              "2:4": {"q_proj": C * C, "output_dense": C * FFN}}[granularity]
    for name, entry in route["layers"].items():
        n = groups.get(name.split(".")[-2])
        if n is not None:
            assert math.prod(entry["shape"]) == n and entry["bits"].numel() == -(-n // 8)  # one bit per group
    save_atomic(route, tmp_path / "r.route")
    again = load_pretrained(tmp_path / "pre.pt", route=tmp_path / "r.route").eval()
    assert again.route_config.route_granularity == granularity
    assert same_masks(model.masks(), again.masks())
    with torch.no_grad():
        torch.testing.assert_close(again(*wav)[0], model(*wav)[0], rtol=0, atol=0)
        if granularity == "neuron+head":  # and a route applied to the shared weights compacts like the trained model
            torch.testing.assert_close(compact(again)(*wav)[0], model(*wav)[0], rtol=0, atol=1e-5)


def test_apply_route_refits_the_group_shape(tmp_path):
    """A structured route applied to a model routed per weight replaces its scores by one frozen bit per group."""
    model = routed("neuron+head", 0.5)
    route = route_from_model(model, "x")
    other = routed("weight", 0.9)
    apply_route(other, route)
    assert tuple(other.encoder.layers[0].attention.out_proj.scores.shape) == (1, H, 1)
    assert other.encoder.layers[0].attention.q_proj.scores is None  # routed before, not by this route: dense again
    assert same_masks(model.masks(), other.masks())


# ----------------------------------------------------------------------------------------------------------------
# Configuration errors


@pytest.mark.parametrize("kwargs, match", [
    (dict(route_granularity="block"), "unknown route_granularity"),
    (dict(route_granularity="3:2", prune_rate=1.0), "n:m"),
    (dict(route_granularity="2:4", prune_rate=0.9), "set prune_rate 0.5"),
    (dict(route_granularity="head", fix_attn=True), "fix_attn"),
    (dict(route_granularity="neuron", fix_fc=True, fix_attn=False), "fix_fc"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RouteConfig(**kwargs)


def test_per_layer_sizes_are_checked():
    with pytest.raises(ConfigError, match="intermediate_sizes"):
        Wav2Vec2Config(**TINY, intermediate_sizes=(3,))
    with pytest.raises(ConfigError, match="num_heads_per_layer"):
        Wav2Vec2Config(**TINY, num_heads_per_layer=(2, 0))
    cfg = Wav2Vec2Config(**TINY, intermediate_sizes=[5, 6], num_heads_per_layer=[1, 3])
    assert Wav2Vec2Config.from_dict(cfg.to_dict()) == cfg and cfg.num_heads_per_layer == (1, 3)


def test_n_of_m_needs_divisible_inputs():
    layer = MaskedLinear(10, 3)
    with pytest.raises(ConfigError, match="groups of 4"):
        add_group_scores(layer, 0.5, granularity="2:4")


def test_route_layer_of_the_wrong_shape_is_refused():
    model = routed("neuron", 0.5)
    route = route_from_model(model, "x")
    entry = route["layers"]["encoder.layers.0.feed_forward.output_dense.weight"]
    entry["view"] = [FFN, C]  # transposed: the neuron bits would land on fc2's rows
    with pytest.raises(RouteError, match="does not fit its weight"):
        apply_route(routed("weight", 0.9), route, fingerprint=weights_fingerprint(model))


@pytest.mark.slow
def test_train_with_neuron_routes_then_export_compact(tiny_corpus, tmp_path):
    """train.py --route-granularity neuron+head, then `python -m s3r.export --compact`: same logits, fewer weights."""
    import train  # the script, as tests/test_train.py runs it
    from s3r.export import main as export_main
    torch.manual_seed(0)
    init = tmp_path / "init.pt"
    save_atomic(s3r_checkpoint(Wav2Vec2ForCTC(Wav2Vec2Config(**{**TINY, "conv_dim": (16,) * 7, "conv_kernel": (
        10, 3, 3, 3, 3, 2, 2), "conv_stride": (5, 2, 2, 2, 2, 2, 2), "vocab_size": 0}))), init)
    root = tiny_corpus("librilight", num=28, voice="tone")  # all six 1h folds
    assert train.main(["--init", str(init), "--data", "train-1h", "--data-root", str(root), "--valid", "",
                       "--save-dir", str(tmp_path / "run"), "--max-tokens", "80000", "--num-workers", "0",
                       "--max-updates", "2", "--update-freq", "1", "--route-granularity", "neuron+head",
                       "--no-fix-attn", "--prune-rate", "0.5"]) == 0
    export_main(["--compact", str(tmp_path / "small.pt"), str(tmp_path / "run" / "checkpoint_last.pt")])
    routed_model = load_pretrained(tmp_path / "run" / "checkpoint_last.pt").eval()
    small = load_pretrained(tmp_path / "small.pt").eval()
    assert small.config.intermediate_sizes == (26, 26) and small.config.num_heads_per_layer == (2, 2)
    assert parameter_counts(small)["total"] < parameter_counts(routed_model)["total"]
    wav, lengths = torch.randn(2, 9000), torch.tensor([9000, 6000])
    with torch.no_grad():
        a, b = routed_model(wav, lengths)[0], small(wav, lengths)[0]
    valid = torch.isfinite(a)  # padded frames are certain blanks (-inf elsewhere) in both
    assert torch.equal(valid, torch.isfinite(b))
    torch.testing.assert_close(b[valid], a[valid], rtol=0, atol=1e-5)


def test_bundle_of_structured_routes_and_storage_of_a_compact_model(tmp_path, wav):
    from s3r.routes import load_bundle, make_bundle, storage
    torch.manual_seed(0)
    save_atomic(s3r_checkpoint(Wav2Vec2ForCTC(Wav2Vec2Config(**{**TINY, "vocab_size": 0}))), tmp_path / "pre.pt")
    trained = {}
    for name, g in (("a", "neuron+head"), ("b", "weight")):
        model = load_pretrained(tmp_path / "pre.pt", prune_rate=0.5, vocab_size=7, route_granularity=g,
                                fix_attn=False).eval()
        save_atomic(route_from_model(model, name), tmp_path / f"{name}.route")
        trained[name] = model
    save_atomic(make_bundle(tmp_path / "pre.pt", {n: tmp_path / f"{n}.route" for n in trained}), tmp_path / "x.bundle")
    bundle = load_bundle(tmp_path / "x.bundle")
    for name in ("a", "b", "a"):  # switching back and forth between a structured and a per-weight route
        with torch.no_grad():
            torch.testing.assert_close(bundle.use(name)(*wav)[0], trained[name](*wav)[0], rtol=0, atol=0)
    # a compact model's parameter count, from per-layer one-layer copies, is its real one
    small = compact(trained["a"])
    one = [{"routed": 0, "vocab_size": 7, "extra": 0}]
    assert storage(small.config, one)["backbone_params"] == parameter_counts(small)["total"] - (C + 1) * 7


@pytest.mark.parametrize("granularity", ["neuron+head", "row", "2:4"])
def test_fast_paths_equal_the_reference(granularity, wav):
    """fast.py (mask cache, packed valid frames) against S3R_REFERENCE: routed and compact, forward and score grads."""
    from s3r import fast
    results = {}
    try:
        for on in (True, False):
            fast.set_enabled(on)
            model = routed(granularity, 0.5, seed=4)
            out = model(*wav)[0]
            valid = torch.isfinite(out)
            out[valid].square().sum().backward()
            with torch.no_grad():
                small = compact(model)(*wav)[0] if granularity != "row" else out
            results[on] = (out.detach(), small, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    finally:
        fast.set_enabled(None)
    (a, sa, ga), (b, sb, gb) = results[True], results[False]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sa, sb, rtol=1e-5, atol=1e-5)
    assert ga.keys() == gb.keys() and any(k.endswith(".scores") for k in ga)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-5)


def test_structured_omp_is_l1_magnitude_pruning_of_whole_neurons(tmp_path, wav):
    """`python -m s3r.routes omp --route-granularity neuron --compact`: the neurons of largest L1 norm, cut out."""
    from s3r.routes import main as routes_main
    torch.manual_seed(0)
    dense = Wav2Vec2ForCTC(Wav2Vec2Config(**TINY)).eval()
    save_atomic(s3r_checkpoint(dense), tmp_path / "ft.pt")
    routes_main(["omp", str(tmp_path / "ft.pt"), str(tmp_path / "omp.pt"), "--prune-rate", "0.25",
                 "--route-granularity", "neuron", "--compact", "--fix-attn"])  # attention stays dense
    small = load_pretrained(tmp_path / "omp.pt").eval()
    expected = dense
    with torch.no_grad():
        for layer in expected.encoder.layers:
            fc1, fc2 = layer.feed_forward.intermediate_dense, layer.feed_forward.output_dense
            l1 = fc1.weight.abs().sum(1) + fc1.bias.abs() + fc2.weight.abs().sum(0)
            fc2.weight[:, l1.argsort(descending=True)[kept_count(FFN, 0.25):]] = 0  # by hand: the rest dropped
    assert small.config.intermediate_sizes == (13, 13)
    with torch.no_grad():
        a, b = small(*wav)[0], expected(*wav)[0]
    valid = torch.isfinite(b)
    torch.testing.assert_close(a[valid], b[valid], rtol=0, atol=1e-5)
