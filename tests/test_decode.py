"""CTC decoding: greedy on hand-written paths, transcribe over a real loader, beam search's dependency.
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


def test_beam_search_needs_flashlight():
    try:
        from torchaudio.models.decoder import ctc_decoder  # noqa: F401
    except (ImportError, RuntimeError):
        with pytest.raises(S3RError, match="install flashlight-text"):
            BeamSearchDecoder(Vocabulary.librispeech())
        return
    vocab = Vocabulary.librispeech()  # flashlight present: lexicon-free beam search equals greedy on one-hot logits
    logits = one_hot_logits(["HH_EE_LL_LLOO  WWOORRLDD"], vocab)
    assert BeamSearchDecoder(vocab, beam_size=5, lm_weight=0)(logits) == ["HELLO WORLD"]
