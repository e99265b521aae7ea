"""CTC decoding: greedy on hand-written paths, transcribe over a real loader, lexicon and KenLM beam search
(flashlight-text, a test requirement), and the error without it.
(Error rates are s3r.metrics', tested in tests/test_metrics.py.)"""
import pytest
import torch

from s3r import S3RError
from s3r.data import make_loader, resolve_corpus
from s3r.decode import BeamSearchDecoder, greedy_decode, transcribe
from s3r.text import Vocabulary


def one_hot_logits(paths: list[str], vocab: Vocabulary) -> torch.Tensor:
    """(B, T, V) logits whose argmax spells each path; '_' is the blank, ' ' the word separator."""
    T = max(map(len, paths))
    logits = torch.full((len(paths), T, len(vocab)), -5.0)
    for b, path in enumerate(paths):
        for t, ch in enumerate(path.ljust(T, "_")):
            logits[b, t, 0 if ch == "_" else vocab.index["|" if ch == " " else ch]] = 5.0
    return logits


def test_greedy_collapses_repeats_and_drops_blank():
    vocab = Vocabulary.librispeech()
    logits = one_hot_logits(["HH_EE_LL_LLOO  WWOORRLDD", "__AA_A__", "NO"], vocab)
    lengths = torch.tensor([logits.shape[1], 8, 1])  # the third is cut after one frame
    assert greedy_decode(logits, lengths, vocab) == ["HELLO WORLD", "AA", "N"]
    assert greedy_decode(logits[:1], None, vocab) == ["HELLO WORLD"]


class Spell(torch.nn.Module):
    """A stand-in CTC model: (wav, lengths) -> (B, 3, V) logits spelling "AB" in every row, and lengths 3."""

    def __init__(self, vocab: Vocabulary):
        super().__init__()
        self.vocab, self.calls = vocab, []

    def forward(self, wav, lengths):
        self.calls.append(self.training)
        return one_hot_logits(["A_B"] * wav.shape[0], self.vocab), torch.full_like(lengths, 3)


def test_transcribe_rows_follow_the_loader(tiny_corpus):
    corpus = resolve_corpus("dev-clean", str(tiny_corpus("librispeech", num=5, split="dev-clean")))
    vocab = Vocabulary.librispeech()
    loader = make_loader(corpus.utterances, vocab, 16000 * 8, train=False, num_workers=0)
    model = Spell(vocab).train()
    rows = transcribe(model, loader, vocab, torch.device("cpu"))
    assert sorted(rows) == sorted((u.id, u.text, "AB") for u in corpus.utterances)
    assert model.calls and not any(model.calls) and model.training  # eval inside, mode restored
    seen = []
    rows = transcribe(model, loader, vocab, torch.device("cpu"),
                      decode=lambda logits, lengths: seen.append(logits.dtype) or ["x"] * len(logits))
    assert {h for _, _, h in rows} == {"x"} and set(seen) == {torch.float32}


def test_beam_search_without_flashlight_names_the_package(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "torchaudio.models.decoder", None)  # import fails as if flashlight were absent
    with pytest.raises(S3RError, match="install flashlight-text"):
        BeamSearchDecoder(Vocabulary.librispeech())


def test_lexicon_free_beam_search_equals_greedy_on_one_hot_logits():
    vocab = Vocabulary.librispeech()
    logits = one_hot_logits(["HH_EE_LL_LLOO  WWOORRLDD"], vocab)
    assert BeamSearchDecoder(vocab, beam_size=5, lm_weight=0)(logits) == ["HELLO WORLD"]


def soft_logits(frames: list[dict[str, float]], vocab: Vocabulary) -> torch.Tensor:
    """(1, T, V) log-probabilities: each frame's listed units get their probability, the rest share 1e-4."""
    logits = torch.full((1, len(frames), len(vocab)), 1e-4)
    for t, probs in enumerate(frames):
        for unit, p in probs.items():
            logits[0, t, 0 if unit == "_" else vocab.index["|" if unit == " " else unit]] = p
    return logits.log()


def write_lexicon_and_lm(tmp_path, words: dict[str, float]):
    """A lexicon spelling each word, and an ARPA bigram model (KenLM needs order 2 or more) in which a sentence's
    first word has the given log10 probability."""
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text("".join(f"{w}\t{' '.join(w)} |\n" for w in words))
    unigrams = {"<s>": -99.0, "</s>": -1.0, "<unk>": -99.0, **words}
    bigrams = {f"<s> {w}": p for w, p in words.items()}
    lm = tmp_path / "lm.arpa"
    lm.write_text(f"\\data\\\nngram 1={len(unigrams)}\nngram 2={len(bigrams)}\n\n\\1-grams:\n"
                  + "".join(f"{p}\t{w}\t0.0\n" for w, p in unigrams.items())
                  + "\n\\2-grams:\n" + "".join(f"{p}\t{w}\n" for w, p in bigrams.items()) + "\n\\end\\\n")
    return lexicon, lm


def test_lexicon_beam_search_spells_only_lexicon_words(tmp_path):
    vocab = Vocabulary.librispeech()
    # greedy reads "CAB" (B at 0.6 over D at 0.4); the lexicon has CAD but no CAB
    frames = [{"C": 0.9}, {"_": 0.9}, {"A": 0.9}, {"_": 0.9}, {"B": 0.6, "D": 0.39}, {"_": 0.9}]
    logits = soft_logits(frames, vocab)
    assert greedy_decode(logits, None, vocab) == ["CAB"]
    lexicon, lm = write_lexicon_and_lm(tmp_path, {"CAD": -1.0, "CAT": -1.0})
    assert BeamSearchDecoder(vocab, str(lexicon), str(lm), beam_size=10, lm_weight=0.0)(logits) == ["CAD"]


def test_kenlm_weight_decides_between_equally_likely_words(tmp_path):
    vocab = Vocabulary.librispeech()
    frames = [{"C": 0.9}, {"_": 0.9}, {"A": 0.9}, {"_": 0.9}, {"T": 0.45, "D": 0.45}, {"_": 0.9}]
    logits = soft_logits(frames, vocab)
    for likely, unlikely in (("CAT", "CAD"), ("CAD", "CAT")):
        lexicon, lm = write_lexicon_and_lm(tmp_path, {likely: -0.1, unlikely: -3.0})
        assert BeamSearchDecoder(vocab, str(lexicon), str(lm), beam_size=10, lm_weight=1.0)(logits) == [likely]
