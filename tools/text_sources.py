"""Short sentences per language from Debian-packaged text, for the espeak-ng corpora of the miniature.

    apt-get install -y fortunes fortunes-de fortunes-es fortunes-it fortunes-pl fortunes-ru fortunes-br \
        fortunes-zh fortunes-cs wdutch wswedish wfrench wukrainian hunspell-tr hunspell-hu hunspell-el hunspell-kk
    python -m tools.text_sources ru --num 5

Two kinds of source (see SOURCES):
  fortunes   real sentences: `%`-separated records, split at sentence ends, kept when 3-12 words long (Mandarin:
             4-24 characters) and written only in the language's script with ordinary punctuation.
  words      a word list (/usr/share/dict or a hunspell .dic): no sentences exist, so a "sentence" is 3-8 random
             lowercase words. The phonetics are real; the syntax is not.
Languages with no packaged text (Tatar, Kyrgyz) read Kazakh words (Cyrillic, Turkic, the nearest packaged
language), restricted to the letters of their own Cyrillic alphabet so that their espeak-ng voice knows every
letter. `SOURCES[lang]["note"]` says so for each.
"""
import argparse
import functools
import random
import re
import unicodedata
from pathlib import Path

FORTUNES = Path("/usr/share/games/fortunes")
HUNSPELL = Path("/usr/share/hunspell")
DICT = Path("/usr/share/dict")
RUSSIAN = "абвгдеёжзийклмнопрстуфхцчшщъыьэюя"

# lang (CommonVoice code) -> where its text comes from; "script" is the Unicode script name every letter must have
SOURCES = {
    # pretraining languages (never held out)
    "en": dict(kind="fortunes", files=["fortunes", "wisdom", "literature", "people", "platitudes", "science", "work",
                                       "love", "pets", "education", "food", "humorists", "riddles", "politics", "law",
                                       "medicine", "sports", "kids", "men-women", "miscellaneous"],
               script="LATIN", package="fortunes"),
    "de": dict(kind="fortunes", files=["de/*"], script="LATIN", package="fortunes-de"),
    "pl": dict(kind="fortunes", files=["pl/*"], script="LATIN", package="fortunes-pl"),
    "pt": dict(kind="fortunes", files=["brasil"], script="LATIN", package="fortunes-br", voice="pt-br",
               note="Brazilian text, spoken by the pt-br voice"),
    "cs": dict(kind="fortunes", files=["cs/*"], script="LATIN", package="fortunes-cs"),
    "hu": dict(kind="words", file=HUNSPELL / "hu_HU.dic", script="LATIN", package="hunspell-hu"),
    "el": dict(kind="words", file=HUNSPELL / "el_GR.dic", encoding="iso8859-7", script="GREEK", package="hunspell-el"),
    "uk": dict(kind="words", file=DICT / "ukrainian", script="CYRILLIC", package="wukrainian"),
    # held-out languages: upstream's ten CommonVoice languages
    "nl": dict(kind="words", file=DICT / "dutch", script="LATIN", package="wdutch"),
    "zh-TW": dict(kind="fortunes", files=["chinese", "tang300", "song100"], script="CJK", package="fortunes-zh",
                  voice="cmn", note="Debian's espeak-ng cmn dictionary lacks many characters: it reads those as pinyin "
                  "with the tone number spoken in English (们 -> 'men five'), so this corpus is only partly Mandarin"),
    "es": dict(kind="fortunes", files=["es/*"], script="LATIN", package="fortunes-es"),
    "tt": dict(kind="words", file=HUNSPELL / "kk_KZ.dic", script="CYRILLIC", package="hunspell-kk",
               alphabet=RUSSIAN + "әөүҗңһ", note="no packaged Tatar text: Kazakh words using only Tatar letters"),
    "ru": dict(kind="fortunes", files=["ru/*"], script="CYRILLIC", package="fortunes-ru"),
    "it": dict(kind="fortunes", files=["it/*"], script="LATIN", package="fortunes-it"),
    "ky": dict(kind="words", file=HUNSPELL / "kk_KZ.dic", script="CYRILLIC", package="hunspell-kk",
               alphabet=RUSSIAN + "ңөү", note="no packaged Kyrgyz text: Kazakh words using only Kyrgyz letters"),
    "tr": dict(kind="words", file=HUNSPELL / "tr_TR.dic", script="LATIN", package="hunspell-tr"),
    "sv-SE": dict(kind="words", file=DICT / "swedish", encoding="iso8859-1", script="LATIN", package="wswedish",
                  voice="sv"),
    "fr": dict(kind="words", file=DICT / "french", script="LATIN", package="wfrench"),
}
PRETRAIN = ["en", "de", "pl", "pt", "cs", "hu", "el", "uk"]
HELD_OUT = ["nl", "zh-TW", "es", "tt", "ru", "it", "ky", "tr", "sv-SE", "fr"]
PUNCT = set(" ,.;:!?'\"-–—«»„“”‚‘’()¡¿…")
CJK_PUNCT = set("，。！？；：、“”‘’《》（）")


