"""s3r/checkpoint.py: every supported format loads and reproduces its peer's outputs (within 1e-4).

Peers: transformers (tiny random configs of each family, safetensors and pytorch_model.bin, both weight-norm key
spellings), torchaudio's wav2vec2, and fairseq-format checkpoints written by `fairseq_fixtures` from the same HF
weights (cfg and args styles, pretraining and CTC, upstream S3-Router `wav2vec_ctc_st`).
"""
import ast
import json
import os
import stat
import sys
import types
from pathlib import Path

import fairseq_fixtures as ff
import pytest
import torch

import s3r.model
from s3r import RouteConfig, load_pretrained
from s3r.checkpoint import CheckpointError, checkpoint_vocab, s3r_checkpoint, save_atomic, weights_fingerprint
from s3r.model import Routable, topk_mask
from s3r.text import Vocabulary

TOL = 1e-4
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    wav = torch.randn(3, 2400, generator=g)
    lengths = torch.tensor([2400, 1777, 1003])
    wav[1, 1777:] = 0
    wav[2, 1003:] = 0
    return wav, lengths


_HF = {}


def hf(variant, ctc):
    """Cached tiny HF model (building them is cheap, but they are used by many tests)."""
    if (variant, ctc) not in _HF:
        _HF[variant, ctc] = ff.hf_model(variant, ctc)
    return _HF[variant, ctc]


@torch.no_grad()
def hf_outputs(model, wav, lengths):
    """HF logits (ForCTC) or last hidden states (Model) of the padded batch (given the attention mask) and of each
    utterance alone."""

    def pick(o):
        return o.logits if hasattr(o, "logits") else o.last_hidden_state

    mask = (torch.arange(wav.shape[1])[None, :] < lengths[:, None]).long()
    padded = pick(model(wav, attention_mask=mask))
    alone = [pick(model(wav[b: b + 1, : lengths[b]]))[0] for b in range(len(lengths))]
    return padded, alone


@torch.no_grad()
def max_diff(ours, wav, lengths, ref_padded, ref_alone) -> float:
    """Largest |ours - peer| over the valid frames of our padded batch and of each utterance run alone, both against
    the peer's utterance alone: the peers' group norm and data2vec's positional convs read the padding, s3r's do
    not, so a padded batch is compared with what the peer gives without padding."""
    out, out_lengths = ours(wav, lengths)
    assert out.shape == ref_padded.shape
    diffs = []
    for b in range(len(lengths)):
        T = int(out_lengths[b])
        assert T == ref_alone[b].shape[0]
        diffs.append((out[b, :T] - ref_alone[b]).abs().max().item())
        alone, _ = ours(wav[b: b + 1, : lengths[b]])
        diffs.append((alone[0] - ref_alone[b]).abs().max().item())
    return max(diffs)


def assert_parity(ours, peer, wav, lengths, what=""):
    diff = max_diff(ours, wav, lengths, *hf_outputs(peer, wav, lengths))
    assert diff < TOL, f"{what}: max abs diff {diff:.3g}"
    return diff


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face


def _rewrite_state(directory, fn):
    """Apply `fn` to the state dict stored in an HF directory, in whichever file format it is."""
    st, binf = directory / "model.safetensors", directory / "pytorch_model.bin"
    if st.is_file():
        from safetensors.torch import load_file, save_file
        save_file(fn(load_file(str(st))), str(st), metadata={"format": "pt"})
    else:
        torch.save(fn(torch.load(binf, weights_only=True)), binf)


def _stored_keys(directory):
    st = directory / "model.safetensors"
    if st.is_file():
        from safetensors import safe_open
        with safe_open(str(st), "pt") as f:
            return set(f.keys())
    return set(torch.load(directory / "pytorch_model.bin", weights_only=True))


# Both spellings of the weight-normed positional conv, for every variant that has one (data2vec's has no weight norm).
SPELLINGS = [(v, s) for v in ff.VARIANTS for s in ("parametrizations", "weight_g")
             if v != "data2vec" or s != "weight_g"]


