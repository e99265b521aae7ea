"""CTC decoding: greedy, beam search, and transcribing a whole loader.

Greedy decoding is what fairseq's `viterbi` w2l decoder and HF's `processor.batch_decode(argmax)` do:
best unit per frame, merge repeats, drop the blank (index 0). Beam search with a lexicon and a KenLM
language model wraps torchaudio's flashlight decoder and is optional. `transcribe` runs a model over a
loader and returns (id, reference, hypothesis) rows; s3r.metrics scores them.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

import torch

from .errors import S3RError
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


@torch.no_grad()
def run_over(model: torch.nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
             autocast: Callable = contextlib.nullcontext):
    """Yield (ids, references, model output) for each batch of `loader`, with the model in eval mode.

    Utterances the loader skipped (skip_bad) are named on stderr.
    """
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            for path, reason in batch["skipped"]:
                print(f"skipped {path}: {reason}", file=sys.stderr)
            if not batch["ids"]:
                continue
            with autocast():
                output = model(batch["wav"].to(device), batch["lengths"].to(device))
            refs = [loader.dataset.utterances[i].text for i in batch["indices"]]  # normalized transcripts
            yield batch["ids"], refs, output
    finally:
        model.train(was_training)


def transcribe(model: torch.nn.Module, loader: torch.utils.data.DataLoader, vocab: Vocabulary, device: torch.device,
               autocast: Callable = contextlib.nullcontext,
               decode: Callable | None = None) -> list[tuple[str, str, str]]:
    """[(id, reference, hypothesis)] for every utterance of `loader` (greedy CTC unless `decode` is given).

    Utterances the loader skipped (skip_bad) are named on stderr; score the rows with s3r.metrics.score.
    """
    decode = decode or (lambda logits, lengths: greedy_decode(logits, lengths, vocab))
    rows = []
    for ids, refs, (logits, lengths) in run_over(model, loader, device, autocast):  # (B, T, V), (B,)
        rows += zip(ids, refs, decode(logits.float(), lengths), strict=True)
    return rows


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
