"""eval.py: s3r, fairseq and Hugging Face CTC checkpoints; WER and CER recounted on the written hypotheses; errors."""
import json

import pytest
import torch
from torchaudio.functional import edit_distance

import eval as s3r_eval
from s3r import load_pretrained
from s3r.checkpoint import s3r_checkpoint, save_atomic
from s3r.text import Vocabulary

LETTERS = Vocabulary.librispeech()


@pytest.fixture(scope="module")
def fairseq_ctc(tmp_path_factory, fairseq_checkpoint):
    """A CTC-finetuned fairseq checkpoint (random weights, LibriSpeech letters) with dict.ltr.txt beside it."""
    folder = tmp_path_factory.mktemp("fairseq_ctc")
    fairseq_checkpoint(folder / "ctc.pt", vocab_size=len(LETTERS), seed=3)
    LETTERS.save_fairseq_dict(str(folder / "dict.ltr.txt"))
    return folder / "ctc.pt"


def write_hf(model, vocab: Vocabulary, folder):
    """The same model as a Hugging Face Wav2Vec2ForCTC folder: config.json, model.safetensors, vocab.json."""
    from safetensors.torch import save_file
    c = model.config
    folder.mkdir()
    config = {"model_type": "wav2vec2", "architectures": ["Wav2Vec2ForCTC"], "conv_dim": list(c.conv_dim),
              "conv_kernel": list(c.conv_kernel), "conv_stride": list(c.conv_stride), "conv_bias": c.conv_bias,
              "feat_extract_norm": c.feat_extract_norm, "hidden_size": c.hidden_size,
              "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
              "intermediate_size": c.intermediate_size, "hidden_act": "gelu", "do_stable_layer_norm": False,
              "num_conv_pos_embeddings": c.conv_pos_kernel, "num_conv_pos_embedding_groups": c.conv_pos_groups,
              "vocab_size": c.vocab_size, "pad_token_id": 0}
    (folder / "config.json").write_text(json.dumps(config))
    state = {(k if k.startswith("lm_head.") else "wav2vec2." + k): v.contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    hf_symbols = ["<pad>", "<s>", "</s>", "<unk>"] + vocab.symbols[4:]  # HF names index 0 <pad>; it is the blank
    (folder / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(hf_symbols)}))
    return folder


def run_eval(tmp_path, checkpoint, root, *extra) -> tuple[int, dict, list]:
    out, hyp = tmp_path / "out.json", tmp_path / "hyp.tsv"
    code = s3r_eval.main(["--checkpoint", str(checkpoint), "--data", "dev-other", "--data-root", str(root),
                          "--json", str(out), "--hyp", str(hyp), "--num-workers", "0", *map(str, extra)])
    if code:
        return code, {}, []
    rows = [line.split("\t") for line in hyp.read_text(encoding="utf-8").splitlines()]
    return code, json.loads(out.read_text()), rows


def rate(refs: list, hyps: list, split) -> float:
    """Corpus error rate by torchaudio's Levenshtein distance (not the metric code under test)."""
    return sum(edit_distance(split(r), split(h)) for r, h in zip(refs, hyps, strict=True)) / sum(len(split(r))
                                                                                              for r in refs)


def test_s3r_checkpoint_scores_recount_on_the_written_hypotheses(tiny_init, corpus_root, tmp_path):
    model = load_pretrained(tiny_init, prune_rate=0.5, vocab_size=len(LETTERS))
    model.vocab = LETTERS
    save_atomic(s3r_checkpoint(model, pretrained=str(tiny_init)), tmp_path / "s3r.pt")
    code, result, rows = run_eval(tmp_path, tmp_path / "s3r.pt", corpus_root)
    assert code == 0 and result["utterances"] == len(rows) == 4 and all(len(r) == 3 for r in rows)
    refs, hyps = [r[1] for r in rows], [r[2] for r in rows]
    assert result["wer"] == pytest.approx(rate(refs, hyps, str.split), abs=1e-12)
    assert result["cer"] == pytest.approx(rate(refs, hyps, list), abs=1e-12)  # spaces count as characters (jiwer)
    assert all(ref == ref.upper() and ref for ref in refs)  # LibriSpeech transcripts, as fairseq's .wrd
    assert result["decoder"] == "greedy" and result["skipped"] == []


