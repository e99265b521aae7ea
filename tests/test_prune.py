"""s3r/prune.py: PARP (masks by |W|, pruned weights still learn, re-pruning) and IMP (geometric schedule, pruning the
finetuned weights, rewinding to the pretrained ones), in-process on the 2-layer, 10-wide model and end to end through
train.py on the tiny fairseq fixture.

The kept counts below are counted by hand from upstream's GetSubnet rule `numel - int((1 - prune_rate) * numel)`.
"""
import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import train
from s3r import RouteConfig, Wav2Vec2Config, Wav2Vec2ForCTC, load_pretrained, prune
from s3r.checkpoint import s3r_checkpoint, save_atomic, torch_load
from s3r.compact import fold_masks
from s3r.data import resolve_corpus
from s3r.errors import S3RError
from s3r.prune import (
    imp_schedule,
    prune_and_rewind,
    reprune,
    reprune_due,
    run_imp,
    start_parp,
)
from s3r.recipe import build_model, parse_config

ATTN_FFN = RouteConfig(fix_attn=False, prune_rate=0.9)
TINY_SIZES = {"q_proj": 100, "k_proj": 100, "v_proj": 100, "out_proj": 100, "intermediate_dense": 130,
              "output_dense": 130}  # 10x10 attention, 13x10 and 10x13 FFN


def tiny_model(tiny_arch, seed=0, **kw) -> Wav2Vec2ForCTC:
    torch.manual_seed(seed)
    return Wav2Vec2ForCTC(Wav2Vec2Config(**{**tiny_arch, "vocab_size": 7, **kw})).eval()


def size_of(name: str) -> int:
    return TINY_SIZES[name.split(".")[-2]]


def nonzeros(model: Wav2Vec2ForCTC) -> dict[str, int]:
    return {f"{n}.weight": int((m.weight != 0).sum()) for n, m in model.routable_layers(ATTN_FFN).items()}


# ----------------------------------------------------------------------------------------------------------------
# PARP


def test_parp_masks_keep_exactly_upstreams_count_of_the_largest_weights(tiny_arch):
    model = start_parp(tiny_model(tiny_arch), ATTN_FFN)
    masks = model.masks()
    assert len(masks) == 12  # q, k, v, out, fc1, fc2 in 2 layers
    # (1 - 0.9) is 0.09999999999999998: upstream keeps 91 of 100 and 118 of 130, not 90 and 117
    assert {k: int(m.sum()) for k, m in masks.items()} == {k: {100: 91, 130: 118}[size_of(k)] for k in masks}
    for name, module in model.routed().items():
        w, mask = module.weight.detach().abs(), masks[f"{name}.weight"]
        assert w[mask].min() > w[~mask].max()  # the kept ones are the largest |W| (MPI)
        assert not module.scores.requires_grad and module.weight.requires_grad
    with torch.no_grad():  # after training moved the weights, re-pruning keeps the same count
        for module in model.routed().values():
            module.weight.mul_(torch.randn_like(module.weight))
    reprune(model)
    assert {k: int(m.sum()) for k, m in model.masks().items()} == {k: int(m.sum()) for k, m in masks.items()}
    for name, module in model.routed().items():
        w, mask = module.weight.detach().abs(), model.masks()[f"{name}.weight"]
        assert w[mask].min() > w[~mask].max()


def test_a_pruned_weight_that_grows_is_back_after_the_next_reprune(tiny_arch):
    model = start_parp(tiny_model(tiny_arch), replace_rate(ATTN_FFN, 0.5))
    fc1 = model.encoder.layers[1].feed_forward.intermediate_dense
    before = fc1.mask().clone()
    grown = int((~before).flatten().nonzero()[3])  # the 4th pruned weight, by position
    w = fc1.weight.detach().flatten()
    kept_abs = w.abs().masked_fill(~before.flatten(), float("inf"))
    weakest = int(kept_abs.argmin())  # the kept weight of smallest |W|: it must make room
    with torch.no_grad():
        fc1.weight.view(-1)[grown] = 2 * w.abs().max()
    assert not fc1.mask().flatten()[grown]  # the mask moves only when re-pruned
    assert reprune(model) == 1  # one weight came back in the whole model
    after = fc1.mask().flatten()
    assert after[grown] and not after[weakest] and int(after.sum()) == 65  # 130 - int(0.5 * 130)
    changed = (after != before.flatten()).nonzero().flatten().tolist()
    assert changed == sorted([grown, weakest])


