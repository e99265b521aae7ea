"""Routes as files, bundles, OMP and mask similarity (s3r/masks.py) on a tiny model trained a few steps here."""
import json
import math
import sys

import numpy as np
import pytest
import torch

from s3r import Wav2Vec2Config, Wav2Vec2ForCTC, load_pretrained, topk_mask
from s3r.checkpoint import s3r_checkpoint, save_atomic
from s3r.masks import (BIT_ORDER, RouteError, apply_route, compare, load_bundle, make_bundle, masks_of, omp,
                       pack_bits, pearson, route_from_model, similarity, spearman, storage, unpack_bits)
from s3r.text import Vocabulary

# Sizes not divisible by 8 (10x10, 13x10, 10x13), so every layer's last byte is padded.
TINY = dict(conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2), hidden_size=10, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=13, conv_pos_kernel=4, conv_pos_groups=2, layerdrop=0.0)
VOCAB = Vocabulary(["<s>", "<pad>", "</s>", "<unk>", "|", "a", "b"])


def train_route(pretrained, seed, prune_rate, steps=4, **route_options):
    """A routed model trained a few steps on random CTC targets, so its scores are not the initial ones."""
    torch.manual_seed(seed)
    model = load_pretrained(pretrained, prune_rate=prune_rate, vocab_size=len(VOCAB), **route_options).train()
    model.vocab = VOCAB
    params = [p for p in model.parameters() if p.requires_grad]
    wav, targets = torch.randn(2, 1600), torch.randint(4, len(VOCAB), (2, 5))
    for _ in range(steps):
        logits, lengths = model(wav)
        loss = torch.nn.functional.ctc_loss(logits.log_softmax(-1).transpose(0, 1), targets, lengths,
                                            torch.full((2,), 5), zero_infinity=True)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():  # sign descent, Adam's first step; torch.optim would import torch._dynamo (~8 s)
            for p, g in zip(params, grads):
                p.sub_(0.05 * g.sign())
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """pretrained.pt (a headless backbone), two mask-mode checkpoints trained on it, and their routes."""
    d = tmp_path_factory.mktemp("routes")
    torch.manual_seed(0)
    save_atomic(s3r_checkpoint(Wav2Vec2ForCTC(Wav2Vec2Config(**TINY))), d / "pretrained.pt")
    a = train_route(d / "pretrained.pt", seed=1, prune_rate=0.7)
    b = train_route(d / "pretrained.pt", seed=2, prune_rate=0.5, trainable_layer_norm=True)
    for name, model in (("a", a), ("b", b)):
        save_atomic(s3r_checkpoint(model, pretrained=str(d / "pretrained.pt")), d / f"{name}.pt")
        save_atomic(route_from_model(model, str(d / f"{name}.pt")), d / f"{name}.route")
    return d


def outputs(model, seed=5):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(torch.randn(2, 1600))[0]


@pytest.mark.parametrize("n", [1, 5, 8, 13, 64, 130])
def test_pack_bits_is_numpy_packbits(n):
    mask = torch.rand(n) > 0.4
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy(), bitorder="big"))
    assert torch.equal(unpack_bits(packed, (n,)), mask)
    m2 = torch.rand(3, n) > 0.5
    assert torch.equal(unpack_bits(pack_bits(m2), (3, n)), m2)
    assert "MSB" in BIT_ORDER


def test_unpack_refuses_wrong_size():
    with pytest.raises(RouteError):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), (10, 10))


def test_route_round_trip_equals_trained_model(files):
    trained = load_pretrained(files / "a.pt")
    routed = load_pretrained(files / "pretrained.pt", masks=files / "a.route")
    assert torch.equal(outputs(routed), outputs(trained))
    for name, mask in trained.masks().items():
        assert torch.equal(routed.masks()[name], mask)
    assert routed.vocab == VOCAB and routed.config.vocab_size == len(VOCAB)
    scores = trained.get_submodule("encoder.layers.0.attention.q_proj").scores
    assert not torch.equal(scores.abs().argsort(), trained.get_submodule(
        "encoder.layers.0.attention.q_proj").weight.abs().argsort())  # trained, not a plain init


