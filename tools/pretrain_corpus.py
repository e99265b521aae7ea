"""Unlabelled pretraining audio for the miniature's self-supervised backbone: many voices, no transcripts.

    apt-get install -y espeak-ng sox festival festvox-kallpc16k festvox-us-slt-hts \
        fortunes fortunes-de fortunes-pl fortunes-br fortunes-cs hunspell-hu hunspell-el wukrainian
    python -m tools.miniature --stage corpus      # the held-out languages' CommonVoice-layout corpora
    python -m tools.pretrain_corpus               # -> runs/pretrain/corpus/{train,valid}.tsv + audio/

What it writes is a fairseq pretraining manifest (wav2vec 2.0 / HuBERT `train.tsv`, `valid.tsv`: the root
folder on the first line, then `relpath<TAB>num_samples`) over 16 kHz FLAC, and `info.json` (hours, voices,
synthesis time). Text is only the input of the synthesiser: nothing written here holds a transcript.

The audio:
  - the eight pretraining languages (text_sources.PRETRAIN), UTTS_PER_LANG utterances each, from the Debian text
    packages text_sources names, read by espeak-ng with a voice variant drawn per utterance from VARIANTS
    (espeak-ng's male/female variants, the klatt formant voices and named speakers; 51 in all), with pitch,
    pitch range and speed drawn per utterance; English also by festival's kal (diphone) and slt (HTS) voices
    when installed;
  - the *train* audio of the held-out languages (text_sources.HELD_OUT) from the miniature corpus, once as is
    and once augmented, as XLS-R's pretraining data included CommonVoice; their dev and test audio stay unseen.
Every synthesised utterance, and the second copy of each held-out one, then goes through sox: a speed factor,
reverberation on about a third of them, and noise (white, pink or brown, 15-40 dB SNR) on about half.

Resumable: the work is cut into shards of SHARD utterances, each written to a temporary folder and renamed when
complete; run the command again and it makes only the missing shards, then rewrites the manifests.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

from tools import text_sources

ROOT = Path(__file__).resolve().parent.parent
RATE = 16000
SHARD = 100
UTTS_PER_LANG = 420  # x 8 languages x ~2.9 s: ~2.7 h (and ~1.6 h of held-out train clips)
VALID_EVERY = 50  # one utterance in 50 goes to valid.tsv (the pretraining's own held-out loss)
# espeak-ng voice variants (espeak-ng --voices=variant); robotic, whispered and novelty variants left out
VARIANTS = (["m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5"]
            + ["klatt", "klatt2", "klatt3", "klatt4", "klatt6"]
            + ["adam", "Alex", "Andy", "antonio", "aunty", "belinda", "benjamin", "boris", "caleb", "david", "ed",
               "edward", "Gene", "gustave", "Henrique", "Hugo", "iven", "iven2", "john", "Lee", "linda", "marcelo",
               "Marco", "max", "Michael", "michel", "miguel", "Mike", "pablo", "paul", "pedro", "quincy", "rob"])
FESTIVAL_VOICES = {"kal": "voice_kal_diphone", "slt": "voice_cmu_us_slt_arctic_hts"}
FESTIVAL_SHARE = 0.15  # of English utterances, when festival and its voices are installed


def festival_voices() -> list[str]:
    if shutil.which("text2wave") is None:
        return []
    voices = Path("/usr/share/festival/voices")
    have = {p.name for p in voices.glob("*/*")} if voices.exists() else set()
    return [v for v in FESTIVAL_VOICES if any(name.startswith(v) or f"_{v}_" in name for name in have)]


def _run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, **kw)
    if res.returncode != 0:
        err = res.stderr.decode(errors="replace").strip() if isinstance(res.stderr, bytes) else res.stderr
        raise RuntimeError(f"{cmd[0]} failed: {err or res.returncode}")
    return res


def augment(src: str, dst: str, rng: random.Random, speed: float = 1.0) -> dict:
    """sox: resample to 16 kHz mono, speed factor, reverberation on ~1/3; returns what it applied."""
    effects, applied = [], {}
    if abs(speed - 1.0) > 1e-3:
        effects += ["speed", f"{speed:.3f}"]
        applied["speed"] = round(speed, 3)
    if rng.random() < 0.35:
        room = [str(rng.randint(20, 70)), "50", str(rng.randint(20, 80))]
        effects += ["reverb", *room]
        applied["reverb"] = room
    _run(["sox", "-q", src, "-r", str(RATE), "-c", "1", "-b", "16", dst, *effects, "rate", str(RATE)])
    return applied


def add_noise(audio: np.ndarray, rng: random.Random) -> tuple[np.ndarray, dict]:
    """White, pink or brown noise at 15-40 dB SNR on about half of the utterances; then a random gain."""
    applied = {}
    if rng.random() < 0.5:
        colour = rng.choice(["white", "pink", "brown"])
        gen = np.random.default_rng(rng.getrandbits(32))
        white = gen.standard_normal(len(audio))
        if colour == "white":
            noise = white
        else:  # shape the spectrum: 1/f (pink) or 1/f^2 (brown) power
            spec = np.fft.rfft(white)
            f = np.maximum(np.arange(len(spec)), 1)
            noise = np.fft.irfft(spec / (np.sqrt(f) if colour == "pink" else f), n=len(audio))
        snr = rng.uniform(15, 40)
        p_sig, p_noise = float(np.mean(audio ** 2)) + 1e-10, float(np.mean(noise ** 2)) + 1e-10
        audio = audio + noise * np.sqrt(p_sig / p_noise / 10 ** (snr / 10))
        applied["noise"] = [colour, round(snr, 1)]
    audio = audio / (np.abs(audio).max() + 1e-6) * rng.uniform(0.3, 0.95)
    return audio.astype(np.float32), applied


def synth_one(job: dict, tmp: str) -> tuple[np.ndarray, dict]:
    """One utterance as 16 kHz float32 and the description of how it was made (voice, augmentation)."""
    rng = random.Random(job["seed"])
    raw, wav = os.path.join(tmp, "raw.wav"), os.path.join(tmp, "out.wav")
    meta = {k: v for k, v in job.items() if k not in ("text", "seed")}
    if job["kind"] == "espeak":
        _run(["espeak-ng", "-v", f"{job['voice']}+{job['variant']}", "-s", str(job["wpm"]), "-p",
              str(job["pitch"]), "-a", "120", "-w", raw, "--stdin"], input=job["text"].encode())
        speed = 1.0
    elif job["kind"] == "festival":
        _run(["text2wave", "-eval", f"({FESTIVAL_VOICES[job['voice']]})", "-o", raw], input=job["text"].encode())
        speed = rng.uniform(0.85, 1.15)
    else:  # a held-out language's train clip, re-used as it is or augmented
        raw = job["path"]
        speed = rng.uniform(0.9, 1.1) if job["augment"] else 1.0
        if not job["augment"]:
            _run(["sox", "-q", raw, "-r", str(RATE), "-c", "1", "-b", "16", wav])
            audio, _ = sf.read(wav, dtype="float32")
            return audio, meta
    meta.update(augment(raw, wav, rng, speed))
    audio, rate = sf.read(wav, dtype="float32")
    assert rate == RATE, rate
    audio, noise = add_noise(audio, rng)
    meta.update(noise)
    return audio, meta


def plan_synthesis(utts_per_lang: int, seed: int) -> list[dict]:
    """Every utterance to synthesise: a job dict each, with its own seed, so that any shard can be redone alone."""
    festival = festival_voices()
    jobs = []
    for i, lang in enumerate(text_sources.PRETRAIN):
        rng = random.Random(seed * 100 + i)  # per language: another --utts-per-lang leaves the others' draws alone
        texts = text_sources.sentences(lang, utts_per_lang, seed=5000 + i)
        for n in range(utts_per_lang):
            job = {"lang": lang, "text": texts[n % len(texts)], "seed": rng.getrandbits(32)}
            if lang == "en" and festival and rng.random() < FESTIVAL_SHARE:
                job.update(kind="festival", voice=rng.choice(festival))
            else:
                job.update(kind="espeak", voice=text_sources.voice(lang), variant=rng.choice(VARIANTS),
                           pitch=rng.randint(15, 85), wpm=rng.randint(120, 220))
            jobs.append(job)
    return jobs


def plan_heldout(corpus: Path, seed: int) -> list[dict]:
    """The held-out languages' train clips, each twice (as is, augmented); only the clip column is read."""
    rng = random.Random(seed + 1)
    release = corpus / "cv-corpus-mini"
    jobs = []
    for lang in text_sources.HELD_OUT:
        tsv = release / lang / "train.tsv"
        if not (release / lang / "DONE").exists():
            raise SystemExit(f"error: {release / lang} is missing or unfinished: run `python -m tools.miniature "
                             f"--stage corpus` first")
        rows = tsv.read_text(encoding="utf-8").splitlines()
        col = rows[0].split("\t").index("path")
        for row in rows[1:]:
            clip = release / lang / "clips" / row.split("\t")[col]
            for augment_it in (False, True):
                jobs.append({"lang": lang, "kind": "heldout-train", "path": str(clip), "augment": augment_it,
                             "seed": rng.getrandbits(32)})
    return jobs