def voice(lang: str) -> str:
    """The espeak-ng voice that reads `lang`."""
    return SOURCES[lang].get("voice", lang)


def _in_script(text: str, script: str, extra: set) -> bool:
    for ch in text:
        if ch in extra:
            continue
        name = unicodedata.name(ch, "")
        if script == "CJK":
            if not name.startswith("CJK UNIFIED IDEOGRAPH"):
                return False
        elif not (ch.isalpha() and name.startswith(script)):
            return False
    return True


@functools.cache
def _pool(lang: str) -> tuple[str, ...]:
    src = SOURCES[lang]
    if src["kind"] == "words":
        return tuple(_word_list(src))
    pool = _fortune_sentences(src)
    if lang != "en" and src["script"] == "LATIN":  # several fortunes packages quote English: drop those sentences
        english = {w for s in _pool("en") for w in _words(s)}
        pool = [s for s in pool if sum(w in english for w in _words(s)) * 2 < len(_words(s))]
    return tuple(pool)


def _words(sentence: str) -> list[str]:
    return re.findall(r"\w+", sentence.lower())


def _fortune_sentences(src: dict) -> list[str]:
    paths = []
    for pattern in src["files"]:
        found = sorted(FORTUNES.glob(pattern))
        paths += [p for p in found if p.is_file() and p.suffix not in (".dat", ".u8")]
    cjk = src["script"] == "CJK"
    out = []
    for path in paths:
        u8 = path.with_name(path.name + ".u8")  # the UTF-8 copy, where the original is Latin-1 or KOI8
        use = u8 if u8.exists() and u8.stat().st_size > 0 else path  # fortunes-pl ships empty .u8 files
        raw = use.read_bytes().decode("utf-8", errors="replace")
        raw = re.sub(r"\x1b\[[0-9;]*m", "", raw)  # ANSI colours in fortunes-zh
        for record in raw.split("\n%"):
            lines = [ln.strip() for ln in record.splitlines() if ln.strip() and not ln.strip().startswith("--")]
            text = ("" if cjk else " ").join(lines)
            parts = re.split(r"(?<=[。！？；])" if cjk else r"(?<=[.!?;])\s+", text)
            for s in parts:
                s = s.strip(" \t\"'“”„«»-–—").strip()
                if cjk:
                    ok = 4 <= sum(1 for ch in s if ch not in CJK_PUNCT) <= 24 and _in_script(s, "CJK", CJK_PUNCT)
                else:
                    ok = (3 <= len(s.split()) <= 12 and _in_script(s, src["script"], PUNCT)
                          and any(c.isalpha() for c in s))
                if ok and "\ufffd" not in s:
                    out.append(s)
    return sorted(set(out))


def _word_list(src: dict) -> list[str]:
    words = set()
    alphabet = set(src["alphabet"]) if "alphabet" in src else None
    with open(src["file"], encoding=src.get("encoding", "utf-8"), errors="replace") as f:
        for n, line in enumerate(f):
            if n == 0 and line.strip().lstrip("\ufeff").isdigit():
                continue  # hunspell .dic: the first line is the word count
            w = re.split(r"[/\s]", line.strip().lstrip("\ufeff"), maxsplit=1)[0]
            if not (2 <= len(w) <= 14) or w != w.lower() or not _in_script(w, src["script"], set()):
                continue  # proper nouns, abbreviations, other scripts
            if alphabet is None or set(w) <= alphabet:
                words.add(w)
    return sorted(words)


def sentences(lang: str, num: int, seed: int = 0) -> list[str]:
    """`num` distinct sentences of `lang` (fewer if the source runs out), in a seeded random order."""
    if lang not in SOURCES:
        raise SystemExit(f"error: no text source for {lang!r}; known: {', '.join(SOURCES)}")
    src, rng = SOURCES[lang], random.Random(seed)
    if src["kind"] == "fortunes":
        pool = list(_pool(lang))
        if not pool:
            raise SystemExit(f"error: no {lang} sentences: apt-get install {src['package']}")
        rng.shuffle(pool)
        return pool[:num]
    words = list(_pool(lang))
    if len(words) < 100:
        raise SystemExit(f"error: no {lang} word list: apt-get install {src['package']}")
    return [" ".join(rng.sample(words, rng.randint(3, 8))) for _ in range(num)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("lang", nargs="?", help="language code (CommonVoice spelling); omit to list the sources")
    p.add_argument("--num", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.lang is None:
        for lang, src in SOURCES.items():
            n = len(_pool(lang))
            print(f"{lang:6} {src['kind']:9} {n:7} {'sentences' if src['kind'] == 'fortunes' else 'words':9} "
                  f"{src['package']:12} {src.get('note', '')}")
        return
    print("\n".join(sentences(a.lang, a.num, a.seed)))


if __name__ == "__main__":
    main()