def test_route_file_is_weights_only_and_small(files):
    route = torch.load(files / "a.route", weights_only=True)
    routed = sum(math.prod(e["shape"]) for e in route["layers"].values())
    bits = sum(e["bits"].numel() for e in route["layers"].values())
    assert bits == sum((math.prod(e["shape"]) + 7) // 8 for e in route["layers"].values())
    assert routed == 2 * (4 * 10 * 10 + 2 * 10 * 13)
    assert set(route["tensors"]) == {"lm_head.weight", "lm_head.bias"}  # only the head trained


def test_route_refused_for_other_weights(files, tmp_path):
    torch.manual_seed(99)
    save_atomic(s3r_checkpoint(Wav2Vec2ForCTC(Wav2Vec2Config(**TINY))), tmp_path / "other.pt")
    with pytest.raises(RouteError, match=r"a\.route was learned on weights \w+, but .*other\.pt has weights"):
        load_pretrained(tmp_path / "other.pt", masks=files / "a.route")


def test_bundle_switching_gives_each_routes_outputs(files, tmp_path):
    bundle_file = tmp_path / "ab.bundle"
    save_atomic(make_bundle(files / "pretrained.pt", {"a": files / "a.route", "b": files / "b.route"}), bundle_file)
    bundle = load_bundle(bundle_file)
    assert bundle.names == ["a", "b"]
    want = {n: outputs(load_pretrained(files / f"{n}.pt")) for n in "ab"}
    weights = bundle.model.encoder.layers[0].attention.q_proj.weight
    for name in ["a", "b", "a", "b"]:  # b unfreezes layer norms: switching back to a must restore the shared ones
        assert torch.equal(outputs(bundle.use(name)), want[name])
    assert bundle.model.encoder.layers[0].attention.q_proj.weight is weights  # no reload
    with pytest.raises(RouteError, match="no route 'c'"):
        bundle.use("c")


def test_similarity_on_hand_made_masks():
    a = torch.zeros(1000, dtype=torch.bool)
    a[:300] = True
    b = ~a
    s = similarity(a, a)
    assert s["cosine"] == 1.0 and s["iou"] == 1.0 and s["pruned_cosine"] == 1.0
    assert similarity(a, b)["cosine"] == 0.0 and similarity(a, b)["iou"] == 0.0
    assert s["cosine_random"] == pytest.approx(0.3)  # sqrt(d * d)
    torch.manual_seed(0)
    d = 0.6
    x, y = topk_mask(torch.rand(200_000), 120_000), topk_mask(torch.rand(200_000), 120_000)
    r = similarity(x, y)
    assert r["cosine"] == pytest.approx(d, abs=0.005) and r["cosine_random"] == pytest.approx(d)
    assert r["iou"] == pytest.approx(d * d / (2 * d - d * d), abs=0.005)
    assert r["pruned_cosine"] == pytest.approx(1 - d, abs=0.005)
    both = compare({"l1": x, "l2": a}, {"l1": y, "l2": a, "l3": a})
    assert both["only_in_b"] == ["l3"] and both["layers"]["l2"]["cosine"] == 1.0
    assert 0 < both["overall"]["cosine_random"] < 1


def test_correlations():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert pearson(x, [2 * v + 1 for v in x]) == pytest.approx(1.0)
    assert spearman(x, [v ** 3 for v in x]) == pytest.approx(1.0)
    assert spearman(x, [5.0, 4.0, 4.0, 2.0, 1.0]) == pytest.approx(-0.9746794, abs=1e-6)  # scipy.stats.spearmanr
    assert pearson([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == pytest.approx(0.5)


def test_omp_mask_is_magnitude_topk(files):
    model = omp(load_pretrained(files / "pretrained.pt"), prune_rate=0.3)
    for name, mask in model.masks().items():
        w = model.get_submodule(name.removesuffix(".weight")).weight
        assert torch.equal(mask, topk_mask(w.abs(), round(0.3 * w.numel())))
    assert len(model.masks()) == 12  # attention and FFN of both layers


def test_storage_arithmetic():
    s = storage(Wav2Vec2Config.preset("xlsr"), [{"routed": 24 * 2 * 1024 * 4096, "vocab_size": 50, "extra": 0}] * 11)
    assert 300e6 < s["backbone_params"] < 320e6
    assert -92 < s["fp32"]["change_percent"] < -85 and s["fp16"]["change_percent"] > s["fp32"]["change_percent"]


def cli(*args):
    """Run `python -m s3r.masks ARGS` in this process: (exit code, stdout, stderr)."""
    from s3r import masks
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            masks.main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_cli_commands(files, tmp_path):
    code, out, err = cli("bundle", tmp_path / "x.bundle", "--pretrained", files / "pretrained.pt",
                         f"A={files / 'a.route'}", files / "b.route")
    assert code == 0, err
    code, out, err = cli("info", tmp_path / "x.bundle")
    assert code == 0 and "route A" in out and "-88.5%" in out and "fp16" in out, err
    code, out, err = cli("omp", files / "a.pt", tmp_path / "c.route", "--prune-rate", "0.3", "--route")
    assert code == 0, err
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"names": ["a", "b", "c"], "matrix": [[1, 0.2, 0.5], [0.2, 1, 0.9], [0.5, 0.9, 1]]}))
    code, out, err = cli("similarity", files / "a.route", files / "b.pt", tmp_path / "c.route", "--json",
                         tmp_path / "sim.json", "--plot", tmp_path / "sim.png", "--reference", ref)
    assert code == 0, err
    sim = json.loads((tmp_path / "sim.json").read_text())
    assert len(sim["pairs"]) == 3 and "pearson" in sim["reference"]["cosine"]
    assert (tmp_path / "sim.png").stat().st_size > 1000
    code, out, err = cli("omp", files / "a.pt", tmp_path / "omp.pt", "--prune-rate", "0.3")
    assert code == 0, err
    code, out, err = cli("sparsity", tmp_path / "omp.pt")
    assert code == 0 and out.splitlines()[-1].split()[-1] == "0.7000", out
    for args in (["info", files / "a.pt"], ["export", files / "pretrained.pt", tmp_path / "x"],
                 ["similarity", files / "a.route", "--json", tmp_path / "s.json"],
                 ["info", tmp_path / "missing.route"],
                 ["similarity", files / "a.route", files / "b.route", "--json", tmp_path / "s.json", "--reference", ref]):
        code, out, err = cli(*args)
        assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, (args, err)


@pytest.mark.slow  # a fresh interpreter imports torch: seconds on a shared machine
def test_cli_subprocess(files, tmp_path, run_cli):
    r = run_cli("-m", "s3r.masks", "export", str(files / "b.pt"), str(tmp_path / "b.route"))
    assert r.returncode == 0 and "bits per routed weight" in r.stdout, r.stderr
    r = run_cli("-m", "s3r.masks", "export", str(files / "pretrained.pt"), str(tmp_path / "x.route"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, r.stderr


def test_plot_without_matplotlib(files, tmp_path, monkeypatch, capsys):
    from s3r import masks
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as e:
        masks.main(["similarity", str(files / "a.route"), str(files / "b.route"), "--json", str(tmp_path / "s.json"),
                    "--plot", str(tmp_path / "s.png")])
    assert e.value.code == 2 and "needs matplotlib" in capsys.readouterr().err


def test_masks_of_dense_checkpoint_counts_zeros(files, tmp_path):
    model = load_pretrained(files / "a.pt")
    want = model.masks()
    save_atomic(s3r_checkpoint(model.fold_masks()), tmp_path / "dense.pt")
    got = masks_of(tmp_path / "dense.pt")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(m, masks_of(files / "a.route")[k]) for k, m in want.items())
