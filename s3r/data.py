"""Speech corpora as downloaded, audio loading, and fairseq-style token-budget batching.

Corpora are read in place, no preparation step (durations are scanned once with soundfile.info and cached
under $S3R_CACHE or ~/.cache/s3r). `--data NAME --data-root DIR`, where DIR holds or is one of:
  LibriSpeech   DIR/LibriSpeech/<split>/<spk>/<chapter>/<spk>-<chapter>.trans.txt + <id>.flac
                NAME: train-clean-100, train-clean-360, train-other-500, dev-clean, dev-other, test-clean, test-other
  Libri-light   DIR/librispeech_finetuning/{1h/{0..5},9h}/{clean,other}/<spk>/<chapter>/... (same files)
                NAME: train-10m (= 1h/0), train-1h (= 1h/*), train-10h (= 1h/* + 9h), as upstream names them
  CommonVoice   DIR/cv-corpus-*/<lang>/<split>.tsv + clips/ (DIR may be the release or the language folder)
                NAME: <lang>-<split>, split in train/dev/test/validated; zh-TW and zh_TW both work
                The paper's setting (XLSR-53's low-resource CommonVoice, Rivière et al. 2020): NAME
                <lang>-train-1h, -train-5h, -dev-1h, -test-1h read the clips a list names, one clip name per
                line (with or without .mp3), from validated.tsv. The published lists (common_voices_splits.tar.gz:
                <lang>/trainSeqs_1.0_uniform_new_version.txt, trainSeqs_5.0_..., testSeqs_uniform_new_version.txt)
                are found in DIR/common_voices_splits/<lang>/ (lang as zh-TW, zh_TW or zh) or in the language
                folder; any split may also be given as <lang folder>/<split>.txt (dev-1h has no published list).
  fairseq       NAME: a manifest .tsv (root on line 1, then relpath<TAB>num_samples) with sibling .ltr (or
                .wrd) labels and dict.ltr.txt, as written by examples/wav2vec/{wav2vec_manifest,libri_labels}.py
  demo          NAME: demo or demo-<split>: s3r/assets/demo/<split>.tsv, or a split in a layout above there
Transcripts: LibriSpeech letters UPPERCASE with apostrophes (fairseq .ltr); CommonVoice sentences
normalized by text.normalize_text to lowercase characters. units="phone": CommonVoice sentences are
phonemized by espeak-ng (voice from the language: zh-TW -> cmn, sv-SE -> sv, fr -> fr-fr; IPA phones, stress
removed, "|" between words; cached under $S3R_CACHE); the phone transcripts tools/synth_corpus.py writes are
read where present (<spk>-<chapter>.phn.txt, a `phonemes` TSV column, or <split>.phn).

Batching follows fairseq data_utils.batch_by_size (padded samples per batch <= max_tokens, batches of 8 or
more cut to a multiple of required_batch_size_multiple=8) and audio follows RawAudioDataset (mono 16 kHz;
normalize_waveform: zero mean, unit variance per utterance, when the checkpoint was pretrained so).
Bad input raises a one-line DataError naming the file (and line) and what is wrong; with skip_bad a bad
utterance (missing or undecodable audio, a bad transcript line) is skipped and listed. A file or folder that
cannot be read as a whole (a .tsv that is not a manifest, a folder without transcripts) stops even then.

    python -m s3r.data --data-root /data --data dev-clean [--json] [--check] [--skip-bad] [--bench 200]
"""
import contextlib
import functools
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from .errors import ArgumentParser, S3RError
from .text import LIBRISPEECH_LETTERS, Vocabulary, normalize_text

SAMPLE_RATE = 16000  # every wav2vec 2.0 checkpoint was trained on 16 kHz audio
LIBRISPEECH_SPLITS = ("train-clean-100", "train-clean-360", "train-other-500", "dev-clean", "dev-other",
                      "test-clean", "test-other")
LIBRILIGHT_SPLITS = {"train-10m": ["1h/0"], "train-1h": [f"1h/{k}" for k in range(6)],
                     "train-10h": [f"1h/{k}" for k in range(6)] + ["9h"]}
CV_SPLITS = ("train", "dev", "test", "validated")
# Rivière et al. 2020's clip lists (dl.fbaipublicfiles.com/cpc_audio/common_voices_splits.tar.gz, one folder per
# language), as the CPC_audio README names them; a list may also be written as <lang folder>/<split>.txt.
CV_CLIP_LISTS = {"train-1h": "trainSeqs_1.0_uniform_new_version.txt",
                 "train-5h": "trainSeqs_5.0_uniform_new_version.txt",
                 "test-1h": "testSeqs_uniform_new_version.txt", "test-5h": "testSeqs_uniform_new_version.txt"}
# CommonVoice codes whose espeak-ng voice is not the code or its first part (Rivière et al. phonemized zh as cmn)
ESPEAK_VOICES = {"zh-TW": "cmn", "zh-CN": "cmn", "zh-HK": "yue", "fr": "fr-fr", "en": "en-us"}
DEMO_DIR = Path(__file__).parent / "assets" / "demo"
IO_THREADS = 8  # soundfile releases the GIL, so threads overlap file reads (and help most on network disks)


class DataError(S3RError):
    """A missing, unreadable or inconsistent corpus file; the message names it (and the line)."""


