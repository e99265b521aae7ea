"""Self-supervised pretraining of the miniature's backbone (tools/pretrain_backbone.py), its unlabelled corpus
(tools/pretrain_corpus.py) and the layer probe (tools/probe_backbone.py)."""
import json
import math
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fairseq_fixtures import fairseq_names

from s3r.checkpoint import load_pretrained, torch_load
from s3r.data import ipa_phones
from s3r.model import Wav2Vec2Config, Wav2Vec2ForCTC
from tools import pretrain_backbone, pretrain_corpus, probe_backbone

TINY = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 24,
        "conv_pos_kernel": 4, "conv_pos_groups": 2}


@pytest.fixture(scope="module")
def unlabelled(tiny_corpus, tmp_path_factory) -> Path:
    """A fairseq manifest corpus (train + valid) with every transcript and dictionary deleted."""
    out = tmp_path_factory.mktemp("unlabelled")
    src = tiny_corpus("manifest", num=8, split="train")
    shutil.copytree(src / "audio", out / "audio")
    root = (out / "audio").resolve()
    rows = (src / "train.tsv").read_text().splitlines()[1:]
    (out / "train.tsv").write_text("\n".join([str(root), *rows[:6]]) + "\n")
    (out / "valid.tsv").write_text("\n".join([str(root), *rows[6:]]) + "\n")
    assert not [p for p in out.rglob("*") if p.suffix in (".wrd", ".ltr", ".phn", ".txt")]
    return out


def pretrain(data: Path, out: Path, *extra: str):
    pretrain_backbone.main(["--data", str(data), "--out", str(out), "--save", str(out / "backbone.pt"),
                            "--units", "6", "--kmeans-frames", "400", "--batch-seconds", "3", "--warmup", "2",
                            "--save-every", "2", "--valid-every", "2", "--model-overrides", json.dumps(TINY), *extra])


@pytest.mark.slow
def test_pretraining_without_transcripts_gives_a_hubert_checkpoint_s3r_loads(unlabelled, tmp_path):
    """The whole pretraining runs on audio alone; what it saves is a fairseq HuBERT pretraining checkpoint (keys
    named as in fairseq's HubertModel, pretraining heads included) that load_pretrained reads like a real one."""
    pretrain(unlabelled, tmp_path / "a", "--max-updates", "4")
    ckpt = torch_load(tmp_path / "a" / "backbone.pt")
    assert ckpt["cfg"]["model"]["_name"] == "hubert" and ckpt["cfg"]["task"]["_name"] == "hubert_pretraining"
    assert all(v.dtype == torch.float16 for v in ckpt["model"].values())
    c = Wav2Vec2Config(**{**pretrain_backbone.CONFIG, **TINY})
    hf_like = SimpleNamespace(conv_dim=c.conv_dim, conv_bias=c.conv_bias, feat_extract_norm="group",
                              num_hidden_layers=c.num_hidden_layers)
    heads = {"final_proj.weight", "final_proj.bias", "label_embs_concat"}
    assert set(ckpt["model"]) == set(fairseq_names("hubert", hf_like).values()) | heads
    assert ckpt["model"]["label_embs_concat"].shape == (6, pretrain_backbone.FINAL_DIM)

    model = load_pretrained(tmp_path / "a" / "backbone.pt")  # drops final_proj / label_embs_concat
    trained = Wav2Vec2ForCTC(Wav2Vec2Config(**{**c.to_dict(), "vocab_size": 0}))
    trained.load_state_dict(torch.load(tmp_path / "a" / "state.pt", weights_only=False)["model"])
    wav = torch.randn(1, 8000) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(model(wav)[0], trained.eval()(wav)[0], atol=2e-2, rtol=0)  # fp16 storage
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["updates"] == 4 and report["targets"]["k"] == 6 and report["iteration"] == 1