@pytest.mark.parametrize("variant,spelling", SPELLINGS)
@pytest.mark.parametrize("ctc", [False, True], ids=["Model", "ForCTC"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hf_parity(tmp_path, batch, variant, ctc, fmt, spelling):
    peer = hf(variant, ctc)
    peer.save_pretrained(tmp_path, safe_serialization=fmt == "safetensors")
    if spelling == "weight_g":
        _rewrite_state(tmp_path, ff.old_weight_norm_spelling)
    keys = _stored_keys(tmp_path)
    if variant != "data2vec":  # make sure the file really uses the spelling under test
        assert any(spelling in k for k in keys), sorted(keys)[:5]
    model = load_pretrained(tmp_path)
    assert (model.lm_head is not None) == ctc
    assert_parity(model, peer, *batch, what=f"{variant} ctc={ctc} {fmt} {spelling}")


def test_hf_parity_can_fail(tmp_path, batch):
    """The parity check has teeth: one perturbed bias of ours is visible far above the tolerance."""
    peer = hf("base", True)
    peer.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    with torch.no_grad():
        model.encoder.layers[1].feed_forward.output_dense.bias[3] += 0.01
    assert max_diff(model, *batch, *hf_outputs(peer, *batch)) > 10 * TOL


@pytest.mark.parametrize("act", ["gelu_new", "relu", "swish"])
def test_hf_other_activations(tmp_path, batch, act):
    import transformers as tf

    cfg = ff.hf_config("base")
    cfg.hidden_act = act
    torch.manual_seed(0)
    peer = ff.perturb_(tf.Wav2Vec2ForCTC(cfg)).eval()
    peer.save_pretrained(tmp_path)
    # tighter than TOL: erf GELU in place of HF's tanh `gelu_new` is off by only ~1e-5 in a model this small
    assert max_diff(load_pretrained(tmp_path), *batch, *hf_outputs(peer, *batch)) < 3e-6


def test_hf_pretraining_heads_are_dropped(tmp_path, batch):
    """Wav2Vec2ForPreTraining: `wav2vec2.*` plus quantizer / project_q / project_hid, which finetuning drops."""
    import transformers as tf

    torch.manual_seed(0)
    peer = ff.perturb_(tf.Wav2Vec2ForPreTraining(ff.hf_config("large"))).eval()
    peer.save_pretrained(tmp_path)
    assert any(k.startswith("quantizer.") for k in _stored_keys(tmp_path))
    model = load_pretrained(tmp_path)
    assert model.lm_head is None
    assert_parity(model, peer.wav2vec2, *batch, what="ForPreTraining")


def test_hf_unsupported_extractor_activation_is_refused(tmp_path):
    import transformers as tf

    cfg = ff.hf_config("base")
    cfg.feat_extract_activation = "relu"
    tf.Wav2Vec2Model(cfg).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="feat_extract_activation"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("apply", [True, False])
def test_hf_apply_spec_augment_is_read(tmp_path, apply):
    """transformers' `apply_spec_augment: false` means no SpecAugment whatever mask_time_prob says."""
    import transformers as tf

    cfg = ff.hf_config("base")
    cfg.apply_spec_augment = apply
    tf.Wav2Vec2ForCTC(cfg).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["apply_spec_augment"] is apply
    model = load_pretrained(tmp_path)
    assert model.config.apply_spec_augment is apply and model.config.mask_time_prob == 0.05


def _with_adapter_keys(state: dict) -> dict:
    """The MMS adapter of layer 0 as transformers' Wav2Vec2AttnAdapterLayer names it."""
    extra = {f"wav2vec2.encoder.layers.0.adapter_layer.{n}": torch.zeros(2) for n in
             ("norm.weight", "norm.bias", "linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")}
    return {**state, **extra}


@pytest.mark.parametrize("where", ["config", "keys"])
def test_hf_mms_adapter_is_refused_by_option(tmp_path, where):
    hf("base", True).save_pretrained(tmp_path)
    if where == "config":
        cfg = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**cfg, "adapter_attn_dim": 16}))
    else:
        _rewrite_state(tmp_path, _with_adapter_keys)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path)
    msg = _one_line(e)
    assert "adapter_attn_dim" in msg and str(tmp_path) in msg and "MMS" in msg, msg


def test_hf_file_path_and_preprocessor(tmp_path):
    peer = hf("base", False)
    peer.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True, "sampling_rate": 16000}))
    model = load_pretrained(tmp_path / "model.safetensors")
    assert model.config.normalize is True and model.vocab is None


@pytest.mark.parametrize("variant", ff.VARIANTS)
def test_padding_changes_nothing_where_the_peers_change_it(tmp_path, batch, variant):
    """Each utterance of a padded batch equals itself alone in s3r (1e-5), for every variant, with autograd on and
    off (the speed paths differ) and routed in training mode. transformers includes the padding in base's and
    HuBERT's group norm and data2vec's stacked positional convs, so there its padded batch differs from its own
    utterances alone."""
    wav, lengths = batch
    peer = hf(variant, False)
    peer.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    padded, alone = hf_outputs(peer, wav, lengths)
    peer_gap = max((padded[b, : len(alone[b])] - alone[b]).abs().max().item() for b in range(3))
    assert (peer_gap > 1e-3) == (variant != "large"), peer_gap
    for mode in ("eval", "eval with autograd", "routed, training"):
        if mode == "routed, training":  # S3-Router training, randomness off: dropouts, layerdrop, SpecAugment
            model.route(RouteConfig(prune_rate=0.9)).train()
            model.config.apply_spec_augment, model.encoder.layerdrop = False, 0.0
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
                elif isinstance(m, s3r.model.Attention):
                    m.dropout = 0.0
        with torch.set_grad_enabled(mode != "eval"):
            out, out_lengths = model(wav, lengths)
            for b in range(3):
                one, _ = model(wav[b: b + 1, : lengths[b]])
                assert (out[b, : out_lengths[b]] - one[0]).abs().max() < 1e-5, (variant, mode, b)


