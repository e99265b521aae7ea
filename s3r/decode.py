"""CTC decoding and error rates.

Greedy decoding is what fairseq's `viterbi` w2l decoder and HF's `processor.batch_decode(argmax)` do:
best unit per frame, merge repeats, drop the blank (index 0). Word and character error rates come from
jiwer (the same Levenshtein alignment everyone reports). `unit_error_rate` is the phone / character
error rate used for CommonVoice (upstream's "UER"). Beam search with a lexicon and a KenLM language model
wraps torchaudio's flashlight decoder and is optional.
"""
import jiwer
import torch

from . import S3RError
from .text import Vocabulary


def greedy_decode(logits: torch.Tensor, lengths: torch.Tensor | None, vocab: Vocabulary) -> list[str]:
    """Best path decoding of (B, T, V) CTC logits; frames past `lengths` (B,) are ignored."""
    best = logits.argmax(-1).cpu()  # (B, T)
    texts = []
    for b in range(best.shape[0]):
        path = best[b, : int(lengths[b])] if lengths is not None else best[b]
        units = torch.unique_consecutive(path)  # "HH_EE_LL_LL" -> "H_E_L_L": a blank separates real repeats
        texts.append(vocab.decode(units[units != 0].tolist()))
    return texts


def error_rates(refs: list[str], hyps: list[str]) -> dict:
    """Corpus-level WER and CER (errors summed over utterances / reference words or characters).

    Empty references are allowed (every hypothesis word is then an insertion), as are empty hypotheses.
    """
    if len(refs) != len(hyps):
        raise S3RError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        return {"wer": 0.0, "cer": 0.0, "words": 0, "chars": 0, "substitutions": 0, "deletions": 0, "insertions": 0}
    words = jiwer.process_words(refs, hyps)
    chars = jiwer.process_characters(refs, hyps)
    return {"wer": words.wer, "cer": chars.cer,
            "words": words.hits + words.substitutions + words.deletions,  # reference word count
            "chars": chars.hits + chars.substitutions + chars.deletions,
            "substitutions": words.substitutions, "deletions": words.deletions, "insertions": words.insertions}


def unit_error_rate(refs: list[str], hyps: list[str], units: str = "phone") -> float:
    """Edit distance over units / number of reference units, summed over the corpus.

    units="phone": transcripts are space separated phones ("h ə l oʊ | w ɜː l d"); the word boundary `|`
    is not a phone and is not scored. units="char": every non-space character is one unit, the usual
    metric for languages written without spaces (Mandarin, Japanese).
    """
    def split(text: str) -> str:
        toks = [t for t in text.split() if t != "|"] if units == "phone" else [c for c in text if not c.isspace()]
        return " ".join(toks)  # jiwer aligns whitespace-separated tokens

    if units not in ("phone", "char"):
        raise S3RError(f"unit_error_rate: units must be 'phone' or 'char', not {units!r}")
    return jiwer.wer([split(r) for r in refs], [split(h) for h in hyps]) if refs else 0.0


class BeamSearchDecoder:
    """Lexicon + KenLM beam search over CTC logits (torchaudio's flashlight-text decoder)."""

    def __init__(self, vocab: Vocabulary, lexicon: str | None = None, lm: str | None = None,
                 beam_size: int = 50, lm_weight: float = 2.0, word_score: float = -1.0):
        try:
            from torchaudio.models.decoder import ctc_decoder
        except (ImportError, RuntimeError):  # torchaudio raises RuntimeError when flashlight-text is absent
            raise S3RError("install flashlight-text for beam search (pip install flashlight-text; "
                           "and kenlm for a language model)") from None
        if vocab.units not in ("letter", "char"):
            raise S3RError(f"beam search needs letter or character units, not {vocab.units!r}")
        self.vocab, self.lexicon = vocab, lexicon
        self.decoder = ctc_decoder(lexicon=lexicon, tokens=vocab.symbols, lm=lm, beam_size=beam_size,
                                   lm_weight=lm_weight, word_score=word_score, blank_token=vocab.symbols[0],
                                   sil_token=vocab.word_sep or "|", unk_word="<unk>")

    def __call__(self, logits: torch.Tensor, lengths: torch.Tensor | None = None) -> list[str]:
        emissions = logits.float().log_softmax(-1).cpu()  # (B, T, V); flashlight wants float32 on CPU
        lengths = lengths.int().cpu() if lengths is not None else None
        hyps = self.decoder(emissions, lengths)
        if self.lexicon:
            return [" ".join(h[0].words) for h in hyps]
        return [self.vocab.decode(h[0].tokens.tolist()) for h in hyps]  # lexicon-free: spell out the units