@dataclass
class Utterance:
    """One audio file and its transcript."""
    id: str
    path: str
    num_samples: int  # samples in the file, at the file's own rate
    sample_rate: int  # the file's rate (LibriSpeech flac 16000, CommonVoice mp3 48000)
    text: str  # normalized transcript: words, or space-separated phones with "|" between words; or a class label
    offset: int | None = None  # a clip of the file: its first sample (file rate), num_samples long; None: all of it

    @property
    def length(self) -> int:
        """Samples after resampling to 16 kHz: what batching counts (torchaudio rounds up)."""
        return -(-self.num_samples * SAMPLE_RATE // self.sample_rate)

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sample_rate


@dataclass
class Corpus:
    """The utterances a NAME resolves to, with what was learned while reading them."""
    name: str
    kind: str  # librispeech | librilight | commonvoice | manifest
    root: str  # the folder or manifest that was read
    language: str | None  # "en", CommonVoice code ("zh-TW"), None when a manifest does not say
    units: str  # letter | char | phone: how Utterance.text is tokenized
    utterances: list[Utterance]
    vocab: Vocabulary | None = None  # found with the data (dict.ltr.txt, LibriSpeech letters), else None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file[:line], reason), with skip_bad

    @property
    def seconds(self) -> float:
        return sum(u.seconds for u in self.utterances)


class _Problems(list):
    """Collects bad input: raises at the first one by default, records (where, reason) with skip_bad."""

    def __init__(self, skip_bad: bool):
        super().__init__()
        self.skip_bad = skip_bad

    def __call__(self, where, reason: str):
        if not self.skip_bad:
            raise DataError(f"{where}: {reason} (--skip-bad skips such files)")
        self.append((str(where), reason))


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _read_lines(path: Path, bad: _Problems) -> list[tuple[int, str | None]]:
    """(line number, text) for every line; None where a line is not UTF-8 (reported with its number)."""
    raw = _read_bytes(path)
    lines = []
    for n, line in enumerate(raw.removesuffix(b"\n").split(b"\n") if raw else [], 1):
        try:
            lines.append((n, line.decode("utf-8").rstrip("\r")))
        except UnicodeDecodeError as e:
            bad(f"{path}:{n}", f"not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1})")
            lines.append((n, None))
    return lines


# ---------------------------------------------------------------- readers
def _read_chapters(folders: list[Path], units: str, bad: _Problems) -> list[tuple[str, str, str]]:
    """LibriSpeech chapter folders -> (id, audio path, text); both directions of mismatch are reported."""
    suffix = ".phn.txt" if units == "phone" else ".trans.txt"
    items = []
    for top in folders:
        if not top.is_dir():
            raise DataError(f"{top}: folder missing")
        transcripts = sorted(top.rglob(f"*{suffix}"))
        if not transcripts:
            raise DataError(f"{top}: no *{suffix} transcripts found")
        for trans in transcripts:
            # ids the transcript lists, readable lines or not (an undecodable line is reported once, not twice)
            listed = {ln.split()[0].decode("utf-8", "replace") + ".flac" for ln in _read_bytes(trans).splitlines()
                      if ln.strip()}
            for n, line in _read_lines(trans, bad):
                if not line:
                    continue
                uid, _, text = line.partition(" ")
                audio = trans.parent / f"{uid}.flac"
                if not audio.exists():
                    bad(f"{trans}:{n}", f"transcript line has no audio file {audio.name}")
                    continue
                text = " ".join(text.split()) if units == "phone" else normalize_text(text, case="upper")
                items.append((uid, str(audio), text))
            for audio in sorted(trans.parent.glob("*.flac")):
                if audio.name not in listed:
                    bad(audio, f"audio file has no line in {trans.name}")
    return items


def _check_root(root: Path) -> None:
    if not root.is_dir():
        raise DataError(f"--data-root {root}: {'not a folder' if root.exists() else 'no such folder'}")


def _find_cv_folder(root: Path, lang: str) -> Path:
    """The <lang> folder of a CommonVoice release, whether root is above, at, or inside the release."""
    _check_root(root)
    spellings = {lang, lang.replace("_", "-"), lang.replace("-", "_")}  # upstream writes zh_TW, releases zh-TW
    if (root / "clips").is_dir():  # root is a language folder itself
        if root.name not in spellings:
            raise DataError(f"{root} is the CommonVoice folder of {root.name!r}, not {lang!r}")
        return root
    found = [root / s for s in spellings if (root / s / "clips").is_dir()]
    found += [d / s for d in sorted(root.glob("cv-corpus-*")) for s in spellings if (d / s / "clips").is_dir()]
    if len(found) > 1:
        raise DataError(f"{lang!r} is in several CommonVoice releases ({', '.join(map(str, found))}); "
                        f"give one of them as --data-root")
    if not found:
        raise DataError(f"no CommonVoice folder for {lang!r} under {root} (looked for cv-corpus-*/{lang}/clips)")
    return found[0]


def _read_cv_table(tsv: Path, bad: _Problems) -> list[tuple[str, dict[str, str]]]:
    """Rows of a release TSV as ("file:line", {column: value}); columns looked up by header name (their set
    and order change between releases). `path` and `sentence` are required; `phonemes` (our synthetic
    corpora) is used for phone units when present."""
    lines = _read_lines(tsv, bad)
    if not lines or lines[0][1] is None:
        raise DataError(f"{tsv}: empty or unreadable header")
    header = lines[0][1].split("\t")
    missing = [c for c in ("path", "sentence") if c not in header]
    if missing:
        raise DataError(f"{tsv}: no {' or '.join(missing)} column (header: {' '.join(header)})")
    need = max(header.index("path"), header.index("sentence"), header.index("phonemes") if "phonemes" in header else 0)
    rows = []
    for n, line in lines[1:]:
        if line is None or not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) <= need:
            bad(f"{tsv}:{n}", f"{len(fields)} columns, header has {len(header)}")
            continue
        rows.append((f"{tsv}:{n}", dict(zip(header, fields, strict=False))))
    return rows


