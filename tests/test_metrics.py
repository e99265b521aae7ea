"""Error rates on cases counted by hand: S = substitution, D = deletion, I = insertion; N = reference units."""
import pytest

from s3r.errors import S3RError
from s3r.metrics import ctc_units, error_rates, per, score, uer


def test_error_rates_counted_by_hand():
    refs = ["the cat sat", "on a mat"]
    hyps = ["the bat sat down", "a mat"]
    m = error_rates(refs, hyps)
    # words: cat->bat S, +down I; -on D.  N = 3 + 3 words
    assert (m["substitutions"], m["deletions"], m["insertions"], m["words"]) == (1, 1, 1, 6)
    assert m["wer"] == pytest.approx(3 / 6)
    # characters, spaces included: c->b S, +" down" 5 I; -"on " 3 D.  N = 11 + 8 characters
    assert m["chars"] == 19 and m["cer"] == pytest.approx(9 / 19)


def test_error_rates_empty_sides():
    # an empty reference: its hypothesis word is 1 I over the corpus's N = 0 + 2 words
    assert error_rates(["", "a b"], ["x", "a b"])["wer"] == pytest.approx(1 / 2)
    # an empty hypothesis: 2 D of N = 2
    assert error_rates(["a b"], [""])["wer"] == pytest.approx(1.0)
    assert error_rates([], [])["wer"] == 0.0
    with pytest.raises(S3RError, match="2 references but 1 hypotheses"):
        error_rates(["a", "b"], ["a"])


def test_ctc_units_are_the_ltr_targets():
    # fairseq libri_labels.py writes "H I | Y O U |": a separator after every word, the last one too
    assert ctc_units("HI YOU") == ["H", "I", "|", "Y", "O", "U", "|"]
    assert ctc_units("h ə | l oʊ", "phone") == ["h", "ə", "|", "l", "oʊ"]  # phones carry their own separators
    with pytest.raises(S3RError, match="units must be"):
        ctc_units("a", "word")


@pytest.mark.parametrize("hyp, errors", [
    ("HI YOU", 0),
    ("HIYOU", 1),  # H I Y O U |: the separator between the words D; separator-free this would be 0
    ("HI YO", 1),  # H I | Y O |: U D
    ("H YOU", 1),  # H | Y O U |: I D
    ("HI YOU NO", 3),  # N O | I I I
    ("HA YOU", 1),  # I->A S
    ("", 7),  # all 7 D
])
def test_uer_letters_counts_separators(hyp, errors):
    # reference H I | Y O U |: N = 7 units
    assert uer(["HI YOU"], [hyp]) == pytest.approx(errors / 7)


def test_uer_characters_without_spaces_in_the_hypothesis():
    # 你 好 | 世 界 | (N = 6) against 你 好 世 界 |: the inner separator D
    assert uer(["你好 世界"], ["你好世界"], "char") == pytest.approx(1 / 6)


def test_uer_and_per_differ_on_phone_separators():
    refs = ["h ə | l oʊ", "w ɜː l d"]  # uer: N = 5 + 4 units (one "|"); per: N = 4 + 4 phones
    hyps = ["h ə l oʊ", "w ɜː | l d"]  # the boundary missed in the first (D), invented in the second (I)
    assert uer(refs, hyps, "phone") == pytest.approx(2 / 9)
    assert per(refs, hyps) == 0.0  # every phone right
    # ə D: the same one error, over N = 5 units or 4 phones
    assert uer(["h ə | l oʊ"], ["h | l oʊ"], "phone") == pytest.approx(1 / 5)
    assert per(["h ə | l oʊ"], ["h | l oʊ"]) == pytest.approx(1 / 4)


def test_per_counted_by_hand():
    # a->e S, +k I; -t D.  N = 3 + 2 phones
    assert per(["a b c", "s t"], ["e b c k", "s"]) == pytest.approx(3 / 5)
    assert per([""], [""]) == 0.0
    with pytest.raises(S3RError, match="1 references but 2"):
        per(["a"], ["a", "b"])


def test_score_letters():
    rows = [("1", "HI YOU", "HI YOU"), ("2", "NO", "NOT")]
    m = score(rows, "letter")
    assert m["wer"] == pytest.approx(1 / 3)  # NO->NOT S; N = 3 words
    assert m["cer"] == pytest.approx(1 / 8)  # +T I; N = 6 + 2 characters
    assert m["uer"] == pytest.approx(1 / 10)  # N O T |: T I; N = 7 + 3 units
    assert (m["utterances"], m["words"]) == (2, 3) and "per" not in m


def test_score_phones():
    rows = [("a", "h ə | l oʊ", "h ə | l"), ("b", "w ɜː l d", "w ɜː l d")]
    m = score(rows, "phone")
    assert m["per"] == pytest.approx(1 / 8)  # oʊ D; N = 4 + 4 phones
    assert m["uer"] == pytest.approx(1 / 9)  # oʊ D; N = 5 + 4 units
    # words are phones joined between separators: "hə loʊ" + "wɜːld"; loʊ->l S; N = 3 words
    assert m["wer"] == pytest.approx(1 / 3) and m["words"] == 3
    # characters of "hə loʊ" (6) + "wɜːld" (5): o D, ʊ D
    assert m["cer"] == pytest.approx(2 / 11)