# ----------------------------------------------------------------------------------------------------------------
# torchaudio


def _torchaudio_to_ours(state: dict) -> dict:
    out = {}
    for k, v in ff.old_weight_norm_spelling(state).items():
        k = k.replace("encoder.transformer.", "encoder.").replace("encoder.feature_projection.", "feature_projection.")
        out[k.replace("aux.", "lm_head.")] = v
    return out


@pytest.mark.parametrize("mode,layer_norm_first", [("group_norm", False), ("layer_norm", True), ("layer_norm", False)])
@pytest.mark.parametrize("aux", [None, 7])
def test_torchaudio_parity(tmp_path, batch, mode, layer_norm_first, aux):
    from torchaudio.models import wav2vec2_model

    torch.manual_seed(3)
    conv = list(zip(ff.CONV["conv_dim"], ff.CONV["conv_kernel"], ff.CONV["conv_stride"], strict=True))
    peer = wav2vec2_model(mode, conv, mode == "layer_norm", 32, 0.0, 15, 4, 2, 4, 0.0, 52, 0.0, 0.0,
                          layer_norm_first, 0.0, aux)
    ff.perturb_(peer, seed=3).eval()
    from s3r import Wav2Vec2Config, Wav2Vec2ForCTC

    cfg = Wav2Vec2Config(**ff.CONV, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=52,
                         conv_bias=mode == "layer_norm", feat_extract_norm=mode.split("_")[0],
                         layer_norm_first=layer_norm_first, conv_pos_kernel=15, conv_pos_groups=4, vocab_size=aux or 0)
    ours = Wav2Vec2ForCTC(cfg)
    state = _torchaudio_to_ours(peer.state_dict())
    state["masked_spec_embed"] = ours.masked_spec_embed.detach()
    ours.load_state_dict(state, strict=True)
    ours.eval()
    wav, lengths = batch
    with torch.no_grad():
        ref, ref_lengths = peer(wav, lengths)
        out, out_lengths = ours(wav, lengths)
        assert torch.equal(out_lengths, ref_lengths)
        diff = 0.0
        for b in range(3):  # torchaudio's group norm reads the padding: compare with its utterances alone
            alone_ref, _ = peer(wav[b: b + 1, : lengths[b]])
            alone, _ = ours(wav[b: b + 1, : lengths[b]])
            n = int(out_lengths[b])
            diff = max(diff, (alone - alone_ref).abs().max().item(), (out[b, :n] - alone_ref[0]).abs().max().item())
    assert diff < TOL, f"torchaudio {mode} layer_norm_first={layer_norm_first}: {diff:.3g}"


@pytest.mark.parametrize("variant", ["base", "large"])
def test_torchaudio_import_of_hf_model_agrees(tmp_path, batch, variant):
    """torchaudio's own HF importer and s3r's HF loader give the same model."""
    from torchaudio.models.wav2vec2.utils import import_huggingface_model

    peer = hf(variant, True)
    imported = import_huggingface_model(peer).eval()
    peer.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    wav, lengths = batch
    with torch.no_grad():
        out, out_lengths = ours(wav, lengths)
        ref = [imported(wav[b: b + 1, : lengths[b]])[0][0] for b in range(3)]  # alone: see max_diff
    assert max((out[b, :n] - ref[b]).abs().max().item() for b, n in enumerate(out_lengths)) < TOL


# ----------------------------------------------------------------------------------------------------------------
# fairseq


def _torchaudio_name_to_hf(key: str) -> str:
    """torchaudio's Wav2Vec2Model names -> HF bare names, as torchaudio's own `import_huggingface_model` pairs them
    (HF `feature_projection` -> `encoder.feature_projection`, HF `encoder` -> `encoder.transformer`, `lm_head` ->
    `aux`)."""
    for ta, ours in (("encoder.feature_projection.", "feature_projection."), ("encoder.transformer.", "encoder."),
                     ("aux.", "lm_head.")):
        if key.startswith(ta):
            return ours + key.removeprefix(ta)
    return key


@pytest.mark.parametrize("variant", ["base", "large", "hubert"])
@pytest.mark.parametrize("kind", ["pretraining", "ctc"])
def test_fairseq_fixture_names_agree_with_torchaudio_importer(variant, kind):
    """The fixtures' hand-written fairseq names are those torchaudio's fairseq importer reads: every key it maps
    (`import_fairseq._map_key`) carries the HF tensor of that name, so the parity tests do not rest on s3r's table.
    (torchaudio's importer knows no data2vec positional conv stack; data2vec's other names are the same code.)"""
    from torchaudio.models.wav2vec2.utils.import_fairseq import _map_key

    peer = hf(variant, kind == "ctc")
    bare = ff.hf_bare_state(peer)
    if kind == "ctc":
        state = ff.fairseq_ctc_checkpoint(variant, peer, "cfg")["model"]
        state = {k.removeprefix("w2v_encoder."): v for k, v in state.items()}
    else:
        state = ff.fairseq_pretraining_checkpoint(variant, peer, "cfg")["model"]
    checked = 0
    for key, tensor in state.items():
        if _map_key(key) is None or key == "label_embs_concat":
            continue  # pretraining heads and the mask embedding, which torchaudio drops (HuBERT's labels it keeps)
        mapped = _map_key(key)
        assert torch.equal(tensor, bare[_torchaudio_name_to_hf(mapped)]), (key, mapped)
        checked += 1
    assert checked == len(bare) - 1  # every HF tensor but masked_spec_embed