def test_iteration_two_fits_its_units_on_the_teacher_layer(unlabelled, tmp_path):
    """--label-model: the k-means units are fitted on the named layer of the teacher, whose features
    (hidden_size wide, not the 39 MFCC dimensions) the saved centers have, and the targets name it."""
    pretrain(unlabelled, tmp_path / "it1", "--max-updates", "2")
    teacher = tmp_path / "it1" / "backbone.pt"
    pretrain(unlabelled, tmp_path / "it2", "--max-updates", "0", "--label-model", str(teacher),
             "--label-layer", "1")
    info = torch.load(tmp_path / "it2" / "targets.pt")["info"]
    assert (info["label_model"], info["label_layer"]) == (str(teacher), 1)
    assert info["centers"].shape == (6, TINY["hidden_size"]) and info["k"] == 6


def test_the_committed_self_supervised_backbone_is_a_hubert_pretraining_checkpoint():
    """s3r/assets/miniature/backbone-ssl.pt: fp16, under 5 MB, every tensor named as in fairseq's HubertModel
    (pretraining heads included), its report saying no transcript was read; load_pretrained drops the heads."""
    path = pretrain_backbone.ROOT / "s3r" / "assets" / "miniature" / "backbone-ssl.pt"
    assert path.stat().st_size < 5e6
    ckpt = torch_load(path)
    assert ckpt["cfg"]["model"]["_name"] == "hubert" and ckpt["cfg"]["task"]["labels"] == ["km"]
    assert all(v.dtype == torch.float16 for v in ckpt["model"].values())
    c = Wav2Vec2Config(**pretrain_backbone.CONFIG)
    hf_like = SimpleNamespace(conv_dim=c.conv_dim, conv_bias=c.conv_bias, feat_extract_norm="group",
                              num_hidden_layers=c.num_hidden_layers)
    heads = {"final_proj.weight", "final_proj.bias", "label_embs_concat"}
    assert set(ckpt["model"]) == set(fairseq_names("hubert", hf_like).values()) | heads
    report = ckpt["extra_state"]["miniature"]
    assert "no transcripts" in report["objective"] and report["targets"]["k"] == 100
    model = load_pretrained(path)
    assert model.lm_head is None and 1.5e6 < sum(p.numel() for p in model.parameters()) < 2.5e6
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 16000) * 0.1)[0]).all()


@pytest.mark.slow
def test_interrupted_pretraining_resumes_to_the_same_weights_export_now_included(unlabelled, tmp_path):
    pretrain(unlabelled, tmp_path / "whole", "--max-updates", "3")
    pretrain(unlabelled, tmp_path / "parts", "--max-updates", "3", "--max-minutes", "0")  # stops after update 1
    assert torch.load(tmp_path / "parts" / "state.pt", weights_only=False)["step"] == 1
    pretrain(unlabelled, tmp_path / "parts", "--max-updates", "3", "--export-now")  # a checkpoint of update 1
    assert json.loads((tmp_path / "parts" / "report.json").read_text())["updates"] == 1
    pretrain(unlabelled, tmp_path / "parts", "--max-updates", "3")
    a = torch.load(tmp_path / "whole" / "state.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "parts" / "state.pt", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_missing_manifest_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="no manifest .*train.tsv"):
        pretrain_backbone.main(["--data", str(tmp_path), "--out", str(tmp_path / "o")])


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    true = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in true])
    centers = pretrain_backbone.kmeans(x, 3)
    got = sorted(centers.round().tolist())
    assert got == sorted(true.tolist())
    units = pretrain_backbone.assign_units([x], centers)[0]
    assert units.dtype == torch.uint8 and all(len(set(units[i * 50:(i + 1) * 50].tolist())) == 1 for i in range(3))


