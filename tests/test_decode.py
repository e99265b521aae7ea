"""Greedy CTC decoding and error rates, checked against jiwer."""
import random

import jiwer
import pytest
import torch

from s3r import S3RError
from s3r.decode import BeamSearchDecoder, error_rates, greedy_decode, unit_error_rate
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


def random_sentences(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "zażółć", "你好"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(0, 6))) for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_rates_equal_jiwer(seed):
    refs = [r or "x" for r in random_sentences(seed, 20)]
    hyps = random_sentences(seed + 100, 20)  # includes empty hypotheses
    rates = error_rates(refs, hyps)
    assert rates["wer"] == pytest.approx(jiwer.wer(refs, hyps))
    assert rates["cer"] == pytest.approx(jiwer.cer(refs, hyps))
    assert rates["words"] == sum(len(r.split()) for r in refs)
    assert error_rates(refs, refs)["wer"] == 0.0


def test_error_rates_input_checks():
    with pytest.raises(S3RError, match="2 references but 1"):
        error_rates(["a", "b"], ["a"])
    assert error_rates([], [])["wer"] == 0.0


def test_unit_error_rate():
    # phones: "|" is a word boundary, not scored; one deletion out of 4 phones
    assert unit_error_rate(["h ə | l oʊ"], ["h | l oʊ"]) == pytest.approx(0.25)
    assert unit_error_rate(["h ə | l oʊ"], ["h ə l oʊ"]) == 0.0
    # characters: spaces are not units; 1 deletion + 1 substitution over 4 + 2 characters
    assert unit_error_rate(["你好世界", "ab"], ["你好 世", "ac"], units="char") == pytest.approx(2 / 6)
    with pytest.raises(S3RError):
        unit_error_rate(["a"], ["a"], units="word")


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