@pytest.mark.parametrize("variant", ff.VARIANTS)
@pytest.mark.parametrize("style", ["cfg", "args"])
def test_fairseq_pretraining_parity(tmp_path, batch, variant, style):
    peer = hf(variant, False)
    ckpt = ff.fairseq_pretraining_checkpoint(variant, peer, style, normalize=variant != "base")
    assert any(k.startswith(("quantizer.", "final_proj.", "_ema", "label_embs")) for k in ckpt["model"])
    save_atomic(ckpt, tmp_path / "pretrained.pt")
    model = load_pretrained(tmp_path / "pretrained.pt")
    assert model.lm_head is None and model.config.normalize == (variant != "base")
    assert model.config.layer_norm_first == (variant == "large")
    assert_parity(model, peer, *batch, what=f"fairseq {variant} {style}")


@pytest.mark.parametrize("variant", ["base", "large"])
def test_fairseq_parametrized_weight_norm(tmp_path, batch, variant):
    """fairseq run under torch >= 2.1 weight norm stores `pos_conv.0.parametrizations.weight.original0/1`."""
    peer = hf(variant, False)
    ckpt = ff.fairseq_pretraining_checkpoint(variant, peer, "cfg", weight_norm="parametrizations")
    assert "encoder.pos_conv.0.parametrizations.weight.original0" in ckpt["model"]
    save_atomic(ckpt, tmp_path / "p.pt")
    assert_parity(load_pretrained(tmp_path / "p.pt"), peer, *batch, what=variant)


@pytest.mark.parametrize("variant", ff.VARIANTS)
@pytest.mark.parametrize("style", ["cfg", "args"])
def test_fairseq_ctc_parity(tmp_path, batch, variant, style):
    peer = hf(variant, True)
    ckpt = ff.fairseq_ctc_checkpoint(variant, peer, style, normalize=variant == "large")
    save_atomic(ckpt, tmp_path / "ctc.pt")
    model = load_pretrained(tmp_path / "ctc.pt")
    assert model.config.vocab_size == ff.VOCAB and model.config.normalize == (variant == "large")
    # regularisation comes from the finetuning config, not from pretraining
    assert model.config.layerdrop == 0.1 and model.config.mask_feature_prob == 0.25
    assert model.route_config is None
    assert_parity(model, peer, *batch, what=f"fairseq ctc {variant} {style}")


@pytest.mark.parametrize("style", ["cfg", "args"])
@pytest.mark.parametrize("blank", [(0.0, "add"), (1.5, "add"), (-2.0, "set")], ids=["default", "add", "set"])
def test_fairseq_blank_weight_and_mode_are_read(tmp_path, style, blank):
    """Wav2Vec2CtcConfig's blank_weight / blank_mode (applied by fairseq at inference) land in our config."""
    weight, mode = blank
    ckpt = ff.fairseq_ctc_checkpoint("base", hf("base", True), style)
    head = ckpt["cfg"]["model"] if style == "cfg" else vars(ckpt["args"])
    head.update(blank_weight=weight, blank_mode=mode)
    save_atomic(ckpt, tmp_path / "ctc.pt")
    config = load_pretrained(tmp_path / "ctc.pt").config
    assert (config.blank_weight, config.blank_mode) == (weight, mode)


def test_fairseq_pretraining_checkpoint_has_default_blank(tmp_path):
    save_atomic(ff.fairseq_pretraining_checkpoint("base", hf("base", False)), tmp_path / "p.pt")
    config = load_pretrained(tmp_path / "p.pt").config
    assert (config.blank_weight, config.blank_mode) == (0.0, "add")


def test_fairseq_mms_adapter_layers_are_refused_by_option(tmp_path):
    """MMS finetunes with `layer_type=trf_adp` (transformer layers with per-language adapters)."""
    ckpt = ff.fairseq_ctc_checkpoint("base", hf("base", True), "cfg")
    ckpt["cfg"]["model"]["w2v_args"]["model"].update(layer_type="trf_adp", adp_num=1, adp_dim=64)
    save_atomic(ckpt, tmp_path / "mms.pt")
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path / "mms.pt")
    assert "layer_type='trf_adp'" in _one_line(e) and "MMS" in str(e.value)


def _upstream_scores(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(m.weight.shape, generator=g)
            for name, m in model.named_modules()
            if isinstance(m, Routable) and (".attention." in name or ".feed_forward." in name)}


