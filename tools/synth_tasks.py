"""Write tiny utterance-level task corpora in the real download layouts, spoken by espeak-ng (s3r/tasks.py reads them).

    python -m tools.synth_tasks OUT --task keywords --per-class 8    # OUT/speech_commands_v0.01/...
    python -m tools.synth_tasks OUT --task voices --per-class 8      # OUT/VoxCeleb1/...
    python -m tools.synth_tasks OUT --task intents --per-class 6     # OUT/fluent_speech_commands_dataset/...
    python -m tools.synth_tasks OUT --task languages --per-class 8   # OUT/lid/{train,valid,test}.tsv

keywords   Speech Commands v0.01: OUT/speech_commands_v0.01/<word>/<speaker>_nohash_<n>.wav (1 s, 16 kHz), the ten
           SUPERB words plus unknown words (bed, bird, cat, dog, happy, house), _background_noise_/ (noise files the
           _silence_ class is cut from), validation_list.txt and testing_list.txt (whole speakers, as the real lists).
voices     VoxCeleb1 identification: OUT/VoxCeleb1/wav/id100NN/<video>/000NN.wav + iden_split.txt; each speaker is
           one espeak-ng voice variant and pitch, saying Harvard sentences.
intents    Fluent Speech Commands: OUT/fluent_speech_commands_dataset/wavs/speakers/<spk>/<n>.wav and
           data/{train,valid,test}_data.csv (index, path, speakerId, transcription, action, object, location).
languages  language ID over languages the demo backbone never heard, as a path<TAB>label manifest (header line):
           OUT/lid/{train,valid,test}.tsv, audio under OUT/lid/audio/<lang>/.
Speakers are espeak-ng voice variants; each split has its own speakers where the real corpus does (keywords,
intents), the same speakers where it does not (VoxCeleb1 identification: a speaker's videos are split).
"""
import argparse
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

from tools.synth_corpus import SENTENCES, VARIANTS, resample, speak

RATE = 16000
UNKNOWN_WORDS = ("bed", "bird", "cat", "dog", "happy", "house")
KS_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
INTENTS = [  # (transcription, action, object, location): Fluent Speech Commands' style
    ("Turn on the lights", "activate", "lights", "none"), ("Switch off the lights", "deactivate", "lights", "none"),
    ("Turn up the heat in the kitchen", "increase", "heat", "kitchen"),
    ("Turn down the heat in the bedroom", "decrease", "heat", "bedroom"),
    ("Play the music", "activate", "music", "none"), ("Stop the music", "deactivate", "music", "none"),
    ("Make it louder", "increase", "volume", "none"), ("Make it quieter", "decrease", "volume", "none"),
    ("Switch the lights on in the washroom", "activate", "lights", "washroom"),
    ("Bring me my shoes", "bring", "shoes", "none"), ("Change the language", "change language", "none", "none"),
    ("Bring me the newspaper", "bring", "newspaper", "none"),
]
LANGUAGES = {  # espeak-ng voice -> a few everyday sentences in that language
    "de": ["Guten Morgen, wie geht es dir heute?", "Das Wetter ist heute sehr schön.", "Ich trinke gern Kaffee.",
           "Wir fahren morgen in die Stadt.", "Der Hund spielt im Garten.", "Kannst du mir bitte helfen?"],
    "fr-fr": ["Bonjour, comment allez-vous aujourd'hui?", "Il fait très beau ce matin.", "J'aime beaucoup le pain.",
              "Nous partons demain à la mer.", "Le chat dort sur la chaise.", "Pouvez-vous m'aider, s'il vous plaît?"],
    "it": ["Buongiorno, come stai oggi?", "Il tempo è molto bello.", "Mi piace il caffè la mattina.",
           "Domani andiamo al mare.", "Il cane gioca nel giardino.", "Puoi aiutarmi, per favore?"],
    "pl": ["Dzień dobry, jak się masz?", "Dzisiaj jest bardzo ładna pogoda.", "Lubię pić herbatę rano.",
           "Jutro jedziemy do miasta.", "Pies bawi się w ogrodzie.", "Czy możesz mi pomóc?"],
    "fi": ["Hyvää huomenta, mitä kuuluu?", "Tänään on kaunis ilma.", "Juon mielelläni kahvia aamulla.",
           "Huomenna lähdemme kaupunkiin.", "Koira leikkii pihalla.", "Voitko auttaa minua?"],
    "tr": ["Günaydın, bugün nasılsın?", "Hava bugün çok güzel.", "Sabahları çay içmeyi severim.",
           "Yarın şehre gidiyoruz.", "Köpek bahçede oynuyor.", "Bana yardım eder misin?"],
}


