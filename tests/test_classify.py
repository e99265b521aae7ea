"""s3r/classify.py: the utterance classifier against transformers' Wav2Vec2ForSequenceClassification (random weights,
padded batches), its exports, and routes of both head kinds in one bundle.

Peers: transformers (logits of the same weights; HF pools with its attention mask, so the padded batch is compared
with HF given that mask, and each utterance alone with HF on that utterance alone), and the checkpoints the routes
were exported from (a bundle must reproduce each exactly).
"""
from dataclasses import replace

import fairseq_fixtures as ff
import pytest
import torch
import transformers as tf

from s3r import fast
from s3r.analysis import compare
from s3r.checkpoint import load_pretrained, s3r_checkpoint, save_atomic
from s3r.classify import Wav2Vec2ForSequenceClassification, new_model, with_head
from s3r.errors import ConfigError
from s3r.export import export_hf
from s3r.model import RouteConfig, Wav2Vec2Config, Wav2Vec2ForCTC
from s3r.routes import load_bundle, make_bundle, masks_of, route_from_model

TOL = 1e-4
LABELS = ("yes", "no", "up", "_unknown_", "_silence_")
HF_CLASS = {"base": tf.Wav2Vec2ForSequenceClassification, "large": tf.Wav2Vec2ForSequenceClassification,
            "data2vec": tf.Data2VecAudioForSequenceClassification, "hubert": tf.HubertForSequenceClassification}


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    wav = torch.randn(3, 2400, generator=g)
    lengths = torch.tensor([2400, 1777, 1003])
    for b in range(3):
        wav[b, lengths[b]:] = 0
    return wav, lengths


def hf_classifier(variant: str, weighted: bool, seed: int = 0):
    cfg = ff.hf_config(variant)
    cfg.num_labels, cfg.classifier_proj_size, cfg.use_weighted_layer_sum = len(LABELS), 7, weighted
    cfg.id2label = dict(enumerate(LABELS))
    cfg.label2id = {name: i for i, name in enumerate(LABELS)}
    torch.manual_seed(seed)
    return ff.perturb_(HF_CLASS[variant](cfg), seed).eval()


@torch.no_grad()
def max_diff(ours, peer, wav, lengths, padded_peer: bool = False) -> float:
    """|ours - HF| for our padded batch and each utterance alone, both against HF on the utterance alone (HF's group
    norm and data2vec's positional convs read the padding, s3r's do not); `padded_peer`: also against HF's padded
    batch given its attention mask (layer-norm wav2vec2, whose padding HF handles exactly)."""
    mask = (torch.arange(wav.shape[1])[None, :] < lengths[:, None]).long()
    logits, frames = ours(wav, lengths)
    assert logits.shape == (len(lengths), len(LABELS))
    diffs = [(logits - peer(wav, attention_mask=mask).logits).abs().max().item()] if padded_peer else []
    for b in range(len(lengths)):
        want = peer(wav[b: b + 1, : lengths[b]]).logits
        alone, _ = ours(wav[b: b + 1, : lengths[b]])
        diffs += [(alone - want).abs().max().item(), (logits[b] - want[0]).abs().max().item()]
    return max(diffs)


@pytest.mark.parametrize("weighted", [False, True], ids=["last", "weighted"])
@pytest.mark.parametrize("variant", ff.VARIANTS)
def test_matches_transformers(tmp_path, batch, variant, weighted):
    peer = hf_classifier(variant, weighted)
    peer.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert isinstance(model, Wav2Vec2ForSequenceClassification)
    assert model.config.labels == LABELS and model.config.classifier_proj_size == 7
    assert (model.layer_weights is not None) == weighted
    assert max_diff(model, peer, *batch, padded_peer=variant == "large") < TOL


def test_parity_can_fail(tmp_path, batch):
    """One perturbed projector bias is visible far above the tolerance (the check has teeth)."""
    peer = hf_classifier("base", True)
    peer.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    with torch.no_grad():
        model.projector.bias[0] += 0.05
    assert max_diff(model, peer, *batch) > 10 * TOL


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_padding_never_counts(batch, norm):
    """An utterance's logits do not depend on what pads it: the same in a batch as alone, whatever the pad values."""
    wav, lengths = batch
    model = new_model(Wav2Vec2Config(**ff.CONV, **ff.SIZES, feat_extract_norm=norm, labels=LABELS,
                                     use_weighted_layer_sum=True)).eval()
    noisy = wav.clone()
    noisy[2, lengths[2]:] = 5.0
    with torch.no_grad():
        logits, _ = model(noisy, lengths)
        alone, _ = model(wav[2:, : lengths[2]])
    assert (logits[2] - alone[0]).abs().max() < 1e-5