@torch.no_grad()
def _apply_masks_to_hf(peer, scores: dict, keep: dict, prefix: str):
    """A copy of `peer` whose routed weights are multiplied by the top-|score| masks (the expected upstream forward)."""
    import copy

    masked = copy.deepcopy(peer)
    params = dict(masked.named_parameters())
    for layer, s in scores.items():
        k = keep.get(layer)
        if k is None:
            continue
        w = params[prefix + layer + ".weight"]
        order = s.abs().flatten().argsort(descending=True)
        mask = torch.zeros(s.numel(), dtype=torch.bool)
        mask[order[:k]] = True
        w.mul_(mask.view_as(w))
    return masked


@pytest.mark.parametrize("fix_attn", [False, True], ids=["all", "fix_attn"])
@pytest.mark.parametrize("style", ["cfg", "args"])
def test_upstream_s3router_checkpoint(tmp_path, batch, fix_attn, style):
    """wav2vec_ctc_st: `.scores` next to every q/k/v/out/fc1/fc2 weight, `cfg.model.prune_rate` = fraction kept.

    At 0.6 upstream's GetSubnet count, numel - int((1 - prune_rate) * numel), differs from round(0.6 * numel) on
    every routed tensor of the tiny model: 32x32 keeps 615 (not 614), 52x32 keeps 999 (not 998).
    """
    variant, prune_rate = "base", 0.6
    peer = hf(variant, True)
    scores = _upstream_scores(load_pretrained_dir(tmp_path / "hf", peer))
    ckpt = ff.fairseq_ctc_checkpoint(variant, peer, style, route={"prune_rate": prune_rate, "fix_attn": fix_attn,
                                                                   "scores": scores})
    assert "w2v_encoder.w2v_model.encoder.layers.0.fc1.scores" in ckpt["model"]
    assert "w2v_encoder.w2v_model.encoder.layers.0.self_attn.q_proj.scores" in ckpt["model"]
    save_atomic(ckpt, tmp_path / "st.pt")
    model = load_pretrained(tmp_path / "st.pt")
    assert model.route_config is not None and model.route_config.prune_rate == prune_rate
    assert model.route_config.fix_attn == fix_attn
    upstream = {32 * 32: 1024 - int(0.4 * 1024), 52 * 32: 1664 - int(0.4 * 1664)}
    assert upstream == {1024: 615, 1664: 999}  # counted by hand: int(409.6) = 409, int(665.6) = 665
    keep = {layer: upstream[s.numel()] for layer, s in scores.items() if not (fix_attn and ".attention." in layer)}
    for name, mask in model.masks().items():
        assert int(mask.sum()) == keep[name.removesuffix(".weight")]
    expected = _apply_masks_to_hf(peer, scores, keep, "wav2vec2.")
    assert_parity(model, expected, *batch, what=f"upstream st fix_attn={fix_attn} {style}")


def load_pretrained_dir(directory, peer):
    peer.save_pretrained(directory)
    return load_pretrained(directory)


def test_upstream_layerwise_prune_rate_is_refused(tmp_path):
    """Per-layer prune rates are not modelled; such a checkpoint must not load with a single rate silently."""
    peer = hf("base", True)
    scores = _upstream_scores(load_pretrained_dir(tmp_path / "hf", peer))
    ckpt = ff.fairseq_ctc_checkpoint("base", peer, "cfg", route={"prune_rate": 0.5, "scores": scores})
    ckpt["cfg"]["model"]["layerwise_prune_rate"] = [0.5, 0.9]
    save_atomic(ckpt, tmp_path / "st.pt")
    with pytest.raises(CheckpointError, match="layerwise_prune_rate"):
        load_pretrained(tmp_path / "st.pt")


def test_ctc_checkpoint_without_w2v_args_is_refused(tmp_path):
    ckpt = ff.fairseq_ctc_checkpoint("base", hf("base", True), "cfg")
    ckpt["cfg"]["model"]["w2v_args"] = None
    save_atomic(ckpt, tmp_path / "ctc.pt")
    with pytest.raises(CheckpointError, match="w2v_args"):
        load_pretrained(tmp_path / "ctc.pt")


# ----------------------------------------------------------------------------------------------------------------
# Refusals: unknown, missing and misshapen keys, untrusted pickles


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def _drop(state: dict, key: str) -> None:
    del state[key]


FAIRSEQ_DAMAGE = {  # what is done to a CTC checkpoint's state -> what the one-line error must name
    "unknown": (lambda s: s.__setitem__("w2v_encoder.w2v_model.encoder.layers.0.fc3.weight", torch.zeros(3)),
                ["encoder.layers.0.fc3.weight"]),
    "missing": (lambda s: _drop(s, "w2v_encoder.w2v_model.encoder.layers.1.fc2.bias"),
                ["encoder.layers.1.feed_forward.output_dense.bias"]),
    "shape": (lambda s: s.__setitem__("w2v_encoder.w2v_model.encoder.layers.0.self_attn.k_proj.weight",
                                      torch.zeros(32, 31)), ["encoder.layers.0.attention.k_proj.weight", "(32, 31)"]),
}


