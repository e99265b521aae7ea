"""Write a small speech corpus in a real download layout, spoken by espeak-ng, with phoneme transcripts.

Tests, the demo and the benchmarks use it: the readers in s3r/data.py must count and read these folders
exactly as they read the public downloads.

    python -m tools.synth_corpus OUT --layout librispeech --split dev-clean --num 20
    python -m tools.synth_corpus OUT --layout commonvoice --voice pl --lang pl --text zdania.txt --num 40
    python -m tools.synth_corpus OUT --layout manifest --split train --num 50

Layouts (audio rate in brackets):
  librispeech  OUT/LibriSpeech/<split>/<spk>/<chapter>/<spk>-<chapter>-<NNNN>.flac + <spk>-<chapter>.trans.txt
               [16 kHz flac]; transcripts normalized like LibriSpeech (UPPERCASE letters and apostrophes).
  librilight   OUT/librispeech_finetuning/1h/{0..5}/{clean,other}/<spk>/<chapter>/... and 9h/{clean,other}/...
               [16 kHz flac]; utterances dealt round-robin over those 14 folders.
  commonvoice  OUT/<release>/<lang>/{train,dev,test,validated}.tsv + clips/common_voice_<lang>_<n>.mp3 [48 kHz mp3];
               raw sentences; `--cv-header old` writes the pre-2022 column set, `new` the 2024 one.
  manifest     OUT/<split>.tsv (fairseq: root line, then relpath<TAB>num_samples) + <split>.wrd/.ltr + dict.ltr.txt,
               audio under OUT/audio/ [16 kHz flac].
Phoneme transcripts (not in the public layouts): espeak-ng --ipa, stress marks removed, phones separated by
spaces and "|" between words ("h ə l əʊ | w ɜː l d"). They go to <spk>-<chapter>.phn.txt next to each
.trans.txt, to an extra last TSV column `phonemes` (CommonVoice), or to <split>.phn + dict.phn.txt (manifest).
Without espeak-ng (or with --voice tone) the speech is replaced by one short tone per letter, and the
"phones" are the letters: enough for layout and loader tests, not for training.
"""
import argparse
import functools
import os
import random
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

from s3r.data import ipa_phones
from s3r.text import normalize_text

ESPEAK_RATE = 22050  # espeak-ng writes 22.05 kHz 16-bit mono
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4"]  # clear-voiced espeak-ng variants
CV_VOICES = {"zh-TW": "cmn", "zh_TW": "cmn", "zh-CN": "cmn", "zh-HK": "yue", "sv-SE": "sv", "es": "es"}
CV_HEADERS = {  # column sets read from CommonVoice releases; readers must look columns up by name
    "old": ["client_id", "path", "sentence", "up_votes", "down_votes", "age", "gender", "accent", "locale",
            "segment"],
    "new": ["client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes", "age",
            "gender", "accents", "variant", "locale", "segment"],
}
LIBRILIGHT_FOLDERS = [f"1h/{k}/{kind}" for k in range(6) for kind in ("clean", "other")] + ["9h/clean", "9h/other"]
# The Harvard sentences (IEEE 1969, public domain): phonetically balanced English.
SENTENCES = """The birch canoe slid on the smooth planks.
Glue the sheet to the dark blue background.
It's easy to tell the depth of a well.
These days a chicken leg is a rare dish.
Rice is often served in round bowls.
The juice of lemons makes fine punch.
The box was thrown beside the parked truck.
The hogs were fed chopped corn and garbage.
Four hours of steady work faced us.
A large size in stockings is hard to sell.
The boy was there when the sun rose.
A rod is used to catch pink salmon.
The source of the huge river is the clear spring.
Kick the ball straight and follow through.
Help the woman get back to her feet.
A pot of tea helps to pass the evening.
Smoky fires lack flame and heat.
The soft cushion broke the man's fall.
The salt breeze came across from the sea.
The girl at the booth sold fifty bonds.
The small pup gnawed a hole in the sock.
The fish twisted and turned on the bent hook.
Press the pants and sew a button on the vest.
The swan dive was far short of perfect.
The beauty of the view stunned the young boy.
Two blue fish swam in the tank.
Her purse was full of useless trash.
The colt reared and threw the tall rider.
It snowed, rained, and hailed the same morning.
Read verse out loud for pleasure.""".splitlines()


ENGLISH_FORTUNES = ("fortunes", "wisdom", "literature", "science", "people", "education", "work", "platitudes")