def make_shard(out: Path, k: int, jobs: list[dict], workers: int) -> dict:
    final = out / "audio" / f"{k:03d}"
    if (final / "DONE").exists():
        return json.loads((final / "DONE").read_text())
    t0 = time.time()
    tmp = out / "audio" / f".tmp-{k:03d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def run(n_job):
        n, job = n_job
        with tempfile.TemporaryDirectory() as scratch:
            audio, meta = synth_one(job, scratch)
        sf.write(tmp / f"{n:03d}.flac", audio, RATE, subtype="PCM_16")
        return {"file": f"{k:03d}/{n:03d}.flac", "samples": len(audio), **meta}

    with ThreadPoolExecutor(workers) as pool:  # the work is in child processes (espeak-ng, sox)
        rows = list(pool.map(run, enumerate(jobs)))
    done = {"rows": rows, "seconds_to_make": round(time.time() - t0, 1)}
    (tmp / "DONE").write_text(json.dumps(done) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return done


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default=str(ROOT / "runs" / "miniature" / "corpus"),
                   help="the miniature corpus (its held-out languages' train clips are used)")
    p.add_argument("--out", default=str(ROOT / "runs" / "pretrain" / "corpus"))
    p.add_argument("--utts-per-lang", type=int, default=UTTS_PER_LANG)
    p.add_argument("--workers", type=int, default=1, help="synthesiser processes at a time")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = Path(a.out)
    t0, rows, make_seconds, k = time.time(), [], 0.0, 0
    # synthesis first; the held-out clips are planned when reached (the miniature corpus may still be in the making)
    for make_jobs in (lambda: plan_synthesis(a.utts_per_lang, a.seed), lambda: plan_heldout(Path(a.corpus), a.seed)):
        jobs = make_jobs()
        for i in range(0, len(jobs), SHARD):
            done = make_shard(out, k, jobs[i:i + SHARD], a.workers)
            rows += done["rows"]
            make_seconds += done["seconds_to_make"]
            print(f"shard {k}: {sum(r['samples'] for r in done['rows']) / RATE / 60:.1f} min of audio in "
                  f"{done['seconds_to_make']:.0f} s", flush=True)
            k += 1
    root = (out / "audio").resolve()
    for split, keep in (("train", lambda n: n % VALID_EVERY != VALID_EVERY - 1),
                        ("valid", lambda n: n % VALID_EVERY == VALID_EVERY - 1)):
        lines = [f"{r['file']}\t{r['samples']}" for n, r in enumerate(rows) if keep(n)]
        (out / f"{split}.tsv").write_text(f"{root}\n" + "\n".join(lines) + "\n")
    hours = sum(r["samples"] for r in rows) / RATE / 3600
    voices = sorted({f"{r['voice']}+{r['variant']}" if r["kind"] == "espeak" else f"festival:{r['voice']}"
                     for r in rows if r["kind"] != "heldout-train"})
    variants = sorted({r["variant"] for r in rows if r["kind"] == "espeak"} | {
        f"festival:{r['voice']}" for r in rows if r["kind"] == "festival"})
    info = {"hours": round(hours, 2), "utterances": len(rows),
            "hours_per_lang": {lg: round(sum(r["samples"] for r in rows if r["lang"] == lg) / RATE / 3600, 3)
                               for lg in dict.fromkeys(r["lang"] for r in rows)},
            "hours_heldout_train": round(sum(r["samples"] for r in rows if r["kind"] == "heldout-train")
                                         / RATE / 3600, 2),
            "speaker_variants": variants, "num_speaker_variants": len(variants), "num_voices": len(voices),
            "augmented_share": round(sum(1 for r in rows if "noise" in r or "reverb" in r) / len(rows), 3),
            "synthesis_minutes": round(make_seconds / 60, 1), "workers": a.workers,
            "text_packages": sorted({text_sources.SOURCES[lg]["package"] for lg in text_sources.PRETRAIN}),
            "command": " ".join(["python -m tools.pretrain_corpus", *(sys.argv[1:] if argv is None else argv)])}
    (out / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"{info['hours']} h in {len(rows)} utterances ({info['num_speaker_variants']} speaker variants), "
          f"{info['synthesis_minutes']} min of synthesis; manifests in {out} ({time.time() - t0:.0f} s this run)")


if __name__ == "__main__":
    main()