def replace_rate(route: RouteConfig, rate: float) -> RouteConfig:
    return replace(route, prune_rate=rate)


@pytest.mark.parametrize("revive", [True, False])
def test_gradients_reach_pruned_weights_when_reviving(tiny_arch, revive):
    """revive: dL/dW is the plain gradient with respect to the effective (masked) weight, pruned positions included;
    without it (IMP's rounds), zero at the pruned positions. Reference: the folded dense model's own gradient."""
    model = start_parp(tiny_model(tiny_arch), replace_rate(ATTN_FFN, 0.5), revive=revive)
    dense = fold_masks(_copy(model))
    wav = torch.randn(2, 1600, generator=torch.Generator().manual_seed(1))
    grads = {}
    for name, m in (("parp", model), ("dense", dense)):
        logits, _ = m(wav)
        loss = logits.log_softmax(-1)[..., 2].sum()
        params = {n: p for n, p in m.named_parameters() if n.endswith(".weight") and n in model.masks()}
        grads[name] = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    assert torch.equal(model(wav)[0], dense(wav)[0])  # pruned weights do not act in the forward pass
    for key, mask in model.masks().items():
        expected = grads["dense"][key] if revive else grads["dense"][key] * mask
        torch.testing.assert_close(grads["parp"][key], expected, rtol=1e-5, atol=1e-7)
        assert bool((grads["parp"][key][~mask] != 0).any()) is revive, key


def _copy(model):
    return copy.deepcopy(model)


def test_reprune_is_due_every_interval_and_after_the_last_update():
    assert [u for u in range(1, 121) if reprune_due(u, 50, 120)] == [50, 100, 120]
    assert not any(reprune_due(u, 0, 120) for u in range(1, 121))  # 0: a fixed mask


# ----------------------------------------------------------------------------------------------------------------
# IMP


def test_imp_schedule_is_geometric_and_reaches_the_target(tiny_arch):
    # 0.3 ** (1/3) = 0.669433, 0.3 ** (2/3) = 0.448140, 0.3: each round keeps 66.94% of what was left
    assert imp_schedule(0.3, 3) == pytest.approx([0.669433, 0.448140, 0.3], abs=1e-6)
    assert imp_schedule(0.3, 3)[-1] == 0.3 and imp_schedule(0.5, 1) == [0.5]
    with pytest.raises(S3RError):
        imp_schedule(0.3, 0)
    # per round, 100 weights: 100 - int(33.06) = 67, 100 - int(55.19) = 45, 100 - int(70.0) = 30;
    # 130 weights: 130 - int(42.97) = 88, 130 - int(71.74) = 59, 130 - int(91.0) = 39
    hand = {100: [67, 45, 30], 130: [88, 59, 39]}
    pretrained = tiny_model(tiny_arch, seed=0)
    finetuned = tiny_model(tiny_arch, seed=5)
    for r, keep in enumerate(imp_schedule(0.3, 3)):
        model = prune_and_rewind(finetuned, _copy(pretrained), ATTN_FFN, keep)
        assert nonzeros(model) == {k: hand[size_of(k)][r] for k in nonzeros(model)}
        with torch.no_grad():  # the next round's "finetuned" model: the survivors moved, the pruned stayed 0
            finetuned = _copy(model)
            for m in finetuned.routable_layers(ATTN_FFN).values():
                m.weight.mul_(torch.rand_like(m.weight) + 0.5)


def test_rewind_restores_the_pretrained_weights_of_the_survivors_exactly(tiny_arch):
    pretrained, finetuned = tiny_model(tiny_arch, seed=0), tiny_model(tiny_arch, seed=5)
    model = prune_and_rewind(finetuned, _copy(pretrained), ATTN_FFN, 0.5)
    theirs, ours = finetuned.state_dict(), pretrained.state_dict()
    for key, value in model.state_dict().items():
        if key in nonzeros(model):
            kept = value != 0
            assert torch.equal(value[kept], ours[key][kept])  # rewound: bit for bit the pretrained values
            f = theirs[key].abs()
            assert f[kept].min() > f[~kept].max()  # chosen by the finetuned magnitudes
        else:
            assert torch.equal(value, ours[key]), key  # everything else is the pretrained model