def test_fairseq_and_hf_checkpoints_of_one_model_give_the_same_hypotheses(fairseq_ctc, corpus_root, tmp_path, capsys):
    code, fs, fs_rows = run_eval(tmp_path, fairseq_ctc, corpus_root)  # vocabulary: dict.ltr.txt beside it
    assert code == 0 and fs["utterances"] == 4
    assert any(r[2] for r in fs_rows)  # random weights still say something
    hf_dir = write_hf(load_pretrained(fairseq_ctc), LETTERS, tmp_path / "hf")
    code, hf, hf_rows = run_eval(tmp_path, hf_dir, corpus_root)  # vocabulary: vocab.json
    assert code == 0 and hf_rows == fs_rows and hf["wer"] == fs["wer"]
    assert f"WER {100 * fs['wer']:.2f}%" in capsys.readouterr().out


def test_vocabulary_errors_are_one_line(fairseq_ctc, tiny_init, corpus_root, tmp_path, capsys):
    lone = tmp_path / "lone.pt"
    lone.write_bytes(fairseq_ctc.read_bytes())  # no dict.ltr.txt beside it
    assert run_eval(tmp_path, lone, corpus_root)[0] == 2
    assert run_eval(tmp_path, lone, corpus_root, "--dict", fairseq_ctc.parent / "dict.ltr.txt")[0] == 0
    short = tmp_path / "dict.short.txt"
    short.write_text("A 1\nB 1\n")
    assert run_eval(tmp_path, lone, corpus_root, "--dict", short)[0] == 2
    assert run_eval(tmp_path, tiny_init, corpus_root)[0] == 2  # a pretrained checkpoint has no CTC head
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and "--dict" in errors[0] and "symbols" in errors[1] and "no CTC head" in errors[2]


def test_beam_search_needs_flashlight_text(fairseq_ctc, corpus_root, tmp_path, capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "torchaudio.models.decoder", None)  # as on a machine without flashlight-text
    assert run_eval(tmp_path, fairseq_ctc, corpus_root, "--kenlm", tmp_path / "lm.bin")[0] == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "flashlight-text" in err[0]


def test_lexicon_and_kenlm_beam_search(fairseq_ctc, corpus_root, tmp_path):
    from test_decode import write_lexicon_and_lm
    words = {"THE": -0.5, "BIRCH": -1.0, "CANOE": -1.0, "SLID": -1.0}
    lexicon, lm = write_lexicon_and_lm(tmp_path, words)
    code, out, rows = run_eval(tmp_path, fairseq_ctc, corpus_root, "--lexicon", lexicon, "--kenlm", lm, "--beam", 5)
    assert code == 0 and out["decoder"] == "beam" and len(rows) == 4
    hyp_words = {w for _, _, h in rows for w in h.split()}
    assert hyp_words <= set(words)  # a lexicon beam search spells only lexicon words (random weights: any of them)
    refs, hyps = [r for _, r, _ in rows], [h for _, _, h in rows]
    assert out["wer"] == pytest.approx(rate(refs, hyps, str.split))