@pytest.mark.parametrize("damage", list(FAIRSEQ_DAMAGE))
def test_bad_fairseq_key_is_refused_by_name(tmp_path, damage):
    change, named = FAIRSEQ_DAMAGE[damage]
    ckpt = ff.fairseq_ctc_checkpoint("base", hf("base", True), "cfg")
    change(ckpt["model"])
    save_atomic(ckpt, tmp_path / "c.pt")
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path / "c.pt")
    assert all(n in _one_line(e) for n in named), str(e.value)


def test_unknown_hf_key_is_refused_by_name(tmp_path):
    hf("large", True).save_pretrained(tmp_path)
    _rewrite_state(tmp_path, lambda s: {**s, "wav2vec2.encoder.adapter.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path)
    assert "encoder.adapter.weight" in _one_line(e)


class NotAllowListed:
    """A class a checkpoint may pickle (defined here, so outside any allow-list)."""

    def __init__(self):
        self.payload = [1, 2, 3]


def test_pickled_local_class_needs_trust(tmp_path):
    ckpt = ff.fairseq_ctc_checkpoint("base", hf("base", True), "cfg")
    ckpt["extra_state"]["thing"] = NotAllowListed()
    save_atomic(ckpt, tmp_path / "c.pt")
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path / "c.pt")
    msg = _one_line(e)
    assert "NotAllowListed" in msg and "trust" in msg
    assert load_pretrained(tmp_path / "c.pt", trust_checkpoint=True).config.vocab_size == ff.VOCAB


def test_pickled_fairseq_dictionary_needs_trust_and_loads_without_fairseq(tmp_path, monkeypatch, batch):
    """fairseq CTC checkpoints may pickle `fairseq.data.dictionary.Dictionary`; fairseq is not installed here."""
    mod = types.ModuleType("fairseq.data.dictionary")

    class Dictionary:
        def __init__(self):
            self.symbols, self.count, self.indices = ["<s>", "<pad>", "</s>", "<unk>", "A"], [1] * 5, {}

    Dictionary.__module__ = mod.__name__
    Dictionary.__qualname__ = "Dictionary"
    mod.Dictionary = Dictionary
    for name in ("fairseq", "fairseq.data", "fairseq.data.dictionary"):
        monkeypatch.setitem(sys.modules, name, mod if name.endswith("dictionary") else types.ModuleType(name))
    peer = hf("base", True)
    ckpt = ff.fairseq_ctc_checkpoint("base", peer, "cfg")
    ckpt["task_state"] = {"target_dictionary": Dictionary()}
    save_atomic(ckpt, tmp_path / "c.pt")
    for name in ("fairseq", "fairseq.data", "fairseq.data.dictionary"):
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path / "c.pt")
    assert "fairseq.data.dictionary.Dictionary" in _one_line(e)
    model = load_pretrained(tmp_path / "c.pt", trust_checkpoint=True)
    assert_parity(model, peer, *batch, what="trusted")


def test_not_a_checkpoint(tmp_path):
    save_atomic({"weights": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"neither an s3r nor a fairseq checkpoint \(it holds a dict with keys "
                                              r"weights\)"):
        load_pretrained(tmp_path / "x.pt")
    save_atomic([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="it holds a list"):
        load_pretrained(tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------------------------------------------
# Unreadable files: one line naming the file and what is wrong with it


def _unreadable_message(path, **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path, **kw)
    return _one_line(e)


def test_text_file_named_pt(tmp_path):
    (tmp_path / "x.pt").write_text("epoch 3: loss 0.21\nepoch 4: loss 0.19\n")
    for trust in (False, True):
        msg = _unreadable_message(tmp_path / "x.pt", trust_checkpoint=trust)
        assert msg == f"cannot read {tmp_path / 'x.pt'}: not a PyTorch file but text (38 bytes, beginning " \
                      f"'epoch 3: loss 0.21')", msg


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.0], ids=["half", "last-byte", "empty"])
def test_truncated_checkpoint(tmp_path, keep):
    ckpt = ff.fairseq_ctc_checkpoint("base", hf("base", True), "cfg")
    save_atomic(ckpt, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    cut = int(keep * len(data))
    (tmp_path / "cut.pt").write_bytes(data[:cut])
    want = "an empty file (0 bytes)" if cut == 0 else f"truncated or corrupt ({cut:,} bytes)"
    assert _unreadable_message(tmp_path / "cut.pt") == f"cannot read {tmp_path / 'cut.pt'}: {want}"


def test_corrupt_zip_directory(tmp_path):
    """Full length, but the zip directory at the end is overwritten (a damaged copy)."""
    save_atomic({"cfg": {}, "model": {"w": torch.arange(4096.0)}}, tmp_path / "c.pt")
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(data[:-200] + bytes(200))
    assert _unreadable_message(tmp_path / "c.pt") == \
        f"cannot read {tmp_path / 'c.pt'}: truncated or corrupt ({len(data):,} bytes)"


def test_binary_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"\x1f\x8b\x08\x00" + bytes(100))  # a gzip header
    head = repr(b"\x1f\x8b\x08\x00" + bytes(4))
    assert _unreadable_message(tmp_path / "x.pt") == \
        f"cannot read {tmp_path / 'x.pt'}: not a PyTorch file (104 bytes, beginning {head})"


HF_DAMAGE = {  # what is done to a saved HF directory -> the start of the one-line error, after the path
    "no-config": (lambda d: (d / "config.json").unlink(), "", "no config.json"),
    "no-weights": (lambda d: (d / "model.safetensors").unlink(), "", "no weights (neither model.safetensors nor "
                                                                     "pytorch_model.bin)"),
    "bad-json": (lambda d: (d / "config.json").write_text('{"model_type": "wav2vec2",'), "config.json",
                 "not valid JSON"),
    "not-wav2vec2": (lambda d: (d / "config.json").write_text('{"model_type": "wav2vec2"}'), "config.json",
                     "not a Hugging Face wav2vec2 config (no conv_dim"),
    "truncated-weights": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:999]),
                          "model.safetensors", "truncated or corrupt (999 bytes)"),
}