def _cv_items(rows: list[tuple[str, dict[str, str]]], folder: Path, units: str, language: str,
              bad: _Problems) -> list[tuple[str, str, str]]:
    """(id, clip path, transcript) of CommonVoice rows; phone transcripts from espeak-ng when the TSV has none."""
    found = []
    for where, row in rows:
        clip = folder / "clips" / row["path"]
        if clip.is_file():
            found.append((where, row, clip))
        else:
            bad(where, f"clip {row['path']} is missing from {clip.parent}")
    if units == "phone":
        spoken = [row["sentence"] for _, row, _ in found if "phonemes" not in row]
        phones = phonemize(spoken, espeak_voice(language)) if spoken else {}
    items = []
    for where, row, clip in found:
        if units != "phone":
            text = normalize_text(row["sentence"], case="lower")
        else:
            text = " ".join(row["phonemes"].split()) if "phonemes" in row else phones[row["sentence"]]
            if not text:
                bad(where, f"no phones for the sentence {row['sentence'][:40]!r}")
                continue
        items.append((Path(row["path"]).stem, str(clip), text))
    return items


def _find_clip_list(folder: Path, base: Path, lang: str, split: str) -> Path:
    """The clip list of `split`: in the language folder (the CPC_audio README unpacks the lists there) or in
    common_voices_splits/<lang>/ (the tarball unpacked) above the release."""
    names = [f"{split}.txt"] + ([CV_CLIP_LISTS[split]] if CV_CLIP_LISTS.get(split) else [])
    langs = dict.fromkeys([lang, lang.replace("_", "-"), lang.replace("-", "_"), re.split("[-_]", lang)[0]])
    folders = [folder] + [top / "common_voices_splits" / s for top in dict.fromkeys([base, folder.parent.parent])
                          for s in langs]
    for candidate in (f / n for f in folders for n in names):
        if candidate.is_file():
            return candidate
    raise DataError(f"no clip list for {lang}-{split}: looked for {' or '.join(names)} in {folder} and in "
                    f"common_voices_splits/{{{','.join(langs)}}}/ under {base}")


def _read_clip_list(lst: Path, folder: Path, bad: _Problems) -> list[tuple[str, dict[str, str]]]:
    """The release rows of the clips `lst` names, one per line (a clip name, with or without .mp3 or folder),
    in the list's order. The clips are looked up in validated.tsv, then the release's other TSVs."""
    wanted = []
    for n, line in _read_lines(lst, bad):
        if line is not None and line.strip():
            wanted.append((f"{lst}:{n}", Path(line.strip()).stem))
    if not wanted:
        raise DataError(f"{lst}: no clip names in it")
    index: dict[str, tuple[str, dict[str, str]]] = {}
    tables = [folder / f"{t}.tsv" for t in ("validated", "train", "dev", "test", "other", "invalidated")]
    for tsv in (t for t in tables if t.is_file()):
        for where, row in _read_cv_table(tsv, bad):
            index.setdefault(Path(row["path"]).stem, (where, row))
        if all(stem in index for _, stem in wanted):
            break  # the 1 h lists were drawn from validated clips: the other tables are rarely needed
    rows, seen = [], set()
    for where, stem in wanted:
        if stem in seen:
            bad(where, f"clip {stem} is listed twice")
        elif stem not in index:
            bad(where, f"clip {stem} is in no TSV of {folder}")
        else:
            seen.add(stem)
            rows.append(index[stem])
    return rows


# ---------------------------------------------------------------- phone transcripts (espeak-ng)
def espeak_voice(language: str) -> str:
    """The espeak-ng voice for a CommonVoice language code (zh-TW -> cmn, sv-SE -> sv, fr -> fr-fr)."""
    voices = _espeak()[2]
    base = re.split("[-_]", language)[0].lower()
    choices = [ESPEAK_VOICES.get(language.replace("_", "-")), language, language.lower(), base]
    choices += sorted(v for v in voices if v.startswith(base + "-"))
    voice = next((v for v in choices if v in voices), None)
    if voice is None:
        raise DataError(f"espeak-ng has no voice for the CommonVoice language {language!r} "
                        "(espeak-ng --voices lists them), so its sentences cannot be phonemized")
    return voice


@functools.lru_cache(maxsize=1)
def _espeak_info(exe: str) -> tuple[str, frozenset[str]]:
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    listing = subprocess.run([exe, "--voices"], capture_output=True, text=True).stdout.splitlines()[1:]
    version = re.search(r"text-to-speech: (\S+)", version)
    return version.group(1) if version else "unknown", frozenset(ln.split()[1] for ln in listing if len(ln.split()) > 1)