@pytest.mark.parametrize("variant", ["base", "large"])
def test_export_reloads_in_transformers(tmp_path, batch, variant):
    """A routed classifier exported with --hf: transformers' AutoModelForAudioClassification gives our logits."""
    peer = hf_classifier(variant, variant == "large")
    peer.save_pretrained(tmp_path / "in")
    model = load_pretrained(tmp_path / "in", prune_rate=0.5, fix_attn=False, init_score="kaiming_uniform")
    with torch.no_grad():
        want, _ = model(*batch)
    export_hf(model, tmp_path / "out")
    hf = tf.AutoModelForAudioClassification.from_pretrained(tmp_path / "out").eval()
    assert type(hf) is type(peer)
    assert hf.config.id2label == dict(enumerate(LABELS))
    mask = (torch.arange(batch[0].shape[1])[None, :] < batch[1][:, None]).long()
    with torch.no_grad():
        got = hf(batch[0], attention_mask=mask).logits
        alone = torch.cat([hf(batch[0][b: b + 1, : batch[1][b]]).logits for b in range(3)])
    assert (alone - want).abs().max() < TOL
    if variant == "large":  # layer norms only: HF's padded batch is exact too
        assert (got - want).abs().max() < TOL
    # and back: the exported directory loads into s3r as the same classifier
    assert max_diff(load_pretrained(tmp_path / "out"), hf, *batch) < TOL


def test_routing_trains_scores_and_head_only(batch):
    model = new_model(Wav2Vec2Config(**ff.CONV, **ff.SIZES, labels=LABELS, use_weighted_layer_sum=True))
    model.route(RouteConfig(prune_rate=0.5, fix_attn=False))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trained if not n.endswith(".scores")} == {
        "projector.weight", "projector.bias", "classifier.weight", "classifier.bias", "layer_weights"}
    assert len([n for n in trained if n.endswith(".scores")]) == 2 * 6  # q/k/v/out, fc1/fc2 of 2 layers
    frozen_head = new_model(model.config).route(RouteConfig(trainable_proj=False))
    assert not any(p.requires_grad for n, p in frozen_head.named_parameters() if not n.endswith(".scores"))
    logits, _ = model(*batch)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3, 4])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trained)


@pytest.mark.parametrize("granularity", ["weight", "neuron+head"])
def test_speed_paths_match_the_reference(batch, granularity):
    """fast.py (packed frames, cached masks, one utterance at a time through the extractor) gives the reference's
    logits on a classifier."""
    torch.manual_seed(0)
    model = new_model(Wav2Vec2Config(**ff.CONV, **ff.SIZES, labels=LABELS, layerdrop=0.0)).eval()
    model.route(RouteConfig(prune_rate=0.5, fix_attn=False, route_granularity=granularity))
    with torch.no_grad():
        fast.set_enabled(True)
        quick, _ = model(*batch)
        fast.set_enabled(False)
        try:
            slow, _ = model(*batch)
        finally:
            fast.set_enabled(True)
    assert (quick - slow).abs().max() < 1e-5


def test_labels_are_required_and_no_ctc_head():
    with pytest.raises(ConfigError, match="labels"):
        Wav2Vec2ForSequenceClassification(Wav2Vec2Config(**ff.CONV, **ff.SIZES))
    model = new_model(Wav2Vec2Config(**ff.CONV, **ff.SIZES, labels=LABELS))
    with pytest.raises(ConfigError, match="no CTC head"):
        model.set_vocab_size(5)
    assert type(new_model(Wav2Vec2Config(**ff.CONV, **ff.SIZES))) is Wav2Vec2ForCTC


# ----------------------------------------------------------------------------------------------------------------
# Both kinds of route over the same weights


