"""Error rates of transcripts against references, summed over the corpus (errors / reference units).

- `error_rates`: WER over whitespace words and CER over characters, spaces included (jiwer's definitions).
- `uer`: fairseq's CTC criterion (`fairseq/criterions/ctc.py`), the metric upstream S3-Router selects its best
  checkpoint on (`best_checkpoint_metric=uer`): edit distance over the unit ids of the CTC output against the
  target's unit ids, summed, over the targets' unit count. The target is the label line with pad and eos
  removed: for letters a `.ltr` line, "H I | Y O U |", so the word separator `|` counts, after every word
  including the last; the prediction is argmax, repeats merged, blank removed.
- `per`: phone error rate without the separator, the number phone-recognition papers report (Rivière et
  al. 2020, XLSR): "h ə | l oʊ" is 4 phones.

Our transcripts are text ("HI YOU", or phones "h ə | l oʊ"), so `uer` maps them onto fairseq's units the
way `Vocabulary.tokenize` builds training targets: letters and characters get `|` after every word, phone
transcripts keep the `|` they carry. A CTC output whose separators are not one per word boundary plus a
final one (a doubled or leading `|`) loses that difference in its text, so there `uer` on text can be
lower than fairseq's count over raw ids.
"""
import jiwer

from .errors import S3RError
from .text import split_units

SEPARATOR = "|"  # fairseq's word boundary unit in .ltr labels and letter dictionaries


def _check(refs: list[str], hyps: list[str]) -> None:
    if len(refs) != len(hyps):
        raise S3RError(f"{len(refs)} references but {len(hyps)} hypotheses")


def _unit_error_rate(refs: list[list[str]], hyps: list[list[str]]) -> float:
    """Summed Levenshtein distance over unit sequences / summed reference length (0.0 for no units)."""
    total = sum(len(r) for r in refs)
    if not total:
        return 0.0 if not any(hyps) else float("inf")
    out = jiwer.process_words([" ".join(r) for r in refs], [" ".join(h) for h in hyps])  # units hold no spaces
    return (out.substitutions + out.deletions + out.insertions) / total


def error_rates(refs: list[str], hyps: list[str]) -> dict:
    """Corpus WER and CER with their counts (words = reference words; substitutions etc. are word counts).

    Empty references are allowed (every hypothesis word is then an insertion), as are empty hypotheses.
    """
    _check(refs, hyps)
    if not refs:
        return {"wer": 0.0, "cer": 0.0, "words": 0, "chars": 0, "substitutions": 0, "deletions": 0, "insertions": 0}
    words = jiwer.process_words(refs, hyps)
    chars = jiwer.process_characters(refs, hyps)
    return {"wer": words.wer, "cer": chars.cer,
            "words": words.hits + words.substitutions + words.deletions,  # reference word count
            "chars": chars.hits + chars.substitutions + chars.deletions,
            "substitutions": words.substitutions, "deletions": words.deletions, "insertions": words.insertions}


def ctc_units(text: str, units: str = "letter") -> list[str]:
    """The units fairseq's CTC criterion compares: "HI YOU" -> H I | Y O U |; phones as given, `|` kept."""
    if units not in ("letter", "char", "phone"):
        raise S3RError(f"uer: units must be 'letter', 'char' or 'phone', not {units!r}")
    return split_units(text, units, SEPARATOR)  # as Vocabulary.tokenize builds the training targets


def uer(refs: list[str], hyps: list[str], units: str = "letter") -> float:
    """fairseq's CTC-criterion unit error rate: word separators `|` are units (see the module docstring)."""
    _check(refs, hyps)
    return _unit_error_rate([ctc_units(r, units) for r in refs], [ctc_units(h, units) for h in hyps])


def per(refs: list[str], hyps: list[str]) -> float:
    """Phone error rate of space-separated phone transcripts; the word boundary `|` is not a phone."""
    _check(refs, hyps)

    def phones(text: str) -> list[str]:
        return [p for p in text.split() if p != SEPARATOR]

    return _unit_error_rate([phones(r) for r in refs], [phones(h) for h in hyps])


def _phone_words(text: str) -> str:
    """ "h ə | l oʊ" -> "hə loʊ": a word is right when all of its phones are."""
    return " ".join("".join(word.split()) for word in text.split(SEPARATOR) if word.strip())


def score(rows: list[tuple[str, str, str]], units: str) -> dict:
    """Scores of [(id, reference, hypothesis)]: wer, cer, uer (fairseq's), per (phone units only), counts.

    For phone units WER and CER are over the phonemized words (the phones between separators, joined).
    """
    refs, hyps = [r for _, r, _ in rows], [h for _, _, h in rows]
    if units == "phone":
        m = error_rates([_phone_words(r) for r in refs], [_phone_words(h) for h in hyps])
    else:
        m = error_rates(refs, hyps)
    out = {"wer": m["wer"], "cer": m["cer"], "uer": uer(refs, hyps, units), "utterances": len(rows),
           "words": m["words"]}
    if units == "phone":
        out["per"] = per(refs, hyps)
    return out
