"""Text side of CTC: transcript normalization and the output vocabulary.

Conventions followed, so that fairseq and Hugging Face fine-tuned checkpoints decode with our code:
- fairseq `dict.ltr.txt` (written by examples/wav2vec/libri_labels.py): one `symbol count` line per unit,
  loaded behind the four specials `<s> <pad> </s> <unk>`; `.ltr` labels spell words letter by letter with
  `|` after every word ("H E Y | Y O U |"). fairseq's CTC criterion uses `<s>` (index 0) as the blank.
- Hugging Face `vocab.json` (Wav2Vec2CTCTokenizer): `{"<pad>": 0, "<s>": 1, ...}`, blank is `<pad>` = 0.
Either way index 0 is the CTC blank, which is all `decode.greedy_decode` needs to know.
"""
import base64
import json
import unicodedata
from collections import Counter

from .errors import S3RError

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # fairseq Dictionary order; index 0 doubles as the CTC blank
# fairseq's LibriSpeech dict.ltr.txt in file order, identical to facebook/wav2vec2-base-960h's vocab.json
LIBRISPEECH_LETTERS = list("|ETAONIHSRDLUMWCFGYPBVK'XJQZ")
UNITS = ("letter", "char", "phone", "spm")
_APOSTROPHES = {"\u2019": "'", "\u2018": "'", "\u02bc": "'"}  # typographic forms of the ASCII apostrophe


class OutOfVocabularyError(S3RError):
    """A transcript symbol the vocabulary does not have."""


def normalize_text(text: str, case: str | None = "lower", keep: str = "'") -> str:
    """Language-agnostic transcript cleanup, used for every corpus before building or applying a vocabulary.

    1. Unicode NFKC: compatibility forms fold (full-width Ａ -> A, ligature ﬁ -> fi) and letters with
       combining accents compose (e + U+0301 -> é), so one letter is one symbol.
    2. case: "lower" (CommonVoice character units), "upper" (LibriSpeech letters, as in fairseq .ltr), or
       None. We use str.lower rather than str.casefold, which would respell words (ß -> ss, ς -> σ).
    3. Punctuation and symbols (Unicode categories P* and S*) become spaces; characters in `keep` survive
       only inside a word ("don't", "l'homme" keep their apostrophe; quotes around a word go).
       Letters (L*), marks (M*: Devanagari vowel signs, tone marks), digits (N*) and format characters
       (Cf: the Persian zero-width non-joiner) are kept, so ł ą ü ё, CJK and kana pass through unchanged.
    4. Whitespace collapses to single spaces.
    """
    text = unicodedata.normalize("NFKC", text.replace("\ufeff", ""))
    text = "".join(_APOSTROPHES.get(ch, ch) for ch in text)
    if case == "lower":
        text = text.lower()
    elif case == "upper":
        text = text.upper()
    out = []
    for i, ch in enumerate(text):
        cat = unicodedata.category(ch)
        if ch in keep:
            inside = 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum()
            out.append(ch if inside else " ")
        elif cat[0] in "PS" or ch.isspace():
            out.append(" ")
        elif cat[0] in "LMN" or cat == "Cf":
            out.append(ch)  # control, surrogate and unassigned characters are dropped
    return " ".join("".join(out).split())