def _train(model, seed: int, kind: str, steps: int = 3):
    """A few sign-descent steps on random targets, so the scores and the head are not their initial values."""
    torch.manual_seed(seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    wav = torch.randn(2, 2000)
    for _ in range(steps):
        out, lengths = model(wav)
        if kind == "ctc":
            targets = torch.randint(1, model.config.vocab_size, (2, 3))
            loss = torch.nn.functional.ctc_loss(out.log_softmax(-1).transpose(0, 1), targets, lengths,
                                                torch.full((2,), 3), zero_infinity=True)
        else:
            loss = torch.nn.functional.cross_entropy(out, torch.tensor([0, 2]))
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(0.05 * g.sign())
    return model.eval()


@pytest.fixture(scope="module")
def two_kinds(tmp_path_factory):
    """pretrained.pt (a headless backbone), asr.pt (CTC, 9 outputs) and kws.pt (classification) trained on it in mask
    mode with different prune rates, and their routes."""
    d = tmp_path_factory.mktemp("kinds")
    torch.manual_seed(0)
    save_atomic(s3r_checkpoint(Wav2Vec2ForCTC(Wav2Vec2Config(**ff.CONV, **ff.SIZES, layerdrop=0.0))),
                d / "pretrained.pt")
    asr = load_pretrained(d / "pretrained.pt", prune_rate=0.7, vocab_size=9, fix_attn=False,
                          init_score="kaiming_uniform")
    base = load_pretrained(d / "pretrained.pt")
    kws = with_head(base, replace(base.config, labels=LABELS, classifier_proj_size=6, use_weighted_layer_sum=True))
    kws.route(RouteConfig(prune_rate=0.5, init_score="kaiming_uniform", trainable_layer_norm=True))
    for name, model, kind in (("asr", asr, "ctc"), ("kws", kws, "classification")):
        _train(model, seed=len(name), kind=kind)
        save_atomic(s3r_checkpoint(model, pretrained=str(d / "pretrained.pt")), d / f"{name}.pt")
        save_atomic(route_from_model(model, str(d / f"{name}.pt")), d / f"{name}.route")
    return d


def test_checkpoint_round_trip_keeps_the_kind(two_kinds, batch):
    """A mask-mode classifier checkpoint stores only what trained plus the pretrained path, and loads back as one."""
    ckpt = torch.load(two_kinds / "kws.pt", weights_only=True)
    assert "projector.weight" in ckpt["model"] and "encoder.layers.0.feed_forward.output_dense.weight" not in \
        ckpt["model"]
    model = load_pretrained(two_kinds / "kws.pt")
    assert isinstance(model, Wav2Vec2ForSequenceClassification) and model.config.labels == LABELS
    again = load_pretrained(two_kinds / "pretrained.pt", route=two_kinds / "kws.route")
    with torch.no_grad():
        assert torch.equal(model(*batch)[0], again(*batch)[0])


def test_bundle_switches_between_kinds_exactly(two_kinds, tmp_path, batch):
    bundle_path = tmp_path / "both.bundle"
    save_atomic(make_bundle(two_kinds / "pretrained.pt", {"asr": two_kinds / "asr.route",
                                                          "kws": two_kinds / "kws.route"}), bundle_path)
    bundle = load_bundle(bundle_path)
    want = {name: load_pretrained(two_kinds / f"{name}.pt") for name in ("asr", "kws")}
    with torch.no_grad():
        expected = {name: m(*batch)[0] for name, m in want.items()}
        for name in ("kws", "asr", "kws", "asr"):  # there and back twice: nothing of one route leaks into the other
            model = bundle.use(name)
            assert type(model) is type(want[name])
            assert bundle.kind(name) == ("classification" if name == "kws" else "ctc")
            assert torch.equal(model(*batch)[0], expected[name]), name
    assert bundle.use("kws").config.labels == LABELS and bundle.use("asr").vocab is None


def test_info_counts_each_kind(two_kinds, tmp_path, run_cli):
    save_atomic(make_bundle(two_kinds / "pretrained.pt", {"asr": two_kinds / "asr.route",
                                                          "kws": two_kinds / "kws.route"}), tmp_path / "b.bundle")
    out = run_cli("-m", "s3r.routes", "info", str(tmp_path / "b.bundle"))
    assert out.returncode == 0, out.stderr
    route = torch.load(two_kinds / "kws.route", weights_only=True)
    head = (32 + 1) * 6 + (6 + 1) * len(LABELS) + 3  # projector, classifier, layer_weights (2 layers + 1)
    assert f"classification head {len(LABELS)} labels ({head:,} params)" in out.stdout
    assert "ctc head 9 outputs" in out.stdout
    norms = sum(t.numel() for k, t in route["tensors"].items() if "layer_norm" in k)
    bits = sum(e["bits"].numel() for e in route["layers"].values())
    assert f"classification: 1 route(s), masks {bits:,} B, heads and other trained tensors {4 * (head + norms):,} B" \
        in out.stdout


def test_mask_similarity_across_kinds(two_kinds):
    """Routes of a CTC task and a classification task compare layer by layer (the masks alone are read)."""
    a, b = masks_of(two_kinds / "asr.route"), masks_of(two_kinds / "kws.pt")
    result = compare(a, b)
    ffn = [k for k in a if ".feed_forward." in k]
    assert set(b) == set(ffn) and set(result["layers"]) == set(ffn)  # kws routed the FFN only (fix_attn)
    assert 0 < result["overall"]["cosine"] < 1


def test_compact_keeps_a_classifier(batch):
    """A neuron+head route cut into the smaller dense model (s3r/compact.py) stays a classifier with the same logits."""
    from s3r.compact import compact

    torch.manual_seed(0)
    model = new_model(Wav2Vec2Config(**ff.CONV, **ff.SIZES, labels=LABELS, use_weighted_layer_sum=True)).eval()
    model.route(RouteConfig(prune_rate=0.5, fix_attn=False, route_granularity="neuron+head"))
    small = compact(model)
    assert isinstance(small, Wav2Vec2ForSequenceClassification) and small.config.labels == LABELS
    assert small.config.intermediate_sizes is not None
    with torch.no_grad():
        assert (small(*batch)[0] - model(*batch)[0]).abs().max() < 1e-5