def default_texts(seed: int = 0) -> list[str]:
    """Built-in sentences, plus English fortunes or /usr/share/dict/words phrases when installed (variety).

    Only plain ASCII lines are taken, so the transcripts fit LibriSpeech's letter vocabulary.
    """
    plain = re.compile(r"[A-Za-z][A-Za-z ,.'?!;:-]{18,118}")
    files = [Path(d) / f for d in ("/usr/share/games/fortunes", "/usr/share/fortunes") for f in ENGLISH_FORTUNES]
    lines = [ln.strip() for p in files if p.is_file() for ln in p.read_text(errors="ignore").splitlines()]
    lines = [ln for ln in lines if plain.fullmatch(ln)]
    if len(lines) >= 100:
        return SENTENCES + lines[:2000]
    words = Path("/usr/share/dict/words")
    if words.is_file():
        vocab = [w for w in words.read_text(errors="ignore").split() if w.isascii() and w.isalpha() and w.islower()]
        rng = random.Random(seed)
        if len(vocab) >= 1000:
            return SENTENCES + [" ".join(rng.sample(vocab, rng.randint(4, 9))) for _ in range(500)]
    return SENTENCES


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(text: str, voice: str, variant: str, speed: int, pitch: int) -> tuple[np.ndarray, str]:
    """One utterance: (float32 samples at 22.05 kHz, phone transcript). One espeak-ng process gives both."""
    if voice == "tone" or not espeak_available():
        return tones(text, pitch), " ".join(ch for ch in normalize_text(text).replace(" ", "|"))
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "out.wav")  # text via stdin: a sentence starting with "-" is not an option
        cmd = ["espeak-ng", "-v", f"{voice}+{variant}", "-s", str(speed), "-p", str(pitch), "--ipa", "--sep=_",
               "-w", wav, "--stdin"]
        res = subprocess.run(cmd, input=text, capture_output=True, text=True)
        if res.returncode != 0 or not os.path.exists(wav):
            raise RuntimeError(f"espeak-ng -v {voice} failed: {res.stderr.strip() or res.returncode}")
        audio, rate = sf.read(wav, dtype="float32")
    assert rate == ESPEAK_RATE, rate
    return audio, ipa_phones(res.stdout)


def tones(text: str, pitch: int) -> np.ndarray:
    """Stand-in speech without espeak-ng: a 60 ms tone per character, its frequency set by the character."""
    t = np.arange(int(0.06 * ESPEAK_RATE)) / ESPEAK_RATE
    parts = [np.zeros_like(t) if ch == " " else 0.3 * np.sin(2 * np.pi * (100 + 4 * pitch + ord(ch) % 64 * 20) * t)
             for ch in text]
    return np.concatenate(parts or [t * 0]).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _resampler(rate: int):
    import torchaudio  # torchaudio.functional.resample's kernel, built once (22.05 -> 16 kHz is a 320-phase kernel)
    return torchaudio.transforms.Resample(ESPEAK_RATE, rate)


def resample(audio: np.ndarray, rate: int) -> np.ndarray:
    import torch
    with torch.no_grad():
        return _resampler(rate)(torch.from_numpy(audio)).numpy()


def synth_corpus(out, layout: str = "librispeech", num: int = 10, voice: str = "en", lang: str | None = None,
                 texts: list[str] | None = None, split: str | None = None, seed: int = 0, speakers: int = 2,
                 cv_header: str = "new", release: str = "cv-corpus-17.0-2024-03-15", workers: int = 4) -> Path:
    """Write `num` utterances in `layout` under `out` and return `out`. Library form of the command line."""
    out, rng = Path(out), random.Random(seed)
    lang = lang or voice
    if layout == "commonvoice" and voice == lang:
        voice = CV_VOICES.get(lang, lang)
    texts = list(texts or default_texts(seed))
    rng.shuffle(texts)
    # Each speaker is one voice variant and pitch; speed varies per utterance.
    spk_style = [(rng.choice(VARIANTS), rng.randint(30, 70)) for _ in range(speakers)]
    jobs = [(texts[i % len(texts)], i % speakers, rng.randint(140, 190)) for i in range(num)]

    def run(job):
        text, spk, speed = job
        variant, pitch = spk_style[spk]
        return speak(text, voice, variant, speed, pitch)

    with ThreadPoolExecutor(workers) as pool:  # espeak-ng runs in child processes, so threads overlap them
        spoken = list(pool.map(run, jobs))
    rows = [(text, spk, audio, phones) for (text, spk, _), (audio, phones) in zip(jobs, spoken, strict=True)]
    writer = {"librispeech": _write_librispeech, "librilight": _write_librilight,
              "commonvoice": _write_commonvoice, "manifest": _write_manifest}.get(layout)
    if writer is None:
        raise SystemExit(f"error: unknown layout {layout!r}")
    writer(out, rows, split=split, lang=lang, cv_header=cv_header, release=release, workers=workers)
    return out


def _write_chapters(folder: Path, rows, spk_base: int, workers: int):
    """LibriSpeech chapter folders: <spk>/<chapter>/<spk>-<chapter>-<NNNN>.flac and the two transcript files."""
    trans, phn, audio_jobs = {}, {}, []
    for n, (text, spk, audio, phones) in enumerate(rows):
        spk_id, chapter = spk_base + spk, (spk_base + spk) * 10 + 1
        key = (folder / str(spk_id) / str(chapter), f"{spk_id}-{chapter}")
        uid = f"{key[1]}-{n:04d}"
        trans.setdefault(key, []).append(f"{uid} {normalize_text(text, case='upper')}\n")
        phn.setdefault(key, []).append(f"{uid} {phones}\n")
        audio_jobs.append((key[0] / f"{uid}.flac", audio))
    for (chapter_dir, stem), lines in trans.items():
        chapter_dir.mkdir(parents=True, exist_ok=True)
        (chapter_dir / f"{stem}.trans.txt").write_text("".join(lines), encoding="utf-8")
        (chapter_dir / f"{stem}.phn.txt").write_text("".join(phn[(chapter_dir, stem)]), encoding="utf-8")
    _write_audio(audio_jobs, 16000, workers)


