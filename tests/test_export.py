"""Hugging Face and dense exports (s3r/export.py): transformers reloads them with the same logits."""
import json

import pytest
import torch
import transformers

from s3r import Wav2Vec2Config, Wav2Vec2ForCTC, load_pretrained
from s3r.checkpoint import s3r_checkpoint, save_atomic
from s3r.export import export_hf, main

VARIANTS = {  # our config overrides -> the transformers class that must reproduce it
    "wav2vec2-base": ({}, "Wav2Vec2ForCTC"),
    "wav2vec2-large": (dict(feat_extract_norm="layer", conv_bias=True, layer_norm_first=True), "Wav2Vec2ForCTC"),
    "hubert": (dict(feat_proj_layer_norm=False), "HubertForCTC"),
    "data2vec-audio": (dict(feat_extract_norm="layer", conv_bias=True, conv_pos_kernel=3, conv_pos_depth=2),
                       "Data2VecAudioForCTC"),
}


def hf_logits(directory, wav):
    model = transformers.AutoModelForCTC.from_pretrained(directory).eval()
    with torch.no_grad():
        return model, model(wav).logits


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_export_same_logits(variant, tmp_path, tiny_arch, tiny_vocab, train_route):
    overrides, cls = VARIANTS[variant]
    torch.manual_seed(0)
    save_atomic(s3r_checkpoint(Wav2Vec2ForCTC(Wav2Vec2Config(**{**tiny_arch, **overrides}))), tmp_path / "pre.pt")
    # route the positional conv too, so folding a mask into weight norm (g, v) is exercised
    model = train_route(tmp_path / "pre.pt", seed=3, prune_rate=0.6, steps=2, route_pos_conv=True)
    save_atomic(s3r_checkpoint(model, pretrained=str(tmp_path / "pre.pt")), tmp_path / "routed.pt")
    wav = torch.randn(2, 1600)
    with torch.no_grad():
        ours = model(wav)[0]
    assert main(["--hf", str(tmp_path / "hf"), "--dense", str(tmp_path / "dense.pt"), str(tmp_path / "routed.pt")]) \
        is None
    hf, theirs = hf_logits(tmp_path / "hf", wav)
    assert type(hf).__name__ == cls
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    zeros = hf.state_dict()[f"{hf.base_model_prefix}.encoder.layers.0.attention.q_proj.weight"] == 0
    assert zeros.sum() == model.masks()["encoder.layers.0.attention.q_proj.weight"].logical_not().sum()
    again = load_pretrained(tmp_path / "hf")  # and s3r reads its own export back
    with torch.no_grad():
        torch.testing.assert_close(again(wav)[0], ours, atol=1e-5, rtol=1e-5)
    assert again.vocab.symbols[4:] == tiny_vocab.symbols[4:]
    dense = load_pretrained(tmp_path / "dense.pt")
    assert dense.route_config is None and dense.vocab == tiny_vocab
    with torch.no_grad():
        torch.testing.assert_close(dense(wav)[0], ours, atol=1e-5, rtol=1e-5)


def test_hf_directory_has_no_unused_or_missing_keys_and_a_processor(tmp_path, tiny_arch, train_route):
    torch.manual_seed(0)
    save_atomic(s3r_checkpoint(Wav2Vec2ForCTC(Wav2Vec2Config(**tiny_arch))), tmp_path / "pre.pt")
    model = train_route(tmp_path / "pre.pt", seed=4, prune_rate=0.8, steps=1)
    export_hf(model, tmp_path / "hf")
    _, info = transformers.Wav2Vec2ForCTC.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    processor = transformers.Wav2Vec2Processor.from_pretrained(tmp_path / "hf")
    vocab = json.loads((tmp_path / "hf" / "vocab.json").read_text())
    assert vocab["<pad>"] == 0 and vocab["|"] == 4 and processor.tokenizer.pad_token_id == 0
    ids = [[0, 5, 5, 0, 6, 4, 0, 5]]  # blank a a blank b | blank a
    assert processor.batch_decode(ids)[0] == "ab a"


def test_dense_export_from_pretrained_and_route(route_files, tmp_path):
    """`--route ROUTE` on the shared weights exports the same model as the routed checkpoint itself."""
    assert main(["--dense", str(tmp_path / "dense.pt"), str(route_files / "pretrained.pt"), "--route",
                 str(route_files / "a.route")]) is None
    wav = torch.randn(2, 1600)
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "dense.pt")(wav)[0],
                                   load_pretrained(route_files / "a.pt")(wav)[0], atol=1e-6, rtol=1e-6)


@pytest.mark.slow  # a fresh interpreter imports torch: seconds on a shared machine
def test_export_errors_are_one_line(tmp_path, run_cli, tiny_arch):
    torch.manual_seed(0)
    save_atomic(s3r_checkpoint(Wav2Vec2ForCTC(Wav2Vec2Config(**tiny_arch))), tmp_path / "headless.pt")
    r = run_cli("-m", "s3r.export", "--hf", str(tmp_path / "hf"), str(tmp_path / "headless.pt"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert "no CTC head" in r.stderr


def test_a_phone_vocabulary_decodes_in_transformers_as_in_s3r(tmp_path, tiny_arch):
    """transformers' own tokenizer for phones (Wav2Vec2PhonemeCTCTokenizer) spells the exported model's greedy
    output as s3r does: phones separated by spaces, "|" between words (Wav2Vec2CTCTokenizer would glue them)."""
    from s3r.decode import greedy_decode
    from s3r.text import Vocabulary
    vocab = Vocabulary.build(["a l | i ŋ ɡ ɾ a", "t o | k o n | tʃ e"], units="phone")
    assert vocab.units == "phone" and "tʃ" in vocab.symbols
    torch.manual_seed(0)
    model = Wav2Vec2ForCTC(Wav2Vec2Config(**{**tiny_arch, "vocab_size": len(vocab)})).eval()
    with torch.no_grad():  # a head that says something: every unit somewhere in 40 frames
        model.lm_head.bias.copy_(torch.randn(len(vocab)) * 3)
        model.lm_head.bias[1:4] = -1e4  # <s> </s> <unk> (HF's names): never said (HF would spell them, s3r not)
    model.vocab = vocab
    export_hf(model, tmp_path / "hf")
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    assert type(processor.tokenizer).__name__ == "Wav2Vec2PhonemeCTCTokenizer"
    ids = [[0, 5, 5, 0, 4, 9, 0, 9, 4]]  # blank a a blank | k blank k |
    expected = " ".join(vocab.symbols[i] for i in (5, 4, 9, 9, 4))
    assert processor.batch_decode(ids) == [vocab.decode([5, 4, 9, 9, 4])] == [expected]
    wav = torch.randn(3, 4000)
    hf, logits = hf_logits(tmp_path / "hf", wav)
    theirs = processor.batch_decode(logits.argmax(-1))
    assert theirs == greedy_decode(model(wav)[0].detach(), None, vocab) and any(" " in t for t in theirs), theirs