def _espeak() -> tuple[str, str, frozenset[str]]:
    """(executable, version, voices) of the installed espeak-ng."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DataError("phone units for CommonVoice need espeak-ng to phonemize the sentences, and it is not "
                        "installed (apt install espeak-ng)")
    return (exe, *_espeak_info(exe))


def ipa_phones(ipa: str) -> str:
    """espeak-ng `--ipa --sep=_` output -> "p h o n e s | p h o n e s": stress marks and language switches
    ("(en)") removed, as phonemizer does; espeak's lines (one per clause) joined."""
    words = []
    for word in re.sub(r"\([a-z-]+\)", " ", ipa).split():
        phones = [p for p in word.replace("ˈ", "").replace("ˌ", "").split("_") if p]
        if phones:
            words.append(" ".join(phones))
    return " | ".join(words)


def phonemize(sentences: list[str], voice: str) -> dict[str, str]:
    """{sentence: phone transcript} by espeak-ng, cached under $S3R_CACHE per espeak version and voice."""
    exe, version, _ = _espeak()
    cache_dir = Path(os.environ.get("S3R_CACHE") or Path.home() / ".cache" / "s3r")
    cache_file = cache_dir / f"phones-espeak-{version}-{voice}.json"
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    todo = sorted(set(sentences) - set(cache))

    def speak(text: str) -> str:  # text on stdin: a sentence starting with "-" is not an option
        res = subprocess.run([exe, "-q", "-v", voice, "--ipa", "--sep=_", "--stdin"], input=text,
                             capture_output=True, text=True)
        if res.returncode:
            raise DataError(f"espeak-ng -v {voice} failed on {text[:40]!r}: {res.stderr.strip()[:200]}")
        return ipa_phones(res.stdout)

    if todo:
        with ThreadPoolExecutor(IO_THREADS) as pool:  # espeak-ng runs in child processes: threads overlap them
            cache.update(zip(todo, pool.map(speak, todo), strict=True))
        try:  # write-then-rename, as the audio scan cache
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, ensure_ascii=False), encoding="utf-8")
            os.replace(tmp, cache_file)
        except OSError:
            pass
    return {s: cache[s] for s in sentences}


def _read_manifest(tsv: Path, units: str, bad: _Problems) -> list[tuple[str, str, str, int]]:
    """A fairseq manifest with labels from the sibling .ltr (preferred) / .wrd, or .phn for phone units."""
    lines = _read_lines(tsv, bad)
    if not lines or not (lines[0][1] or "").strip():
        raise DataError(f"{tsv}: not a fairseq manifest: line 1 must be the audio root folder")
    if "\t" in lines[0][1]:  # e.g. a CommonVoice tsv (client_id<TAB>path<TAB>sentence...) given as a manifest
        raise DataError(f"{tsv}:1: not a fairseq manifest: line 1 must be the audio root folder, not columns "
                        f"({lines[0][1][:50]!r}); a CommonVoice split is named <lang>-<split>")
    root, rows = Path(lines[0][1].strip()), lines[1:]
    if not root.is_absolute() and (tsv.parent / root).is_dir():
        root = tsv.parent / root  # a relative root names the manifest's own folder (the committed demo: ".")
    if not root.is_dir():
        raise DataError(f"{tsv}:1: audio root folder {root} does not exist")
    exts = ["phn"] if units == "phone" else ["ltr", "wrd"]
    label_file = next((tsv.with_suffix(f".{e}") for e in exts if tsv.with_suffix(f".{e}").exists()), None)
    if label_file is None:
        raise DataError(f"{tsv}: no labels next to it ({' or '.join(tsv.stem + '.' + e for e in exts)})")
    labels = _read_lines(label_file, bad)
    if len(labels) != len(rows):
        raise DataError(f"{label_file}: {len(labels)} lines but {tsv.name} has {len(rows)} rows")
    items = []
    for (n, row), (_, label) in zip(rows, labels, strict=True):
        if row is None or label is None:
            continue  # already reported by _read_lines
        fields = row.split("\t")
        if len(fields) < 2 or not fields[1].strip().isdigit():
            bad(f"{tsv}:{n}", "expected relative_path<TAB>num_samples")
            continue
        audio = root / fields[0]
        if not audio.is_file():
            bad(f"{tsv}:{n}", f"audio file {audio} is missing")
            continue
        if label_file.suffix == ".ltr":  # "H I | Y O U |" -> "HI YOU": Vocabulary.tokenize restores the .ltr
            label = "".join(" " if u == "|" else u for u in label.split())
        items.append((str(Path(fields[0]).with_suffix("")), str(audio), " ".join(label.split()), int(fields[1])))
    return items


# ---------------------------------------------------------------- scanning durations
def _error_text(e: Exception) -> str:
    return getattr(e, "error_string", None) or str(e).split(": ")[-1].strip().rstrip(".")