def test_only_masked_frames_carry_the_loss():
    """Changing the targets of unmasked frames does not change the loss (HuBERT's pred_nomask_weight 0)."""
    torch.manual_seed(0)
    c = Wav2Vec2Config(**{**pretrain_backbone.CONFIG, **TINY, "vocab_size": 0})
    model, head = Wav2Vec2ForCTC(c), pretrain_backbone.HubertHead(16, 5)
    wav, lengths = torch.randn(2, 16000) * 0.1, torch.tensor([16000, 12000])
    t = [torch.randint(0, 5, (49,)), torch.randint(0, 5, (37,))]
    torch.manual_seed(1)
    loss, _, _, n = pretrain_backbone.hubert_step(model, head, wav, lengths, t)
    torch.manual_seed(1)  # the same masks; flip every target, masked or not, and compare
    from s3r.model import compute_mask_indices
    mask = compute_mask_indices((2, 49), torch.tensor([49, 37]), pretrain_backbone.MASK_PROB,
                                pretrain_backbone.MASK_LENGTH, min_masks=2)
    flipped = [torch.where(mask[b, : len(x)], x, (x + 1) % 5) for b, x in enumerate(t)]
    torch.manual_seed(1)
    loss2, _, _, n2 = pretrain_backbone.hubert_step(model, head, wav, lengths, flipped)
    assert n == n2 == int(mask[0].sum() + mask[1, :37].sum()) and 0 < n < 86
    torch.testing.assert_close(loss, loss2)


def test_hubert_head_logits_are_scaled_cosines():
    head = pretrain_backbone.HubertHead(8, 4)
    x = torch.randn(3, 8)
    p, e = head.final_proj(x), head.label_embs_concat
    want = (p / p.norm(dim=1, keepdim=True)) @ (e / e.norm(dim=1, keepdim=True)).T / 0.1
    torch.testing.assert_close(head(x), want)
    assert head(x).abs().max() <= 10 + 1e-4


# ------------------------------------------------------------------------------------------------ corpus
def test_heldout_clips_are_read_without_their_transcripts(tmp_path, monkeypatch):
    """Only the `path` column is read; a held-out language without a finished corpus is a one-line error."""
    folder = tmp_path / "cv-corpus-mini" / "xx"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("client_id\tpath\tsentence\tphonemes\nc\ta.mp3\tSECRET\tS E\n"
                                      "c\tb.mp3\tSECRET\tS E\n")
    monkeypatch.setattr(pretrain_corpus.text_sources, "HELD_OUT", ["xx"])
    with pytest.raises(SystemExit, match="missing or unfinished"):
        pretrain_corpus.plan_heldout(tmp_path, 0)
    (folder / "DONE").write_text("{}")
    jobs = pretrain_corpus.plan_heldout(tmp_path, 0)
    assert [(Path(j["path"]).name, j["augment"]) for j in jobs] == [("a.mp3", False), ("a.mp3", True),
                                                                    ("b.mp3", False), ("b.mp3", True)]
    assert "SECRET" not in json.dumps(jobs)


def test_noise_is_added_at_the_drawn_snr():
    import random

    import numpy as np
    audio = np.sin(np.arange(16000) / 5.0).astype(np.float32)
    for seed in range(20):
        out, applied = pretrain_corpus.add_noise(audio, random.Random(seed))
        scale = np.abs(out).max() / (np.abs(audio).max() + 1e-6)  # add_noise renormalises the peak at the end
        if "noise" in applied:
            clean = audio * (np.dot(out, audio) / np.dot(audio, audio))
            noise = out - clean
            snr = 10 * math.log10(np.mean(clean ** 2) / np.mean(noise ** 2))
            assert abs(snr - applied["noise"][1]) < 0.5, (applied, snr)
        else:
            np.testing.assert_allclose(out, audio * (np.abs(out).max() / np.abs(audio).max()), atol=1e-5)
        assert 0.3 <= np.abs(out).max() <= 0.95 and scale > 0


def test_synthesised_utterance_is_16khz_with_its_recipe():
    audio, meta = pretrain_corpus.synth_one({"kind": "espeak", "lang": "en", "text": "a short test", "voice": "en",
                                             "variant": "klatt3", "pitch": 40, "wpm": 170, "seed": 3},
                                            tempfile_dir())
    assert audio.dtype.name == "float32" and 0.4 < len(audio) / 16000 < 3
    assert meta["variant"] == "klatt3" and "text" not in meta


def tempfile_dir() -> str:
    import tempfile
    return tempfile.mkdtemp()


