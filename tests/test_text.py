"""Vocabulary formats (fairseq dict.ltr.txt, HF vocab.json, checkpoints) and transcript normalization."""
import json

import pytest

from s3r.errors import S3RError
from s3r.text import SPECIALS, OutOfVocabularyError, Vocabulary, normalize_text

# facebook/wav2vec2-base-960h vocab.json: fairseq's LibriSpeech letters with HF names for the specials.
HF_960H = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "E": 5, "T": 6, "A": 7, "O": 8, "N": 9, "I": 10,
           "H": 11, "S": 12, "R": 13, "D": 14, "L": 15, "U": 16, "M": 17, "W": 18, "C": 19, "F": 20, "G": 21,
           "Y": 22, "P": 23, "B": 24, "V": 25, "K": 26, "'": 27, "X": 28, "J": 29, "Q": 30, "Z": 31}


@pytest.mark.parametrize("raw, case, expected", [
    ("Zażółć gęślą jaźń!", "lower", "zażółć gęślą jaźń"),
    ("«Ёлка» — ЭТО ёж…", "lower", "ёлка это ёж"),
    ("Grüße aus München, Straße.", "lower", "grüße aus münchen straße"),  # lower, not casefold: ß stays
    ("你好，世界！「こんにちは」", "lower", "你好 世界 こんにちは"),
    ("Ｆｕｌｌ－ｗｉｄｔｈ ﬁne", "lower", "full width fine"),  # NFKC folds compatibility forms
    ("e\u0301te\u0301", "lower", "été"),  # NFKC composes: one letter, one symbol
    ("¿Qué tal?  ¡Bien!\t", "lower", "qué tal bien"),
    ("'Quoted' don't l’homme", "lower", "quoted don't l'homme"),  # apostrophes kept inside words only
    ("He said: 'it's 5 o'clock.'", "upper", "HE SAID IT'S 5 O'CLOCK"),  # LibriSpeech .ltr style
    ("می\u200cخواهم", None, "می\u200cخواهم"),  # Persian zero-width non-joiner is orthography
    ("\ufeffa $ + b = c © d 🙂", None, "a b c d"),  # symbols (S*) go like punctuation
    ("नमस्ते दुनिया", None, "नमस्ते दुनिया"),  # combining vowel signs (M*) stay
])
def test_normalize_text(raw, case, expected):
    assert normalize_text(raw, case=case) == expected


def test_fairseq_dict_round_trip(tmp_path):
    path = tmp_path / "dict.ltr.txt"
    path.write_text("| 94802\nE 51860\nT 38431 #fairseq:overwrite\nA 33152\n' 1\n")
    vocab = Vocabulary.from_fairseq_dict(str(path))
    assert vocab.symbols == SPECIALS + ["|", "E", "T", "A", "'"]
    assert (vocab.index["<s>"], vocab.index["<pad>"], vocab.index["|"], vocab.unk) == (0, 1, 4, 3)
    assert vocab.units == "letter" and vocab.word_sep == "|"
    vocab.save_fairseq_dict(str(tmp_path / "again.txt"))
    assert Vocabulary.from_fairseq_dict(str(tmp_path / "again.txt")) == vocab


def test_fairseq_dict_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "dict.ltr.txt"
    path.write_text("| 5\nE\n")
    with pytest.raises(S3RError, match=r"dict\.ltr\.txt:2"):
        Vocabulary.from_fairseq_dict(str(path))
    path.write_bytes(b"| 5\nE 3\n\xff 1\n")
    with pytest.raises(S3RError, match=r"dict\.ltr\.txt:3: not UTF-8 text \(byte 0xff\)"):
        Vocabulary.from_fairseq_dict(str(path))
    with pytest.raises(S3RError, match="missing.txt: cannot read"):
        Vocabulary.from_fairseq_dict(str(tmp_path / "missing.txt"))