@contextlib.contextmanager
def _quiet_decoders():
    """Silence file descriptor 2 while whole folders are scanned or checked: mpg123 (inside libsndfile) prints
    "Warning: Xing stream size off..." for damaged mp3s, which our one-line report already covers."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def scan_audio(paths: list[str], bad: _Problems) -> dict[str, tuple[int, int]]:
    """(num_samples, sample_rate) per readable file, via soundfile.info; cached per (path, mtime, size)."""
    cache_dir = Path(os.environ.get("S3R_CACHE") or Path.home() / ".cache" / "s3r")
    cache_file = cache_dir / f"scan-{hashlib.sha1(chr(10).join(paths).encode()).hexdigest()[:20]}.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}

    def info(path):
        try:
            st = os.stat(path)
            stamp = [st.st_mtime_ns, st.st_size]
            if cache.get(path, [None])[:2] == stamp:
                return path, cache[path], None
            if st.st_size == 0:
                return path, None, "empty file (0 bytes)"
            i = sf.info(path)
            return path, stamp + [i.frames, i.samplerate], None if i.frames > 0 else "empty audio (0 samples)"
        except (RuntimeError, OSError) as e:  # LibsndfileError is a RuntimeError
            return path, None, f"cannot decode audio ({_error_text(e)})"

    with _quiet_decoders(), ThreadPoolExecutor(IO_THREADS) as pool:
        results = list(pool.map(info, paths))
    found, fresh = {}, {}
    for path, entry, problem in results:
        if problem:
            bad(path, problem)
        else:
            found[path], fresh[path] = (entry[2], entry[3]), entry
    if fresh != cache:
        try:  # write-then-rename, so ranks scanning at the same time never read half a file
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(fresh))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only home only costs a rescan next time
    return found


# ---------------------------------------------------------------- naming
def _first_dir(candidates: list[Path], problem: str) -> Path:
    """The first existing folder: DIR may hold the corpus folder or be it."""
    _check_root(candidates[-1].parent)
    for d in candidates:
        if d.is_dir():
            return d
    raise DataError(problem)


def resolve_corpus(name: str, root: str | None = None, skip_bad: bool = False, units: str | None = None) -> Corpus:
    """Read the corpus that `--data NAME --data-root DIR` names (see the module docstring)."""
    base, bad = Path(root or "."), _Problems(skip_bad)
    if name == "demo" or name.startswith("demo-"):
        split = name[5:] or "train"
        if not DEMO_DIR.is_dir():
            raise DataError(f"the demo corpus is not in this checkout ({DEMO_DIR} is missing)")
        tsv = DEMO_DIR / f"{split}.tsv"
        if units is None and (DEMO_DIR / "dict.phn.txt").exists():
            units = "phone"  # the demo is scored by phone error rate (espeak-ng phone transcripts only)
        if tsv.exists():
            return resolve_corpus(str(tsv), str(DEMO_DIR), skip_bad, units)
        try:
            return resolve_corpus(split, str(DEMO_DIR), skip_bad, units)
        except DataError:
            names = ", ".join(["demo (= demo-train)"] + [f"demo-{p.stem}" for p in sorted(DEMO_DIR.glob("*.tsv"))])
            raise DataError(f"unknown corpus name {name!r}: the demo's splits are {names}") from None
    cv = re.fullmatch(r"(.+)-(train|dev|test|validated)", name)
    cv_list = re.fullmatch(r"(.+)-((?:train|dev|test)-[15]h)", name)
    if name in LIBRISPEECH_SPLITS:
        kind, units, language = "librispeech", units or "letter", "en"
        where = _first_dir([base / "LibriSpeech" / name, base / name], f"no LibriSpeech/{name} folder under {base}")
        items = _read_chapters([where], units, bad)
    elif name in LIBRILIGHT_SPLITS:
        kind, units, language = "librilight", units or "letter", "en"
        where = _first_dir([base / "librispeech_finetuning" / "1h", base / "1h"],
                           f"no librispeech_finetuning/1h folder under {base}").parent
        items = _read_chapters([where / fold for fold in LIBRILIGHT_SPLITS[name]], units, bad)
    elif name.endswith(".tsv"):
        kind, units, language = "manifest", units or "letter", None
        where = Path(name) if Path(name).is_file() or root is None else base / name
        if not where.is_file():
            raise DataError(f"manifest {where} not found")
        items = _read_manifest(where, units, bad)
    elif cv:
        kind, units, language = "commonvoice", units or "char", cv.group(1).replace("_", "-")
        where = _find_cv_folder(base, cv.group(1)) / f"{cv.group(2)}.tsv"
        if not where.is_file():
            raise DataError(f"{where} not found")
        items = _cv_items(_read_cv_table(where, bad), where.parent, units, language, bad)
    elif cv_list:
        kind, units, language = "commonvoice", units or "char", cv_list.group(1).replace("_", "-")
        folder = _find_cv_folder(base, cv_list.group(1))
        where = _find_clip_list(folder, base, cv_list.group(1), cv_list.group(2))
        items = _cv_items(_read_clip_list(where, folder, bad), folder, units, language, bad)
    else:
        raise DataError(f"unknown corpus name {name!r}: expected a LibriSpeech split ({', '.join(LIBRISPEECH_SPLITS)}"
                        "), train-10m/train-1h/train-10h, <lang>-<split> or <lang>-train-1h for CommonVoice, demo, "
                        "or a manifest .tsv")

    if kind == "manifest":  # fairseq manifests carry sizes (16 kHz samples): no need to open the audio
        utts = [Utterance(uid, path, n, SAMPLE_RATE, text) for uid, path, text, n in items]
        dict_file = where.parent / f"dict.{'phn' if units == 'phone' else 'ltr'}.txt"
        vocab = Vocabulary.from_fairseq_dict(str(dict_file)) if dict_file.exists() else None
    else:
        sizes = scan_audio([path for _, path, _ in items], bad)
        utts = [Utterance(uid, p, *sizes[p], text) for uid, p, text in items if p in sizes]
        letters = set(LIBRISPEECH_LETTERS) | {" "}  # public LibriSpeech models all share fairseq's letter dict
        english = kind != "commonvoice" and units == "letter" and all(set(u.text) <= letters for u in utts)
        vocab = Vocabulary.librispeech() if english else None
    return Corpus(name, kind, str(where), language, units, utts, vocab, list(bad))


# ---------------------------------------------------------------- audio
@functools.lru_cache(maxsize=8)
def _resampler(rate: int):
    import torchaudio  # the sinc kernel of torchaudio.functional.resample, built once per source rate
    return torchaudio.transforms.Resample(rate, SAMPLE_RATE)


def load_audio(path: str, normalize_waveform: bool = False, expected: int | None = None,
               offset: int | None = None) -> torch.Tensor:
    """(S,) float32 mono waveform at 16 kHz; `expected` (file-rate samples) catches truncated files. With `offset`,
    the clip of `expected` samples that starts there (Speech Commands' silence clips cut from background noise).

    normalize_waveform: zero mean and unit variance over the utterance, for checkpoints pretrained so
    (fairseq task.normalize, Hugging Face do_normalize: wav2vec2-large-lv60, XLS-R, data2vec).
    """
    try:
        clip = {} if offset is None else {"start": offset, "frames": expected}
        data, rate = sf.read(path, dtype="float32", always_2d=True, **clip)  # (S, channels)
    except (RuntimeError, OSError) as e:
        raise DataError(f"{path}: cannot decode audio ({_error_text(e)})") from None
    if len(data) == 0:
        raise DataError(f"{path}: empty audio (0 samples)")
    if expected and len(data) < expected - rate // 100:  # 10 ms of slack for mp3 frame rounding
        raise DataError(f"{path}: truncated, decoded {len(data)} of {expected} samples")
    wav = torch.from_numpy(data).mean(dim=1)  # (S,), channels averaged
    if rate != SAMPLE_RATE:
        wav = _resampler(rate)(wav)
    if normalize_waveform:  # fairseq RawAudioDataset: F.layer_norm over the whole utterance (zero mean, unit variance)
        wav = F.layer_norm(wav, wav.shape)
    return wav


class SpeechDataset(torch.utils.data.Dataset):
    """Utterances as items {index, id, wav (S,), targets (L,)}; transcripts are encoded up front."""

    def __init__(self, utterances: list[Utterance], vocab: Vocabulary | None = None,
                 normalize_waveform: bool = False, max_sample_size: int | None = None, skip_bad: bool = False,
                 allow_unk: bool = False, seed: int = 0):
        self.utterances, self.normalize_waveform, self.skip_bad = utterances, normalize_waveform, skip_bad
        self.max_sample_size, self.seed, self.epoch = max_sample_size, seed, 0
        self.skipped: list[tuple[str, str]] = []  # utterances make_loader left out (too long for max_tokens)
        # Encoding now, not per item, makes an out-of-vocabulary symbol fail before training starts.
        self.targets = [torch.tensor(vocab.encode(u.text, f"utterance {u.id}", allow_unk), dtype=torch.long)
                        for u in utterances] if vocab else None

    def __len__(self) -> int:
        return len(self.utterances)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # new crop positions each epoch (DataLoader workers get a fresh copy per epoch)

    def __getitem__(self, i: int) -> dict:
        u = self.utterances[i]
        try:
            wav = load_audio(u.path, self.normalize_waveform, expected=u.num_samples, offset=u.offset)
        except DataError as e:
            if not self.skip_bad:
                raise
            return {"index": i, "id": u.id, "skipped": (u.path, str(e).removeprefix(f"{u.path}: "))}
        if self.max_sample_size and len(wav) > self.max_sample_size:
            # fairseq crop_to_max_size: a random window. It cuts the audio but not the transcript, so it is
            # for unlabelled audio; CTC fine-tuning keeps max_sample_size=None (fairseq's default too).
            start = np.random.default_rng((self.seed, self.epoch, i)).integers(len(wav) - self.max_sample_size + 1)
            wav = wav[start: start + self.max_sample_size]
        targets = self.targets[i] if self.targets is not None else torch.empty(0, dtype=torch.long)
        return {"index": i, "id": u.id, "wav": wav, "targets": targets}


def collate(items: list[dict], pad: int = 1) -> dict:
    """Zero-padded batch; targets padded with `pad` (CTC reads only target_lengths of them).

    Items SpeechDataset skipped (skip_bad) are left out of the tensors and listed under "skipped" for the
    training log; a batch can then be empty (B = 0), which the training loop should pass over.
    """
    good = [it for it in items if "wav" in it]
    lengths = torch.tensor([len(it["wav"]) for it in good], dtype=torch.long)  # (B,)
    target_lengths = torch.tensor([len(it["targets"]) for it in good], dtype=torch.long)  # (B,)
    wav = torch.zeros(len(good), int(lengths.max()) if good else 0)  # (B, S)
    targets = torch.full((len(good), int(target_lengths.max()) if good else 0), pad, dtype=torch.long)  # (B, L)
    for b, it in enumerate(good):
        wav[b, : lengths[b]] = it["wav"]
        targets[b, : target_lengths[b]] = it["targets"]
    return {"wav": wav, "lengths": lengths, "targets": targets, "target_lengths": target_lengths,
            "ids": [it["id"] for it in good], "indices": [it["index"] for it in good],
            "skipped": [it["skipped"] for it in items if "skipped" in it]}


# ---------------------------------------------------------------- batching
def batch_by_size(order: list[int], lengths: list[int], max_tokens: int, max_sentences: int | None = None,
                  required_batch_size_multiple: int = 1) -> list[list[int]]:
    """fairseq data_utils.batch_by_size (data_utils_fast.pyx) over the indices in `order`.

    An index joins the current batch while (batch size + 1) * longest length <= max_tokens (and the batch
    is below max_sentences). When one does not fit, a batch of `required_batch_size_multiple` (8) or more is
    cut down to a multiple of it and the cut-off indices start the next batch, ahead of the one that did not
    fit; a smaller batch goes out whole, and so does the last. fairseq orders by descending length, so a
    batch's first item is its longest and carried-over items never push the next batch over budget.
    """
    mult = required_batch_size_multiple
    batches, batch, longest = [], [], 0
    for i in order:
        longest = max(longest, lengths[i])
        if batch and ((max_sentences and len(batch) == max_sentences) or (len(batch) + 1) * longest > max_tokens):
            keep = max(mult * (len(batch) // mult), len(batch) % mult)
            batches.append(batch[:keep])
            batch = batch[keep:]
            longest = max([lengths[j] for j in batch] + [lengths[i]])
        batch.append(i)
    return batches + [batch] if batch else batches


class TokenBatchSampler(torch.utils.data.Sampler):
    """Length-bucketed batches of at most max_tokens padded samples, reshuffled per epoch, sharded over ranks.

    Each epoch as fairseq: order by descending length, ties in random (seed, epoch) order (RawAudioDataset
    .ordered_indices), cut into batches by `batch_by_size` with required_batch_size_multiple (fairseq's
    default 8), shuffle the batches, deal them to ranks round robin. With even=True (training) the batch
    list is first padded by repeating its first batches until it divides by world_size: a rank with fewer
    batches would leave DDP waiting in all-reduce forever, so up to world_size-1 batches are seen twice per
    epoch. Evaluation should use even=False (or one rank) so no utterance is scored twice. An utterance
    longer than max_tokens on its own is an error: raise max_tokens, or crop (max_sample_size), or skip it
    (make_loader with skip_bad).
    """

    def __init__(self, lengths: list[int], max_tokens: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, max_batch_size: int | None = None, even: bool = True,
                 required_batch_size_multiple: int = 8):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) and self.lengths.max() > max_tokens:
            i = int(self.lengths.argmax())
            raise DataError(f"utterance #{i} has {self.lengths[i]} samples, more than max_tokens={max_tokens}")
        if not 0 <= rank < world_size:
            raise S3RError(f"rank {rank} is outside world_size {world_size}")
        if required_batch_size_multiple < 1:
            raise S3RError(f"required_batch_size_multiple must be at least 1, not {required_batch_size_multiple}")
        self.max_tokens, self.world_size, self.rank, self.seed = max_tokens, world_size, rank, seed
        self.shuffle, self.max_batch_size, self.even = shuffle, max_batch_size, even
        self.required_batch_size_multiple = required_batch_size_multiple
        self.epoch, self.offset, self._cached = 0, 0, None

    def set_epoch(self, epoch: int, offset: int = 0) -> None:
        """Select the epoch; `offset` skips this rank's first batches (resuming a checkpoint mid-epoch)."""
        self.epoch, self.offset = epoch, offset

    def batches(self) -> list[list[int]]:
        """This rank's whole batch list for the current epoch (offset not applied)."""
        if self._cached and self._cached[0] == self.epoch:
            return self._cached[1]
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        order = order[np.argsort(-self.lengths[order], kind="stable")]  # longest first
        batches = batch_by_size(order.tolist(), self.lengths.tolist(), self.max_tokens, self.max_batch_size,
                                self.required_batch_size_multiple)
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        if self.even and batches and len(batches) % self.world_size:
            extra = self.world_size - len(batches) % self.world_size
            batches += (batches * math.ceil(extra / len(batches)))[:extra]
        self._cached = (self.epoch, batches[self.rank:: self.world_size])
        return self._cached[1]

    def __iter__(self):
        yield from self.batches()[self.offset:]

    def __len__(self) -> int:
        return max(len(self.batches()) - self.offset, 0)


def make_loader(utterances: list[Utterance], vocab: Vocabulary | None, max_tokens: int, *, train: bool = True,
                normalize_waveform: bool = False, max_sample_size: int | None = None, world_size: int = 1,
                rank: int = 0, seed: int = 0, num_workers: int = 2, skip_bad: bool = False, allow_unk: bool = False,
                required_batch_size_multiple: int = 8) -> torch.utils.data.DataLoader:
    """DataLoader over SpeechDataset + TokenBatchSampler + collate; call set_epoch(loader, e) every epoch.

    When max_sample_size crops, batching counts an utterance at its cropped size (fairseq RawAudioDataset
    .size), so a long utterance that fits once cropped is kept. One longer than max_tokens even so raises a
    DataError naming the file, or with skip_bad is left out and listed in loader.dataset.skipped.
    """
    def size(u: Utterance) -> int:
        return min(u.length, max_sample_size) if max_sample_size else u.length

    bad, keep = _Problems(skip_bad), []
    for u in utterances:
        if size(u) > max_tokens:
            cropped = " after cropping" if max_sample_size else ""
            bad(u.path, f"{u.seconds:.1f} s ({size(u)} samples{cropped}) is longer than max_tokens={max_tokens} "
                        "by itself")
        else:
            keep.append(u)
    dataset = SpeechDataset(keep, vocab, normalize_waveform, max_sample_size, skip_bad, allow_unk, seed)
    dataset.skipped = list(bad)
    sampler = TokenBatchSampler([size(u) for u in keep], max_tokens, world_size, rank, seed, shuffle=train,
                                even=train, required_batch_size_multiple=required_batch_size_multiple)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available())


