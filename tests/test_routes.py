"""Routes as files, bundles, OMP and storage arithmetic (s3r/routes.py, s3r/route_format.py) on a tiny model
trained a few steps here (the `route_files` fixture in conftest.py)."""
import contextlib
import io
import math

import numpy as np
import pytest
import torch

from s3r import Wav2Vec2Config, Wav2Vec2ForCTC, load_pretrained, topk_mask
from s3r.checkpoint import CheckpointError, architecture, s3r_checkpoint, save_atomic
from s3r.compact import fold_masks
from s3r.routes import (
    BIT_ORDER,
    RouteError,
    apply_route,
    load_bundle,
    load_route,
    make_bundle,
    masks_of,
    omp,
    pack_bits,
    paper_storage,
    route_summary,
    storage,
    unpack_bits,
)


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


def test_pack_bits_by_hand():
    """Weight 0 is the most significant bit of byte 0; the last byte is padded with zeros."""
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
    assert pack_bits(mask).tolist() == [0b10000001, 0b11000000]


def test_unpack_refuses_wrong_size():
    with pytest.raises(RouteError):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), (10, 10))


def test_route_round_trip_equals_trained_model(route_files, tiny_vocab):
    trained = load_pretrained(route_files / "a.pt")
    routed = load_pretrained(route_files / "pretrained.pt", route=route_files / "a.route")
    assert torch.equal(outputs(routed), outputs(trained))
    for name, mask in trained.masks().items():
        assert torch.equal(routed.masks()[name], mask)
    assert routed.vocab == tiny_vocab and routed.config.vocab_size == len(tiny_vocab)
    q = trained.get_submodule("encoder.layers.0.attention.q_proj")
    assert not torch.equal(q.scores.abs().argsort(), q.weight.abs().argsort())  # trained, not a plain init


def test_apply_route_replaces_an_earlier_route(route_files):
    """b's route on a model carrying a's leaves exactly b's masks and head."""
    model = load_pretrained(route_files / "pretrained.pt", route=route_files / "a.route")
    apply_route(model, route_files / "b.route")
    want = load_pretrained(route_files / "b.pt")
    assert all(torch.equal(model.masks()[k], m) for k, m in want.masks().items())
    assert torch.equal(model.lm_head.weight, want.lm_head.weight)


def test_route_file_is_weights_only_and_small(route_files):
    route = torch.load(route_files / "a.route", weights_only=True)
    routed = sum(math.prod(e["shape"]) for e in route["layers"].values())
    bits = sum(e["bits"].numel() for e in route["layers"].values())
    assert bits == sum((math.prod(e["shape"]) + 7) // 8 for e in route["layers"].values())
    assert routed == 2 * (4 * 10 * 10 + 2 * 10 * 13)  # q/k/v/out 10x10 and fc1/fc2 13x10 in each of 2 layers
    assert set(route["tensors"]) == {"lm_head.weight", "lm_head.bias"}  # only the head trained
    assert route_summary(route) == {"routed": routed, "kind": "ctc", "vocab_size": 7, "labels": 0,
                                    "head": 7 * (10 + 1), "extra": 0}


def test_route_refused_for_other_weights(route_files, tmp_path, tiny_arch):
    torch.manual_seed(99)
    save_atomic(s3r_checkpoint(Wav2Vec2ForCTC(Wav2Vec2Config(**tiny_arch))), tmp_path / "other.pt")
    with pytest.raises(RouteError, match=r"a\.route was learned on weights \w+, but .*other\.pt has weights"):
        load_pretrained(tmp_path / "other.pt", route=route_files / "a.route")


def test_bundle_switching_gives_each_routes_outputs(route_files, tmp_path):
    bundle_file = tmp_path / "ab.bundle"
    routes = {"a": route_files / "a.route", "b": route_files / "b.route"}
    save_atomic(make_bundle(route_files / "pretrained.pt", routes), bundle_file)
    bundle = load_bundle(bundle_file)
    assert bundle.names == ["a", "b"]
    want = {n: outputs(load_pretrained(route_files / f"{n}.pt")) for n in "ab"}
    weights = bundle.model.encoder.layers[0].attention.q_proj.weight
    for name in ["a", "b", "a", "b"]:  # b unfreezes layer norms: switching back to a must restore the shared ones
        assert torch.equal(outputs(bundle.use(name)), want[name])
    assert bundle.model.encoder.layers[0].attention.q_proj.weight is weights  # no reload
    with pytest.raises(RouteError, match="no route 'c'"):
        bundle.use("c")


def test_omp_mask_is_magnitude_topk(route_files):
    model = omp(load_pretrained(route_files / "pretrained.pt"), prune_rate=0.3)
    for name, mask in model.masks().items():
        w = model.get_submodule(name.removesuffix(".weight")).weight
        # 10x10 and 13x10 at 0.3: upstream's n - int(0.7 n) and round(0.3 n) agree (30, 39)
        assert torch.equal(mask, topk_mask(w.abs(), {100: 30, 130: 39}[w.numel()]))
    assert len(model.masks()) == 12  # attention and FFN of both layers


def test_masks_of_dense_checkpoint_counts_zeros(route_files, tmp_path):
    model = load_pretrained(route_files / "a.pt")
    want = model.masks()
    save_atomic(s3r_checkpoint(fold_masks(model)), tmp_path / "dense.pt")
    got = masks_of(tmp_path / "dense.pt")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(m, masks_of(route_files / "a.route")[k]) for k, m in want.items())