@pytest.mark.parametrize("damage", list(HF_DAMAGE))
def test_damaged_hf_directory(tmp_path, damage):
    change, file, want = HF_DAMAGE[damage]
    hf("base", True).save_pretrained(tmp_path)
    change(tmp_path)
    msg = _unreadable_message(tmp_path)
    where = str(tmp_path / file) if file else str(tmp_path)
    assert where in msg and want in msg, msg


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "ckpts").mkdir()
    assert _unreadable_message(tmp_path / "ckpts") == \
        f"{tmp_path / 'ckpts'}: no config.json (a Hugging Face model directory is expected)"


# ----------------------------------------------------------------------------------------------------------------
# s3r's own checkpoints


def _train_a_little(model, wav, lengths, steps=3):
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        out, _ = model(wav, lengths)
        out.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("pretrained", [False, True], ids=["full", "pretrained_ref"])
def test_s3r_round_trip(tmp_path, batch, pretrained):
    wav, lengths = batch
    hf("large", True).save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf", prune_rate=0.7, init_score="weight_rank", trainable_bias=True)
    before = {k: v.clone() for k, v in model.masks().items()}
    _train_a_little(model, wav, lengths)
    assert any(not torch.equal(before[k], m) for k, m in model.masks().items()), "training should move a mask"
    ckpt = s3r_checkpoint(model, pretrained=str(tmp_path / "hf") if pretrained else None, note="hello")
    if pretrained:  # only what trained is stored: scores, head, biases (and the time-mask embedding, as upstream)
        assert all(k.endswith((".scores", ".bias")) or k.startswith("lm_head.") or k == "masked_spec_embed"
                   for k in ckpt["model"]), sorted(ckpt["model"])
        assert ckpt["pretrained"]["sha256"] == weights_fingerprint(model)
    save_atomic(ckpt, tmp_path / "s3r.pt")
    loaded = load_pretrained(tmp_path / "s3r.pt")
    assert loaded.route_config == model.route_config
    masks = model.masks()
    assert masks.keys() == loaded.masks().keys()
    assert all(torch.equal(masks[k], m) for k, m in loaded.masks().items())
    with torch.no_grad():
        assert torch.equal(model(wav, lengths)[0], loaded(wav, lengths)[0])


def test_s3r_checkpoint_refuses_changed_pretrained_weights(tmp_path, batch):
    hf("base", True).save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf", prune_rate=0.9)
    save_atomic(s3r_checkpoint(model, pretrained=str(tmp_path / "hf")), tmp_path / "s3r.pt")
    load_pretrained(tmp_path / "s3r.pt")  # fine while the weights are the same
    _rewrite_state(tmp_path / "hf", lambda s: {k: v + 1e-3 if "output_dense.weight" in k else v for k, v in s.items()})
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path / "s3r.pt")
    assert "not the ones" in _one_line(e)


def test_s3r_checkpoint_unknown_key_is_refused(tmp_path):
    hf("base", False).save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf", prune_rate=0.9)
    ckpt = s3r_checkpoint(model)
    ckpt["model"]["encoder.layers.0.attention.q_proj.thres"] = torch.zeros(1)
    save_atomic(ckpt, tmp_path / "s3r.pt")
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path / "s3r.pt")
    assert "encoder.layers.0.attention.q_proj.thres" in _one_line(e)