def set_epoch(loader: torch.utils.data.DataLoader, epoch: int, offset: int = 0) -> None:
    """New shuffle and crops for `epoch`; `offset` = batches this rank already did (resuming mid-epoch)."""
    loader.batch_sampler.set_epoch(epoch, offset)
    loader.dataset.set_epoch(epoch)


# ---------------------------------------------------------------- summary command
def check_audio(corpus: Corpus, skip_bad: bool = False) -> None:
    """Decode every file (catches truncated or corrupt audio that the header scan cannot see)."""
    bad = _Problems(skip_bad)

    def check(u):
        try:
            load_audio(u.path, expected=u.num_samples, offset=u.offset)
            return None
        except DataError as e:
            return str(e).removeprefix(f"{u.path}: ")

    with _quiet_decoders(), ThreadPoolExecutor(IO_THREADS) as pool:
        problems = list(pool.map(check, corpus.utterances))
    for u, problem in zip(corpus.utterances, problems, strict=True):
        if problem:
            bad(u.path, problem)
    corpus.skipped += list(bad)
    corpus.utterances = [u for u, problem in zip(corpus.utterances, problems, strict=True) if not problem]


def bench(utterances: list[Utterance], n: int = 200, normalize_waveform: bool = False) -> dict:
    """Decode + resample throughput of one loader worker (one thread), on the first n utterances (cycled)."""
    if not utterances:
        return {"utterances_per_s": 0.0, "audio_s_per_s": 0.0}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like a DataLoader worker
    picked = [utterances[k % len(utterances)] for k in range(n)]
    load_audio(picked[0].path, normalize_waveform)  # build the resampler kernel outside the timing
    t0, c0 = time.perf_counter(), time.process_time()
    for u in picked:
        load_audio(u.path, normalize_waveform)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0  # CPU time: fair on a busy machine too
    torch.set_num_threads(threads)
    audio = sum(u.seconds for u in picked)
    return {"utterances_per_s": n / wall, "audio_s_per_s": audio / wall,
            "utterances_per_cpu_s": n / cpu, "audio_s_per_cpu_s": audio / cpu}