# ----------------------------------------------------------------------------------------------------------------
# Through train.py


def train_args(init, root, save_dir, *extra) -> list[str]:
    return ["--init", str(init), "--data", "train-1h", "--data-root", str(root), "--save-dir", str(save_dir),
            "--max-tokens", "80000", "--update-freq", "1", "--num-workers", "0", "--log-interval", "1", "--valid", "",
            "--lr", "1e-2", *map(str, extra)]


def test_parp_flags_start_from_magnitude_pruning_of_the_init(tiny_init, corpus_root, tmp_path):
    cfg, _ = parse_config(train_args(tiny_init, corpus_root, tmp_path, "--parp", "--prune-rate", 0.3,
                                     "--no-fix-attn"))
    assert cfg.finetune_weights and cfg.reprune_interval == 50  # PARP trains the weights; the paper's n
    model, _, pretrained = build_model(cfg, resolve_corpus("train-1h", str(corpus_root)))
    init = load_pretrained(tiny_init).state_dict()
    masks = model.masks()
    assert pretrained is None and len(masks) == 12  # 2 layers of q, k, v, out, fc1, fc2 (32 wide, FFN 52)
    # 32x32: 1024 - int(0.7 * 1024 = 716.8) = 308; 52x32: 1664 - int(1164.8) = 500
    assert {int(m.sum()) for k, m in masks.items() if "attention" in k} == {308}
    assert {int(m.sum()) for k, m in masks.items() if "feed_forward" in k} == {500}
    for key, mask in masks.items():
        w = init[key].abs()
        assert w[mask].min() > w[~mask].max()
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "encoder.layers.0.attention.q_proj.weight" in trains and not any(n.endswith(".scores") for n in trains)
    assert not any(n.startswith("feature_extractor.") for n in trains)


@pytest.mark.slow
def test_parp_through_train_py_writes_the_final_pruned_model(tiny_init, corpus_root, tmp_path):
    assert train.main(train_args(tiny_init, corpus_root, tmp_path, "--parp", "--prune-rate", 0.3, "--no-fix-attn",
                                 "--reprune-interval", 2, "--max-updates", 5)) == 0
    lines = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [line["update"] for line in lines if "revived" in line] == [2, 4, 5]
    assert sum(line["revived"] for line in lines if "revived" in line) > 0  # at lr 1e-2 some weights come back
    pruned = torch_load(tmp_path / "checkpoint_pruned.pt")
    assert pruned["route"] is None and not any(k.endswith(".scores") for k in pruned["model"])
    last = torch_load(tmp_path / "checkpoint_last.pt")["model"]
    for key, w in pruned["model"].items():
        if (key.endswith("_proj.weight") and ".attention." in key) or key.endswith("_dense.weight"):
            final = last[key].abs()  # the final mask: the largest |W| of the final weights, 308 / 500 of them
            assert int((w != 0).sum()) == (308 if "attention" in key else 500), key
            assert torch.equal(w != 0, final >= final[w != 0].min())
            assert torch.equal(w[w != 0], last[key][w != 0])
    init = load_pretrained(tiny_init).state_dict()
    conv = "feature_extractor.conv_layers.0.conv.weight"
    assert torch.equal(pruned["model"][conv], init[conv])  # feature_grad_mult 0, as weight finetuning
    wav = torch.randn(1, 16000)
    with torch.no_grad():  # the routed checkpoint (eval.py) and the dense pruned one compute the same thing
        torch.testing.assert_close(load_pretrained(tmp_path / "checkpoint_last.pt")(wav)[0],
                                   load_pretrained(tmp_path / "checkpoint_pruned.pt")(wav)[0])