@pytest.mark.slow
def test_cli_prints_wer(fairseq_ctc, corpus_root, run_cli, tmp_path):
    res = run_cli("eval.py", "--checkpoint", str(fairseq_ctc), "--data", "dev-other", "--data-root", str(corpus_root),
                  "--json", str(tmp_path / "o.json"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("dev-other: WER ") and json.loads((tmp_path / "o.json").read_text())["utterances"] == 4


@pytest.mark.slow
def test_scores_do_not_depend_on_the_batch_size(tmp_path):
    """The demo backbone has a group-norm first conv: padding an utterance into a longer batch must not change its
    logits, so the hypotheses and scores are the same at any --batch-seconds (1 utterance a batch up to all 24)."""
    from s3r.recipe import DEMO_BACKBONE
    vocab = Vocabulary.from_fairseq_dict(str(DEMO_BACKBONE.parent / "dict.phn.txt"))
    torch.manual_seed(0)
    model = load_pretrained(DEMO_BACKBONE, vocab_size=len(vocab))  # a random head: many frames near a tie
    model.vocab = vocab
    save_atomic(s3r_checkpoint(model), tmp_path / "demo.pt")
    runs = []
    for seconds in (5, 25, 200):
        code = s3r_eval.main(["--checkpoint", str(tmp_path / "demo.pt"), "--data", "demo-test", "--num-workers", "0",
                              "--batch-seconds", str(seconds), "--hyp", str(tmp_path / "hyp.tsv")])
        assert code == 0
        runs.append((tmp_path / "hyp.tsv").read_text(encoding="utf-8"))
    assert len(runs[0].splitlines()) == 24 and any(line.split("\t")[2] for line in runs[0].splitlines())
    assert runs[0] == runs[1] == runs[2]


def test_a_route_and_a_bundle_entry_evaluate_as_their_checkpoint(tiny_init, corpus_root, tmp_path, capsys):
    from s3r.routes import export_route, make_bundle
    model = load_pretrained(tiny_init, prune_rate=0.5, init_score="kaiming_uniform", vocab_size=len(LETTERS))
    model.vocab = LETTERS
    save_atomic(s3r_checkpoint(model, pretrained=str(tiny_init)), tmp_path / "s3r.pt")
    export_route(tmp_path / "s3r.pt", tmp_path / "a.route")
    save_atomic(make_bundle(tiny_init, {"a": tmp_path / "a.route"}), tmp_path / "ab.bundle")
    code, whole, rows = run_eval(tmp_path, tmp_path / "s3r.pt", corpus_root)
    assert code == 0 and len(rows) == 4
    for how in (["--init", tiny_init, "--route", tmp_path / "a.route"], ["--bundle", tmp_path / "ab.bundle",
                                                                          "--route", "a"]):
        code, result, got = run_eval_with(tmp_path, corpus_root, *how)
        assert code == 0 and got == rows and result["wer"] == whole["wer"], how
    capsys.readouterr()
    bad = [["--checkpoint", tmp_path / "a.route"], ["--init", tiny_init], ["--bundle", tmp_path / "ab.bundle"],
           ["--checkpoint", tmp_path / "s3r.pt", "--route", tmp_path / "a.route"],
           ["--bundle", tmp_path / "ab.bundle", "--route", "b"]]
    assert [run_eval_with(tmp_path, corpus_root, *b)[0] for b in bad] == [2] * 5
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 5 and all(line.startswith("error: ") for line in err), err
    assert "--init PRETRAINED --route" in err[0] and "--init needs --route (a route file)" in err[1]
    assert "--bundle needs --route" in err[2] and "not with --checkpoint" in err[3] and "no route 'b'" in err[4]


def run_eval_with(tmp_path, root, *model_flags) -> tuple[int, dict, list]:
    """run_eval with other model flags than --checkpoint."""
    out, hyp = tmp_path / "out.json", tmp_path / "hyp.tsv"
    code = s3r_eval.main(["--data", "dev-other", "--data-root", str(root), "--json", str(out), "--hyp", str(hyp),
                          "--num-workers", "0", *map(str, model_flags)])
    if code:
        return code, {}, []
    return code, json.loads(out.read_text()), [line.split("\t") for line in hyp.read_text().splitlines()]


def test_scoring_a_training_split_says_so(tiny_init, corpus_root, tmp_path, capsys):
    model = load_pretrained(tiny_init, vocab_size=len(LETTERS))
    model.vocab = LETTERS
    save_atomic(s3r_checkpoint(model), tmp_path / "ctc.pt")
    for data in ("train-1h", "dev-other"):
        capsys.readouterr()
        code = s3r_eval.main(["--checkpoint", str(tmp_path / "ctc.pt"), "--data", data, "--data-root",
                              str(corpus_root), "--num-workers", "0"])
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        assert code == 0 and warnings == ([] if data == "dev-other" else [
            "warning: train-1h is a training split: its error rate says how well the model fits what it learned from"])