def _read_text(path: str) -> str:
    """A UTF-8 text file, or a one-line error naming it."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise S3RError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise S3RError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None


def split_units(text: str, units: str, word_sep: str | None = "|") -> list[str]:
    """A (normalized) transcript as CTC units, fairseq .ltr style: letters and characters one by one with
    `word_sep` after every word, the last included ("HI YOU" -> H I | Y O U |); phones as they are space
    separated (they carry their own "|" between words)."""
    if units == "phone":
        return text.split()
    sep = [word_sep] if word_sep else []
    return [u for word in text.split() for u in [*word, *sep]]


class Vocabulary:
    """CTC output units: `symbols[i]` is the label of logit i; index 0 is the blank."""

    def __init__(self, symbols: list[str], word_sep: str | None = "|", units: str = "letter",
                 spm_model: bytes | None = None):
        if units not in UNITS:
            raise S3RError(f"unknown unit type {units!r}; expected one of {', '.join(UNITS)}")
        if len(set(symbols)) != len(symbols):
            raise S3RError("vocabulary has duplicate symbols")
        self.symbols, self.word_sep, self.units, self.spm_model = list(symbols), word_sep, units, spm_model
        self.index = {s: i for i, s in enumerate(self.symbols)}
        self.unk = self.index.get("<unk>")
        self._sp = None
        if spm_model is not None:
            import sentencepiece  # only needed for subword units
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=spm_model)

    def __len__(self) -> int:
        return len(self.symbols)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} {self.units} units: {' '.join(self.symbols[4:14])} ...)"

    # ---- text <-> units ----
    def tokenize(self, text: str) -> list[str]:
        """Split a (normalized) transcript into units, fairseq .ltr style for letters and characters."""
        if self.units == "spm":
            return self._sp.encode(text, out_type=str)
        return split_units(text, self.units, self.word_sep)

    def encode(self, text: str, where: str | None = None, allow_unk: bool = False) -> list[int]:
        """Unit ids of a transcript; an unknown unit raises OutOfVocabularyError naming it and `where`."""
        ids = []
        for unit in self.tokenize(text):
            i = self.index.get(unit)
            if i is None:  # (sentencepiece returns an unknown piece as its surface text, so it lands here too)
                if allow_unk and self.unk is not None:
                    i = self.unk
                else:
                    code = f" (U+{ord(unit):04X})" if len(unit) == 1 else ""
                    raise OutOfVocabularyError(f"{where or repr(text)}: symbol {unit!r}{code} is not in the "
                                               f"{len(self)}-symbol vocabulary")
            ids.append(i)
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of a unit id sequence (no CTC collapsing here); specials are dropped."""
        units = [self.symbols[i] for i in ids if self.symbols[i] not in SPECIALS and i != 0]
        if self.units == "spm":
            return self._sp.decode_pieces(units)
        if self.units == "phone":
            return " ".join(units)
        text = "".join(units)
        return " ".join(text.replace(self.word_sep, " ").split()) if self.word_sep else text

    # ---- construction ----
    @classmethod
    def build(cls, texts: list[str], units: str = "letter", vocab_size: int = 100) -> "Vocabulary":
        """Vocabulary from training transcripts: units sorted by count like fairseq's dict.ltr.txt.

        `vocab_size` is used only for sentencepiece ("spm") units, trained here as a unigram model.
        """
        if units == "spm":
            return cls._build_spm(list(texts), vocab_size)
        probe = cls(SPECIALS, units=units)
        counts = Counter(u for text in texts for u in probe.tokenize(text))
        if units != "phone":
            counts[probe.word_sep] += 0  # always present, even for scripts written without spaces
        return cls(SPECIALS + sorted(counts, key=lambda s: (-counts[s], s)), units=units)

    @classmethod
    def _build_spm(cls, texts: list[str], vocab_size: int) -> "Vocabulary":
        import io

        import sentencepiece
        proto = io.BytesIO()
        try:  # id 0 = spm's own <unk>; no bos/eos/pad pieces: our specials come first instead
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_writer=proto, vocab_size=vocab_size, model_type="unigram",
                character_coverage=1.0, hard_vocab_limit=False, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
                minloglevel=2)
        except RuntimeError as e:  # e.g. "Vocabulary size too high" for a tiny corpus
            raise S3RError(f"sentencepiece training failed: {str(e).splitlines()[-1]}") from None
        sp = sentencepiece.SentencePieceProcessor(model_proto=proto.getvalue())
        pieces = [sp.id_to_piece(i) for i in range(1, sp.get_piece_size())]
        return cls(SPECIALS + pieces, word_sep=None, units="spm", spm_model=proto.getvalue())

    @classmethod
    def librispeech(cls) -> "Vocabulary":
        """fairseq's LibriSpeech letter dictionary: the vocabulary of every public LibriSpeech CTC model."""
        return cls(SPECIALS + LIBRISPEECH_LETTERS)

    @classmethod
    def from_fairseq_dict(cls, path: str) -> "Vocabulary":
        """Read a fairseq dict.ltr.txt / dict.phn.txt: `symbol count [#fairseq:overwrite]` per line."""
        symbols = []
        text = _read_text(path)
        for n, line in enumerate(text.removesuffix("\n").split("\n") if text else [], 1):
            fields = line.rstrip("\r").replace(" #fairseq:overwrite", "").rsplit(" ", 1)
            if len(fields) != 2 or not fields[1].isdigit():
                raise S3RError(f"{path}:{n}: expected 'symbol count', got {line.strip()[:50]!r}")
            symbols.append(fields[0])
        return cls._with_units(SPECIALS + [s for s in symbols if s not in SPECIALS])

    def save_fairseq_dict(self, path: str) -> None:
        """Write dict.ltr.txt; fairseq keeps file order when loading, so the count column is not used."""
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(f"{s} 1\n" for s in self.symbols if s not in SPECIALS)

    @classmethod
    def from_hf_vocab(cls, path: str) -> "Vocabulary":
        """Read a Hugging Face Wav2Vec2CTCTokenizer vocab.json ({symbol: index})."""
        try:
            table = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise S3RError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(table, dict) or not all(isinstance(i, int) for i in table.values()):
            raise S3RError(f"{path}: expected a vocab.json object {{symbol: index}}")
        symbols = sorted(table, key=table.get)
        if [table[s] for s in symbols] != list(range(len(symbols))):
            raise S3RError(f"{path}: indices are not 0..{len(symbols) - 1}")
        return cls._with_units(symbols)

    @classmethod
    def _with_units(cls, symbols: list[str]) -> "Vocabulary":
        units = [s for s in symbols if s not in SPECIALS]
        kind = "letter" if all(len(s) == 1 for s in units) else "phone"
        return cls(symbols, word_sep="|" if "|" in units else None, units=kind)

    def to_dict(self) -> dict:
        """Plain JSON-able form, stored in every checkpoint."""
        spm = base64.b64encode(self.spm_model).decode("ascii") if self.spm_model else None
        return {"symbols": self.symbols, "word_sep": self.word_sep, "units": self.units, "spm_model": spm}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocabulary":
        if "symbols" not in d:
            raise S3RError("vocabulary entry has no 'symbols'")
        spm = base64.b64decode(d["spm_model"]) if d.get("spm_model") else None
        return cls(d["symbols"], word_sep=d.get("word_sep", "|"), units=d.get("units", "letter"), spm_model=spm)