def test_weight_based_init_reads_loaded_weights(tmp_path):
    """load_pretrained(prune_rate=..., init_score='weight_rank') routes after loading: first mask = magnitude top-k."""
    hf("base", True).save_pretrained(tmp_path)
    model = load_pretrained(tmp_path, prune_rate=0.5, init_score="weight_rank", fix_attn=True)
    assert model.route_config.fix_attn
    for name, mask in model.masks().items():
        assert ".feed_forward." in name
        w = model.get_parameter(name)
        assert torch.equal(mask, topk_mask(w.abs(), w.numel() // 2))  # 0.5: every kept-count formula agrees


def test_conv_feature_layers_parse_without_eval():
    from s3r.checkpoint import parse_conv_layers

    assert parse_conv_layers("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]") == \
        [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
    assert parse_conv_layers("[(512, 10, 5), (512, 8, 4)] + [(512, 4, 2)] * 3 + [(512, 1, 1)]")[1] == (512, 8, 4)
    for bad in ("__import__('os').system('true')", "[(512, 10)]", "[(1, 2, 3)] - [(1, 2, 3)]", "[(1, 2, 3)"):
        with pytest.raises(CheckpointError):
            parse_conv_layers(bad)


# ----------------------------------------------------------------------------------------------------------------
# load_pretrained's route options, checkpoint_vocab


def test_route_options_default_to_route_config(tmp_path):
    """init_score / fix_attn / trainable_proj left out (None) are RouteConfig's defaults, not load_pretrained's."""
    hf("base", True).save_pretrained(tmp_path)
    assert load_pretrained(tmp_path, prune_rate=0.5).route_config == RouteConfig(prune_rate=0.5)
    given = load_pretrained(tmp_path, prune_rate=0.5, init_score="weight_rank", fix_attn=False, trainable_proj=False,
                            trainable_bias=True).route_config
    assert given == RouteConfig(prune_rate=0.5, init_score="weight_rank", fix_attn=False, trainable_proj=False,
                                trainable_bias=True)
    with pytest.raises(TypeError, match="unknown route option"):
        load_pretrained(tmp_path, prune_rate=0.5, fix_atn=True)


def test_checkpoint_vocab_sources(tmp_path):
    hf("base", True).save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    assert model.vocab is None and checkpoint_vocab(model, tmp_path / "hf") is None
    (tmp_path / "hf" / "dict.ltr.txt").write_text("| 10\nE 5\nT 3\n")
    beside = checkpoint_vocab(model, tmp_path / "hf" / "model.safetensors")
    assert beside.symbols == ["<s>", "<pad>", "</s>", "<unk>", "|", "E", "T"]
    (tmp_path / "v.json").write_text(json.dumps({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "A": 5}))
    assert checkpoint_vocab(model, tmp_path / "hf", tmp_path / "v.json").symbols[-1] == "A"  # dict_path first
    model.vocab = Vocabulary(["<s>", "<pad>", "</s>", "<unk>", "|", "Z"])
    assert checkpoint_vocab(model, tmp_path / "hf") is model.vocab  # the checkpoint's own before files beside it
    with pytest.raises(CheckpointError, match=r"dictionary .*nope\.txt: no such file"):
        checkpoint_vocab(model, tmp_path / "hf", tmp_path / "nope.txt")


# ----------------------------------------------------------------------------------------------------------------
# No import circles, function-level imports included


def _imports(path: Path, package: str) -> set[str]:
    """Every s3r module `path` imports, at any depth of the file (inside functions too)."""
    name = package + "." + path.stem if path.stem != "__init__" else package
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == package}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative to this module's package
                parent = name if path.stem == "__init__" else name.rpartition(".")[0]
                base = ".".join(filter(None, [parent.rsplit(".", node.level - 1)[0], node.module]))
            if base.split(".")[0] != package:
                continue
            submodules = {f"{base}.{a.name}" for a in node.names if (path.parent / f"{a.name}.py").is_file()}
            found |= submodules or {base}
    return found - {name}


def test_config_names_cover_every_field_and_name_real_hf_fields():
    import dataclasses

    import transformers

    from s3r.checkpoint import CONFIG_NAMES
    assert list(CONFIG_NAMES) == [f.name for f in dataclasses.fields(s3r.model.Wav2Vec2Config)]
    hf = transformers.Wav2Vec2Config()
    plain = [name for _, name in CONFIG_NAMES.values() if name is not None and name.isidentifier()]
    assert len(plain) > 20 and [n for n in plain if not hasattr(hf, n)] == []


def test_no_import_circles():
    root = Path(s3r.model.__file__).parent
    graph = {("s3r." + p.stem if p.stem != "__init__" else "s3r"): _imports(p, "s3r") for p in root.glob("*.py")}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                raise AssertionError("import circle: " + " -> ".join(trail[trail.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, trail + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert graph["s3r.checkpoint"] >= {"s3r.route_format"} and "s3r.routes" not in graph["s3r.checkpoint"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_saved_files_follow_the_umask(tmp_path, umask, mode):
    """A checkpoint (and a route or bundle, written the same way) is readable by whoever the user's umask lets read
    it, as with a plain open(), not always 0600 (mkstemp's mode)."""
    old = os.umask(umask)
    try:
        save_atomic({"x": torch.zeros(1)}, tmp_path / "c.pt")
        with open(tmp_path / "plain", "wb"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c.pt").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == mode