def test_storage_arithmetic():
    s = storage(architecture("xlsr"), [{"routed": 24 * 2 * 1024 * 4096, "vocab_size": 50, "extra": 0}] * 11)
    assert 300e6 < s["backbone_params"] < 320e6
    assert -92 < s["fp32"]["change_percent"] < -85 and s["fp16"]["change_percent"] > s["fp32"]["change_percent"]
    assert set(paper_storage()) == {"fix_attn", "attention+ffn"}


def test_storage_by_hand(tiny_arch):
    """Two routes of 1,000 routed weights (125 B of bits each) and a 7-output head on the tiny model, fp32."""
    config = Wav2Vec2Config(**tiny_arch)
    backbone = sum(p.numel() for p in Wav2Vec2ForCTC(config).parameters())
    s = storage(config, [{"routed": 1000, "vocab_size": 7, "extra": 3}] * 2)
    head = 11 * 7  # (hidden 10 + bias) * 7 outputs
    assert s["backbone_params"] == backbone
    assert s["fp32"]["dense_models_bytes"] == 2 * (backbone + head) * 4
    assert s["fp32"]["shared_plus_routes_bytes"] == backbone * 4 + 2 * (125 + (head + 3) * 4)


# ----------------------------------------------------------------------------------------------------------------
# Files that are not routes or bundles: one line naming the file


def test_checkpoint_given_as_route(route_files):
    with pytest.raises(RouteError, match=r"a\.pt is not an s3r route file \(it holds an s3r checkpoint\)"):
        load_route(route_files / "a.pt")
    with pytest.raises(RouteError, match=r"a\.pt is not an s3r route file"):
        load_pretrained(route_files / "pretrained.pt", route=route_files / "a.pt")


def test_route_given_as_checkpoint(route_files):
    with pytest.raises(CheckpointError, match=r"a\.route is a route, not a checkpoint"):
        load_pretrained(route_files / "a.route")


def test_route_without_its_layers(route_files, tmp_path):
    route = torch.load(route_files / "a.route", weights_only=True)
    del route["layers"]
    save_atomic(route, tmp_path / "cut.route")
    with pytest.raises(RouteError, match=r"cut\.route: route file without layers"):
        load_pretrained(route_files / "pretrained.pt", route=tmp_path / "cut.route")


@pytest.mark.parametrize("content", [b"", b"hello, I am a text file\n", b"\x00\x01\x02\x03binary"],
                         ids=["empty", "text", "binary"])
def test_unreadable_route_and_bundle_files(route_files, tmp_path, content):
    (tmp_path / "x.route").write_bytes(content)
    for call in (lambda: load_route(tmp_path / "x.route"), lambda: load_bundle(tmp_path / "x.route")):
        with pytest.raises(CheckpointError) as e:
            call()
        assert str(e.value).startswith(f"cannot read {tmp_path / 'x.route'}: ") and "\n" not in str(e.value)


def test_route_given_as_bundle(route_files):
    with pytest.raises(RouteError, match=r"a\.route is not an s3r route bundle \(it holds a route\)"):
        load_bundle(route_files / "a.route")


def test_truncated_route(route_files, tmp_path):
    data = (route_files / "a.route").read_bytes()
    (tmp_path / "cut.route").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"cut\.route: truncated or corrupt \({len(data) // 2:,} bytes\)"):
        load_route(tmp_path / "cut.route")


# ----------------------------------------------------------------------------------------------------------------
# Command line


def cli(*args):
    """Run `python -m s3r.routes ARGS` in this process: (exit code, stdout, stderr)."""
    from s3r import routes

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            routes.main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_cli_commands(route_files, tmp_path):
    code, out, err = cli("bundle", tmp_path / "x.bundle", "--pretrained", route_files / "pretrained.pt",
                         f"A={route_files / 'a.route'}", route_files / "b.route")
    assert code == 0, err
    code, out, err = cli("info", tmp_path / "x.bundle")
    assert code == 0 and "route A" in out and "-88.5%" in out and "fp16" in out, err
    code, out, err = cli("omp", route_files / "a.pt", tmp_path / "c.route", "--prune-rate", "0.3", "--route")
    assert code == 0, err
    assert load_route(tmp_path / "c.route")["route"]["prune_rate"] == 0.3
    code, out, err = cli("omp", route_files / "a.pt", tmp_path / "omp.pt", "--prune-rate", "0.3")
    assert code == 0, err
    dense = load_pretrained(tmp_path / "omp.pt")
    q = dense.encoder.layers[0].attention.q_proj.weight
    assert dense.route_config is None and int((q != 0).sum()) == 30


@pytest.mark.parametrize("args", [["info", "{d}/a.pt"], ["export", "{d}/pretrained.pt", "{t}/x"],
                                  ["info", "{t}/missing.route"], ["omp", "{d}/a.pt", "{t}/o.pt", "--prune-rate", "2"],
                                  ["bundle", "{t}/b", "--pretrained", "{d}/a.route", "{d}/a.route"]],
                         ids=["info-checkpoint", "export-dense", "info-missing", "omp-rate", "bundle-pretrained"])
def test_cli_errors_are_one_line(route_files, tmp_path, args):
    code, out, err = cli(*(a.format(d=route_files, t=tmp_path) for a in args))
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, (args, err)


@pytest.mark.slow  # a fresh interpreter imports torch: seconds on a shared machine
def test_cli_subprocess(route_files, tmp_path, run_cli):
    r = run_cli("-m", "s3r.routes", "export", str(route_files / "b.pt"), str(tmp_path / "b.route"))
    assert r.returncode == 0 and "bits per routed weight" in r.stdout, r.stderr
    r = run_cli("-m", "s3r.routes", "export", str(route_files / "pretrained.pt"), str(tmp_path / "x.route"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, r.stderr