def test_hf_vocab_matches_fairseq_librispeech(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(HF_960H))
    hf, fs = Vocabulary.from_hf_vocab(str(path)), Vocabulary.librispeech()
    assert hf.symbols[0] == "<pad>" and len(hf) == len(fs) == 32
    assert hf.symbols[4:] == fs.symbols[4:]  # same units at the same logits; only the special names differ
    assert hf.encode("HELLO WORLD") == fs.encode("HELLO WORLD")
    path.write_text(json.dumps({"<pad>": 0, "a": 2}))
    with pytest.raises(S3RError, match="indices"):
        Vocabulary.from_hf_vocab(str(path))
    path.write_text('{"<pad>": 0,')  # cut short
    with pytest.raises(S3RError, match=r"vocab\.json: not JSON"):
        Vocabulary.from_hf_vocab(str(path))
    path.write_text('["<pad>", "a"]')  # JSON, but not {symbol: index}
    with pytest.raises(S3RError, match=r"vocab\.json: expected a vocab\.json object"):
        Vocabulary.from_hf_vocab(str(path))


def test_letters_encode_like_fairseq_ltr():
    vocab = Vocabulary.librispeech()
    ids = vocab.encode("HEY YOU")
    assert [vocab.symbols[i] for i in ids] == "H E Y | Y O U |".split()  # libri_labels.py: trailing "|"
    assert vocab.decode(ids) == "HEY YOU"
    assert vocab.decode([0, 1, 2] + ids + [3]) == "HEY YOU"  # specials never reach the text


def test_out_of_vocabulary_names_symbol_and_where():
    vocab = Vocabulary.librispeech()
    with pytest.raises(OutOfVocabularyError, match=r"utterance 84-121123-0001: symbol 'É' \(U\+00C9\)"):
        vocab.encode("CAFÉ", where="utterance 84-121123-0001")
    assert isinstance(OutOfVocabularyError("x"), S3RError)
    assert vocab.encode("CAFÉ", allow_unk=True)[3] == vocab.unk


def test_build_char_and_phone():
    chars = Vocabulary.build(["zażółć gęślą", "你好 世界", "aa"], units="char")
    assert chars.symbols[:6] == SPECIALS + ["|", "a"]  # sorted by count, like dict.ltr.txt
    assert chars.decode(chars.encode("你好 gęś")) == "你好 gęś"
    phones = Vocabulary.build(["h ə l əʊ | w ɜː l d", "ð ə"], units="phone")
    assert "əʊ" in phones.index and "|" in phones.index
    ids = phones.encode("w ɜː l d | ð ə")
    assert len(ids) == 7 and phones.decode(ids) == "w ɜː l d | ð ə"


@pytest.mark.parametrize("units", ["letter", "char", "phone", "spm"])
def test_to_dict_from_dict_round_trip(units):
    texts = ["THE CAT SAT ON THE MAT", "A DOG ATE THE HAT", "CATS AND DOGS"] * 10
    if units == "phone":
        texts = ["ð ə | k a t", "d ɒ ɡ z"]
    vocab = Vocabulary.build(texts, units=units, vocab_size=20)
    again = Vocabulary.from_dict(json.loads(json.dumps(vocab.to_dict())))  # through JSON, as in a checkpoint
    assert again == vocab and again.units == units
    assert again.encode(texts[0]) == vocab.encode(texts[0])
    assert again.decode(again.encode(texts[0])) == texts[0]


def test_sentencepiece_units():
    texts = ["the cat sat on the mat", "a dog ate the hat", "cats and dogs"] * 20
    vocab = Vocabulary.build(texts, units="spm", vocab_size=25)
    assert vocab.symbols[:4] == SPECIALS and vocab.word_sep is None and len(vocab) <= 25 + 3
    ids = vocab.encode("the dog sat")
    assert min(ids) >= 4 and vocab.decode(ids) == "the dog sat"
    with pytest.raises(OutOfVocabularyError, match="xyz"):
        vocab.encode("the xyz")


def test_unknown_units_rejected():
    with pytest.raises(S3RError, match="unit type"):
        Vocabulary(SPECIALS, units="words")