def _say(jobs: list[tuple], workers: int, tone: bool = False) -> list[np.ndarray]:
    """[(text, voice, variant, speed, pitch)] -> 16 kHz float32 audio of each; `tone`: synth_corpus's tone stand-in
    (fast; enough for layout tests, not for learning)."""
    def run(job):
        text, voice, variant, speed, pitch = job
        return resample(speak(text, "tone" if tone else voice, variant, speed, pitch)[0], RATE)
    with ThreadPoolExecutor(workers) as pool:  # espeak-ng runs in child processes
        return list(pool.map(run, jobs))


def _write(path: Path, audio: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio, RATE, subtype="PCM_16")


def _speakers(rng: random.Random, n: int) -> list[tuple[str, int]]:
    """n distinct (voice variant, pitch) speakers: male and female variants in turn, pitches spread over 20-80."""
    variants = [v for pair in zip(VARIANTS[:5], VARIANTS[5:], strict=True) for v in pair]  # m1 f1 m2 f2 ...
    return [(variants[k % len(variants)], 20 + (60 * k) // max(n - 1, 1) + rng.randint(-3, 3)) for k in range(n)]


def keywords(out: Path, per_class: int = 8, seed: int = 0, workers: int = 4,
             tone: bool = False, held_out: int = 1) -> Path:
    """Speech Commands v0.01 layout; speakers 0-5 train, 6 dev, 7 test (per word, `per_class` files in all, the last
    `held_out` of them test, the `held_out` before those dev)."""
    rng, folder = random.Random(seed), out / "speech_commands_v0.01"
    speakers = _speakers(rng, 8)
    jobs, names = [], []
    for word in KS_WORDS + UNKNOWN_WORDS:
        for n in range(per_class):
            spk = n % 6 if n < per_class - 2 * held_out else 6 if n < per_class - held_out else 7
            variant, pitch = speakers[spk]
            jobs.append((word, "en-us", variant, rng.randint(150, 200), pitch))
            names.append((word, f"{spk:08x}_nohash_{n}.wav", spk))
    dev, test = [], []
    for (word, name, spk), audio in zip(names, _say(jobs, workers, tone), strict=True):
        clip = np.zeros(RATE, dtype=np.float32)  # 1 s, the word somewhere inside, as the real clips
        audio = audio[:RATE]
        start = rng.randint(0, RATE - len(audio))
        clip[start: start + len(audio)] = audio
        _write(folder / word / name, clip + 0.002 * np.random.default_rng(len(dev) + len(test)).standard_normal(
            RATE).astype(np.float32))
        (dev if spk == 6 else test if spk == 7 else []).append(f"{word}/{name}\n")
    g = np.random.default_rng(seed)
    for kind in ("white_noise", "pink_noise"):  # 10 s each: 10 one-second _silence_ clips a file
        noise = g.standard_normal(10 * RATE)
        if kind == "pink_noise":
            noise = np.cumsum(noise) * 0.02
            noise -= np.convolve(noise, np.ones(400) / 400, mode="same")
        _write(folder / "_background_noise_" / f"{kind}.wav", (0.1 * noise / np.abs(noise).max()).astype(np.float32))
    (folder / "validation_list.txt").write_text("".join(dev))
    (folder / "testing_list.txt").write_text("".join(test))
    return folder


def voices(out: Path, speakers: int = 4, per_class: int = 8, seed: int = 0, workers: int = 4,
           tone: bool = False, held_out: int = 1) -> Path:
    """VoxCeleb1 identification layout: per speaker `per_class` utterances over 4 videos; iden_split 1/2/3 (the last
    `held_out` test, the `held_out` before those dev)."""
    rng, folder = random.Random(seed), out / "VoxCeleb1"
    styles = _speakers(rng, speakers)
    jobs, rows = [], []
    for s, (variant, pitch) in enumerate(styles):
        for n in range(per_class):
            jobs.append((SENTENCES[(s + 3 * n) % len(SENTENCES)], "en-us", variant, rng.randint(150, 190), pitch))
            split = "1" if n < per_class - 2 * held_out else "2" if n < per_class - held_out else "3"
            rows.append((split, f"id{10001 + s}/vid{n % 4:02d}/{n + 1:05d}.wav"))
    for (_, rel), audio in zip(rows, _say(jobs, workers, tone), strict=True):
        _write(folder / "wav" / rel, audio)
    (folder / "iden_split.txt").write_text("".join(f"{split} {rel}\n" for split, rel in rows))
    return folder


def intents(out: Path, per_class: int = 6, seed: int = 0, workers: int = 4,
            tone: bool = False) -> Path:
    """Fluent Speech Commands layout: per intent `per_class` utterances; the last two speakers are valid / test."""
    rng, folder = random.Random(seed), out / "fluent_speech_commands_dataset"
    styles = _speakers(rng, per_class)
    jobs, rows = [], []
    for i, (text, action, obj, location) in enumerate(INTENTS):
        for n in range(per_class):
            variant, pitch = styles[n]
            jobs.append((text, "en-us", variant, rng.randint(150, 190), pitch))
            split = "valid" if n == per_class - 2 else "test" if n == per_class - 1 else "train"
            rows.append((split, f"wavs/speakers/spk{n:02d}/{i:03d}-{n:02d}.wav", f"spk{n:02d}", text, action, obj,
                         location))
    for row, audio in zip(rows, _say(jobs, workers, tone), strict=True):
        _write(folder / row[1], audio)
    for split in ("train", "valid", "test"):
        lines = [",path,speakerId,transcription,action,object,location\n"]
        lines += [f"{k},{r[1]},{r[2]},{r[3]},{r[4]},{r[5]},{r[6]}\n"
                  for k, r in enumerate(r for r in rows if r[0] == split)]
        (folder / "data").mkdir(parents=True, exist_ok=True)
        (folder / "data" / f"{split}_data.csv").write_text("".join(lines))
    return folder


def languages(out: Path, per_class: int = 8, seed: int = 0, workers: int = 4,
              tone: bool = False, held_out: int = 1) -> Path:
    """Language ID manifest: per language `per_class` utterances (sentences x speakers), the last `held_out` test,
    the `held_out` before those valid."""
    rng, folder = random.Random(seed), out / "lid"
    styles = _speakers(rng, per_class)
    jobs, rows = [], []
    for lang, sentences in LANGUAGES.items():
        for n in range(per_class):
            variant, pitch = styles[n]
            jobs.append((sentences[n % len(sentences)], lang, variant, rng.randint(150, 190), pitch))
            split = "train" if n < per_class - 2 * held_out else "valid" if n < per_class - held_out else "test"
            rows.append((split, f"audio/{lang}/{n:03d}.wav", lang))
    for row, audio in zip(rows, _say(jobs, workers, tone), strict=True):
        _write(folder / row[1], audio)
    for split in ("train", "valid", "test"):
        (folder / f"{split}.tsv").write_text("path\tlabel\n" + "".join(
            f"{rel}\t{lang}\n" for s, rel, lang in rows if s == split))
    return folder


TASKS = {"keywords": keywords, "voices": voices, "intents": intents, "languages": languages}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="output folder (the --data-root to give s3r)")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--per-class", type=int, default=8, help="utterances per class (by default the last two: dev and "
                   "test)")
    p.add_argument("--held-out", type=int, default=1, help="keywords, voices, languages: utterances per class in each "
                   "of dev and test (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tone", action="store_true", help="tones instead of espeak-ng speech (layout tests only)")
    a = p.parse_args(argv)
    if a.held_out < 1 or 2 * a.held_out >= a.per_class:
        p.error(f"--held-out {a.held_out}: needs 1 <= 2 x held-out < --per-class {a.per_class}")
    held = {"held_out": a.held_out} if a.task != "intents" else {}
    folder = TASKS[a.task](Path(a.out), per_class=a.per_class, seed=a.seed, tone=a.tone, **held)
    print(f"wrote {a.task} under {folder}")


if __name__ == "__main__":
    main()