def _write_audio(jobs, rate: int, workers: int):
    def write(job):
        path, audio = job
        path.parent.mkdir(parents=True, exist_ok=True)
        data = resample(audio, rate)
        if path.suffix == ".mp3":
            sf.write(path, data, rate, format="MP3")
        else:
            sf.write(path, data, rate, subtype="PCM_16")
        return len(data)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(write, jobs))  # number of samples written per file


def _write_librispeech(out: Path, rows, split, workers, **_):
    _write_chapters(out / "LibriSpeech" / (split or "dev-clean"), rows, 100, workers)


def _write_librilight(out: Path, rows, workers, **_):
    for k, folder in enumerate(LIBRILIGHT_FOLDERS):
        _write_chapters(out / "librispeech_finetuning" / folder, rows[k::len(LIBRILIGHT_FOLDERS)],
                        1000 + 10 * k, workers)


def _write_commonvoice(out: Path, rows, lang, cv_header, release, workers, **_):
    folder = out / release / lang
    header = CV_HEADERS[cv_header] + ["phonemes"]
    tables, audio_jobs = {"train": [], "dev": [], "test": [], "validated": []}, []
    for n, (text, spk, audio, phones) in enumerate(rows):
        clip = f"common_voice_{lang}_{3000000 + n}.mp3"
        values = {"client_id": f"{spk:064x}", "path": clip, "sentence_id": f"{n:064x}", "sentence": text,
                  "sentence_domain": "", "up_votes": "2", "down_votes": "0", "age": "", "gender": "",
                  "accent": "", "accents": "", "variant": "", "locale": lang, "segment": "", "phonemes": phones}
        row = "\t".join(values[c] for c in header) + "\n"
        tables[("train", "train", "dev", "test")[n % 4]].append(row)
        tables["validated"].append(row)
        audio_jobs.append((folder / "clips" / clip, audio))
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in tables.items():
        (folder / f"{split}.tsv").write_text("\t".join(header) + "\n" + "".join(lines), encoding="utf-8")
    _write_audio(audio_jobs, 48000, workers)


def _write_manifest(out: Path, rows, split, workers, **_):
    split = split or "train"
    rels, wrd, ltr, phn, audio_jobs = [], [], [], [], []
    for n, (text, spk, audio, phones) in enumerate(rows):
        rels.append(f"{spk}/{split}-{n:04d}.flac")
        words = normalize_text(text, case="upper")
        wrd.append(words + "\n")
        ltr.append(" ".join(words.replace(" ", "|")) + " |\n")  # fairseq libri_labels.py format
        phn.append(phones + "\n")
        audio_jobs.append((out / "audio" / rels[-1], audio))
    sizes = _write_audio(audio_jobs, 16000, workers)
    tsv = "".join(f"{rel}\t{size}\n" for rel, size in zip(rels, sizes, strict=True))
    (out / f"{split}.tsv").write_text(f"{(out / 'audio').resolve()}\n{tsv}", encoding="utf-8")
    for ext, lines in (("wrd", wrd), ("ltr", ltr), ("phn", phn)):
        (out / f"{split}.{ext}").write_text("".join(lines), encoding="utf-8")
        counts = Counter(u for line in lines for u in line.split())
        if ext != "wrd" and (split == "train" or not (out / f"dict.{ext}.txt").exists()):
            (out / f"dict.{ext}.txt").write_text("".join(f"{s} {c}\n" for s, c in counts.most_common()),
                                                 encoding="utf-8")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="output folder (the --data-root to give s3r)")
    p.add_argument("--layout", default="librispeech",
                   choices=["librispeech", "librilight", "commonvoice", "manifest"])
    p.add_argument("--num", type=int, default=20, help="number of utterances")
    p.add_argument("--voice", default="en", help="espeak-ng voice (espeak-ng --voices), or 'tone'")
    p.add_argument("--lang", default=None, help="CommonVoice language folder, e.g. zh-TW (default: the voice)")
    p.add_argument("--split", default=None, help="LibriSpeech split or manifest name (dev-clean / train)")
    p.add_argument("--text", default=None, help="text file, one sentence per line (default: built-in)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speakers", type=int, default=2)
    p.add_argument("--cv-header", default="new", choices=sorted(CV_HEADERS))
    p.add_argument("--release", default="cv-corpus-17.0-2024-03-15", help="CommonVoice release folder name")
    a = p.parse_args(argv)
    texts = [ln.strip() for ln in open(a.text, encoding="utf-8") if ln.strip()] if a.text else None
    synth_corpus(a.out, a.layout, a.num, a.voice, a.lang, texts, a.split, a.seed, a.speakers, a.cv_header, a.release)
    print(f"wrote {a.num} utterances ({a.layout}) under {a.out}")


if __name__ == "__main__":
    main()