def summarize(corpus: Corpus, vocab: Vocabulary) -> dict:
    """What `python -m s3r.data` prints: counts, durations, extremes, rates, vocabulary and skipped files."""
    by_len = sorted(corpus.utterances, key=lambda u: u.seconds)
    edge = lambda u: {"id": u.id, "seconds": round(u.seconds, 3)} if u else None  # noqa: E731
    return {"name": corpus.name, "kind": corpus.kind, "root": corpus.root, "language": corpus.language,
            "units": corpus.units, "utterances": len(corpus.utterances), "seconds": round(corpus.seconds, 3),
            "shortest": edge(by_len[0] if by_len else None), "longest": edge(by_len[-1] if by_len else None),
            "sample_rates": sorted({u.sample_rate for u in corpus.utterances}), "vocab": vocab.symbols,
            "skipped": [{"path": p, "reason": r} for p, r in corpus.skipped]}


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m s3r.data", description="Summarize (and check) a speech corpus.")
    p.add_argument("--data", required=True, help="corpus name: dev-clean, train-1h, pl-train, nl-train-1h, demo, x.tsv")
    p.add_argument("--data-root", default=None, help="holds LibriSpeech/, librispeech_finetuning/, cv-corpus-*")
    p.add_argument("--units", choices=["letter", "char", "phone"], default=None, help="transcript units")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--check", action="store_true", help="decode every audio file")
    p.add_argument("--skip-bad", action="store_true", help="skip and list bad files instead of stopping")
    p.add_argument("--bench", type=int, default=0, metavar="N", help="time decoding + resampling N utterances")
    a = p.parse_args(argv)
    try:
        corpus = resolve_corpus(a.data, a.data_root, a.skip_bad, a.units)
        if a.check:
            check_audio(corpus, a.skip_bad)
        vocab = corpus.vocab or Vocabulary.build([u.text for u in corpus.utterances], corpus.units)
        summary = summarize(corpus, vocab)
        if a.bench:
            summary["bench"] = bench(corpus.utterances, a.bench)
    except S3RError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(summary, ensure_ascii=False))
        return 0
    for key in ("name", "kind", "root", "language", "units", "utterances", "seconds", "shortest", "longest",
                "sample_rates", "bench"):
        if key in summary:
            print(f"{key:>12}: {summary[key]}")
    print(f"{'vocab':>12}: {len(vocab)} symbols: {' '.join(vocab.symbols)}")
    print(f"{'skipped':>12}: {len(corpus.skipped)}")
    for path, reason in corpus.skipped:
        print(f"  {path}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