# ------------------------------------------------------------------------------------------------ probe
def test_espeak_alignment_has_the_phones_of_espeak_ng_ipa():
    """The phoneme events name the same phones, in order, as `espeak-ng --ipa` prints; they start inside the
    audio, in order."""
    text = "Hola, como estas? Muy bien."
    audio, phones = probe_backbone.speak_aligned(text, "es", "m3", 50, 170)
    cli = subprocess.run(["espeak-ng", "-v", "es+m3", "-q", "--ipa", "--sep=_", text], capture_output=True,
                         text=True, check=True).stdout
    spoken = [p for _, p in phones if p != "sil"]
    assert spoken == [u for u in ipa_phones(cli).split() if u != "|"]
    starts = [s for s, _ in phones]
    assert starts == sorted(starts) and starts[-1] <= len(audio)
    assert 1.0 < len(audio) / 16000 < 4


def test_frame_labels_take_the_phone_under_each_frame_centre():
    # phone a from sample 0, b from 500, c from 1000; frame centres at 200, 520, 840, 1160, 1480
    labels = probe_backbone.frame_labels([(0, "a"), (500, "b"), (1000, "c")], 5)
    assert labels == ["a", "b", "b", "c", "c"]
    assert probe_backbone.frame_labels([(300, "a")], 2) == ["sil", "a"]


def test_pnmi_and_purity_on_hand_counted_cases():
    phones = torch.tensor([0, 0, 1, 1])
    same = probe_backbone.pnmi(torch.tensor([3, 3, 5, 5]), phones)
    assert same == {"pnmi": 1.0, "cluster_purity": 1.0, "phone_purity": 1.0}
    indep = probe_backbone.pnmi(torch.tensor([0, 1, 0, 1]), phones)
    assert indep == {"pnmi": 0.0, "cluster_purity": 0.5, "phone_purity": 0.5}
    one = probe_backbone.pnmi(torch.tensor([0, 0, 0, 1]), phones)  # I = 0.5 ln(4/3) + 0.25 ln(2/3) + 0.25 ln 2
    mi = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    assert one["pnmi"] == pytest.approx(mi / math.log(2), abs=1e-4)
    assert one["cluster_purity"] == 0.75 and one["phone_purity"] == 0.75
    merged = probe_backbone.pnmi(torch.tensor([0, 0, 0, 0]), phones)  # one unit for two phones
    assert merged == {"pnmi": 0.0, "cluster_purity": 1.0, "phone_purity": 0.5}
    split = probe_backbone.pnmi(torch.tensor([0, 1, 2, 3]), phones)  # a unit per frame
    assert split == {"pnmi": 1.0, "cluster_purity": 0.5, "phone_purity": 1.0}


def test_linear_probe_separates_separable_frames():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    x = torch.nn.functional.one_hot(y, 3).float() * 4 + torch.randn(300, 3, generator=g)
    assert probe_backbone.linear_probe(x[:200], y[:200], x[200:], y[200:], 3) > 0.97
    noise = torch.randn(300, 3, generator=g)
    assert probe_backbone.linear_probe(noise[:200], y[:200], noise[200:], y[200:], 3) < 0.55


def test_pretraining_init_keeps_the_conv_features_above_layer_norm_eps():
    """fairseq's kaiming-normal conv init: the 7-conv stack's output keeps a usable scale; PyTorch's default init
    shrinks it far below LayerNorm's eps (1e-5), which hides the audio from the transformer."""
    torch.manual_seed(0)
    c = Wav2Vec2Config(**{**pretrain_backbone.CONFIG, "vocab_size": 0})
    wav = torch.randn(1, 16000) * 0.1
    with torch.no_grad():
        default = Wav2Vec2ForCTC(c).feature_extractor(wav).pow(2).mean()
        fairseq = pretrain_backbone.init_for_pretraining(Wav2Vec2ForCTC(c)).feature_extractor(wav).pow(2).mean()
    assert default < 1e-5 < 1e-2 < fairseq