@pytest.mark.slow
def test_imp_driver_runs_rounds_and_resumes(tiny_init, corpus_root, tmp_path):
    out, finetuned = tmp_path / "imp", tmp_path / "ft.pt"
    ft_model = load_pretrained(tiny_init)
    with torch.no_grad():  # round 0's stand-in (--finetuned): the weights moved by finetuning
        for p in ft_model.parameters():
            p.mul_(torch.rand_like(p) + 0.5)
    save_atomic(s3r_checkpoint(ft_model), finetuned)
    args = ["--data", "train-1h", "--data-root", str(corpus_root), "--max-tokens", "80000", "--update-freq", "1",
            "--num-workers", "0", "--valid", "", "--lr", "1e-2", "--max-updates", "2"]
    result = run_imp(tiny_init, out, 0.5, 1, args, finetuned=finetuned)
    assert result == out / "round1" / "checkpoint_pruned.pt" and not (out / "round0").exists()
    assert json.loads((out / "imp.json").read_text())["schedule"] == [1.0, 0.5]
    # round 1 starts from the pretrained weights where the finetuned ones were largest: 512 / 832 of them
    init, pre = torch_load(out / "round1" / "init.pt")["model"], load_pretrained(tiny_init).state_dict()
    ft = ft_model.state_dict()
    layers = [k for k in init if k.endswith(("_proj.weight", "_dense.weight")) and "encoder.layers" in k]
    assert len(layers) == 12
    for key in layers:
        kept = init[key] != 0
        assert int(kept.sum()) == (512 if "attention" in key else 832), key
        assert torch.equal(init[key][kept], pre[key][kept])
        assert ft[key].abs()[kept].min() > ft[key].abs()[~kept].max()
    final = torch_load(result)["model"]  # trained with a fixed mask: the pruned weights stayed 0
    assert all(torch.equal(final[k] != 0, init[k] != 0) for k in layers)
    assert not all(torch.equal(final[k], init[k]) for k in layers)
    # resumable: an unfinished round is rerun, its init (and anything finished) reused
    stamp = (out / "round1" / "init.pt").stat().st_mtime_ns
    (out / "round1" / "checkpoint_pruned.pt").unlink()
    (out / "round1" / "checkpoint_last.pt").unlink()
    assert run_imp(tiny_init, out, 0.5, 1, args, finetuned=finetuned) == result and result.exists()
    assert (out / "round1" / "init.pt").stat().st_mtime_ns == stamp
    with pytest.raises(S3RError, match="prune_rate"):
        run_imp(tiny_init, out, 0.3, 1, args, finetuned=finetuned)
    with pytest.raises(S3RError, match="--prune-rate"):
        run_imp(tiny_init, tmp_path / "other", 0.5, 1, [*args, "--prune-rate", "0.2"])


def test_imp_command_line_passes_what_follows_the_double_dash_to_train_py(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(prune, "run_imp", lambda *a: seen.setdefault("args", a) and Path("x"))
    prune.main(["imp", "pre.pt", "out", "--prune-rate", "0.3", "--rounds", "2", "--finetuned", "ft.pt", "--launcher",
                "torchrun --nproc_per_node=2", "--", "--data", "demo", "--lr", "3e-3"])
    assert seen["args"] == ("pre.pt", "out", 0.3, 2, ["--data", "demo", "--lr", "3e-3"], False, "ft.pt",
                            ["torchrun", "--nproc_per_node=2"])
    with pytest.raises(SystemExit):  # --prune-rate is required
        prune.main(["imp", "pre.pt", "out", "--", "--prune-rate", "0.3"])
    assert "--prune-rate" in capsys.readouterr().err


def test_unknown_shapes_and_structured_routes_are_one_line_errors(tiny_arch):
    from s3r.errors import ConfigError
    with pytest.raises(ConfigError, match="granularity"):
        start_parp(tiny_model(tiny_arch), RouteConfig(fix_attn=False, route_granularity="row"))
    other = tiny_model(tiny_arch, intermediate_size=11)
    with pytest.raises(ConfigError, match="intermediate_dense"):
        start_parp(tiny_model(tiny_arch), ATTN_FFN, mask_from=other)
    with pytest.raises(ConfigError, match="shape"):
        prune_and_rewind(other, tiny_model(tiny_arch), ATTN_FFN, 0.5)
