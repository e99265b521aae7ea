"""The miniature: S3-Router's four claims measured at CPU scale on synthetic multilingual speech.

    python -m tools.miniature                 # all: corpus, backbone, lr, grid, collapse, budget, bundle, curve,
                                              # similarity, report
    python -m tools.miniature --stage corpus  # one stage (any of those; comma-separated: several)
    python -m tools.miniature --stage lr,grid --backbone s3r/assets/miniature/backbone-ssl.pt
                                              # each family's lr chosen on fr/tt dev, then the grid at those lrs
    python -m tools.miniature --stage ssl-pilot --init CKPT --pilot-tag NAME  # a backbone's pilot (es, ru; 3 methods)
    python -m tools.miniature --stage curve --curve-kinds omp prune parp imp --curve-rates 0.3
                                              # part of the pruning curve (default: every kind, six rates)

Every stage is resumable: the corpus is written one language at a time (a finished language has a DONE file),
each experiment cell caches its result as JSON under runs/miniature/cells/, and a stage skips what is cached.
Run it again after an interruption and it continues. CPU only; the budget is ~3 h on 2 cores.

Data: espeak-ng speech (tools/synth_corpus.py) of Debian-packaged text (tools/text_sources.py), in the CommonVoice
layout (48 kHz mp3 + TSV) with the espeak-ng phoneme transcripts as targets, scored by phone error rate (PER).
Pretraining languages (tools/text_sources.PRETRAIN) train the backbone; the held-out languages are upstream's ten
CommonVoice languages (tools/text_sources.HELD_OUT), whose dev and test clips the backbone never hears (the
self-supervised one pretrains on the audio of their train clips, as an SSL model may on unlabelled target speech).
"""
import argparse
import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tools import text_sources

ROOT = Path(__file__).resolve().parent.parent

OUT = ROOT / "runs" / "miniature"
RELEASE = "cv-corpus-mini"
PRETRAIN_UTTS = 300  # per pretraining language: ~13 min of speech (8 languages: ~1.7 h)
HELD_OUT_UTTS = 220  # per held-out language: ~10 min, split 2:1:1 by synth_corpus -> ~5 min train, ~2.5 dev, ~2.5 test
SPEAKERS = 8  # espeak-ng voice variant + pitch pairs per language; speed varies per utterance


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ corpus
def corpus_root(out: Path) -> Path:
    return out / "corpus"


CORPUS_LANGS = text_sources.PRETRAIN + text_sources.HELD_OUT


def make_corpus(out: Path, langs: list[str], workers: int = 2):
    """One CommonVoice-layout folder per language under out/corpus/cv-corpus-mini/<lang>, written atomically."""
    from tools.synth_corpus import synth_corpus
    release = corpus_root(out) / RELEASE
    for lang in langs:
        i = CORPUS_LANGS.index(lang)  # the seed is the language's own: a subset makes the same speech
        final = release / lang
        num = PRETRAIN_UTTS if lang in text_sources.PRETRAIN else HELD_OUT_UTTS
        if (final / "DONE").exists() and json.loads((final / "DONE").read_text())["utterances"] == num:
            continue
        t0 = time.time()
        tmp = corpus_root(out) / f".tmp-{lang}"
        shutil.rmtree(tmp, ignore_errors=True)
        texts = text_sources.sentences(lang, num, seed=1000 + i)
        synth_corpus(tmp, "commonvoice", num, voice=text_sources.voice(lang), lang=lang, texts=texts,
                     seed=1000 + i, speakers=SPEAKERS, release=RELEASE, workers=workers)
        shutil.rmtree(final, ignore_errors=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / RELEASE / lang, final)
        shutil.rmtree(tmp, ignore_errors=True)
        (final / "DONE").write_text(json.dumps({"utterances": num, "seconds_to_make": round(time.time() - t0, 1),
                                                "source": text_sources.SOURCES[lang]["package"],
                                                "voice": text_sources.voice(lang)}) + "\n")
        log(f"corpus {lang}: {num} utterances in {time.time() - t0:.0f} s")
    for lang in langs:
        if lang in text_sources.HELD_OUT and (moved := close_phone_set(release / lang)):
            log(f"corpus {lang}: {moved} dev/test utterances with phones unseen in train moved to train")


def close_phone_set(folder: Path) -> int:
    """Move dev/test rows whose phones never occur in train.tsv into train.tsv; returns how many moved.

    A vocabulary is built from the training transcripts, as for a real CommonVoice language; with a few minutes
    of speech a rare phone may occur only in dev or test, and CTC cannot emit a unit it has no output for.
    """
    tables = {s: (folder / f"{s}.tsv").read_text(encoding="utf-8").splitlines() for s in ("train", "dev", "test")}
    col = tables["train"][0].split("\t").index("phonemes")
    phones = lambda row: set(row.split("\t")[col].split())  # noqa: E731
    known = set().union(*(phones(r) for r in tables["train"][1:]))
    moved = 0
    for split in ("dev", "test"):
        keep = [tables[split][0]]
        for row in tables[split][1:]:
            if phones(row) <= known:
                keep.append(row)
            else:
                tables["train"].append(row)
                known |= phones(row)
                moved += 1
        tables[split] = keep
    if moved:
        for split, rows in tables.items():
            (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return moved


def read_phones(out: Path, lang: str, split: str = "validated") -> list[str]:
    """Phone transcripts of one language split (the `phonemes` column synth_corpus writes)."""
    rows = (corpus_root(out) / RELEASE / lang / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
    col = rows[0].split("\t").index("phonemes")
    return [r.split("\t")[col] for r in rows[1:] if r.strip()]


# ------------------------------------------------------------------------------------------------ demo
DEMO_LANG = "es"  # held out from the backbone; real sentences (fortunes-es)
DEMO_UTTS = {"train": 60, "test": 24}  # ~3 min of training speech, ~1 min of test speech


def make_demo(out: Path, dest: Path = ROOT / "s3r" / "assets" / "demo"):
    """The committed demo corpus: a fairseq manifest (train/test .tsv + .phn + dict.phn.txt), Opus at 16 kHz.

    The manifest root line is "." (the manifest's own folder), so the committed corpus works from any checkout.
    """
    import soundfile as sf

    from tools.synth_corpus import synth_corpus
    if (dest / "train.tsv").exists() and (dest / "test.tsv").exists():
        return
    tmp = out / ".tmp-demo"
    shutil.rmtree(tmp, ignore_errors=True)
    texts = text_sources.sentences(DEMO_LANG, sum(DEMO_UTTS.values()), seed=7)
    counts = {}
    for k, (split, num) in enumerate(DEMO_UTTS.items()):
        part = texts[:num] if split == "train" else texts[-num:]
        synth_corpus(tmp, "manifest", num, voice=text_sources.voice(DEMO_LANG), texts=part, split=split,
                     seed=70 + k, speakers=6, workers=2)
    (dest / "audio").mkdir(parents=True, exist_ok=True)
    for split in DEMO_UTTS:
        rows = (tmp / f"{split}.tsv").read_text().splitlines()[1:]
        lines = ["."]
        for row in rows:
            rel = row.split("\t")[0]
            audio, rate = sf.read(tmp / "audio" / rel, dtype="float32")
            new_rel = f"audio/{split}-{Path(rel).stem.split('-')[-1]}.ogg"
            sf.write(dest / new_rel, audio, rate, format="OGG", subtype="OPUS")
            lines.append(f"{new_rel}\t{sf.info(dest / new_rel).frames}")
        (dest / f"{split}.tsv").write_text("\n".join(lines) + "\n")
        shutil.copy(tmp / f"{split}.phn", dest / f"{split}.phn")
        for line in (tmp / f"{split}.phn").read_text(encoding="utf-8").splitlines():
            for u in line.split():
                counts[u] = counts.get(u, 0) + (split == "train")
    # every phone of either split, most frequent in train first (a test-only phone gets count 0)
    (dest / "dict.phn.txt").write_text("".join(f"{u} {c}\n" for u, c in sorted(counts.items(), key=lambda x: -x[1])),
                                       encoding="utf-8")
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"demo corpus written to {dest}")


# ------------------------------------------------------------------------------------------------ reference
def phone_inventories(out: Path, langs: list[str], min_count: int = 3) -> dict[str, dict[str, int]]:
    """Phone counts per language over all its transcripts (phones seen fewer than min_count times dropped)."""
    inv = {}
    for lang in langs:
        counts = {}
        for line in read_phones(out, lang):
            for u in line.split():
                if u != "|":
                    counts[u] = counts.get(u, 0) + 1
        inv[lang] = {u: c for u, c in counts.items() if c >= min_count}
    return inv


def write_reference(out: Path, langs: list[str]) -> Path:
    """Phoneme-inventory cosine similarity of every language pair: |A & B| / sqrt(|A| |B|) over phone sets.

    The binary-inventory form matches the mask cosine it is compared with; espeak-ng's phone symbols are shared
    across its languages, so identical symbols are identical phones here.
    """
    import math
    inv = phone_inventories(out, langs)
    matrix = [[len(set(inv[a]) & set(inv[b])) / math.sqrt(len(inv[a]) * len(inv[b])) for b in langs] for a in langs]
    path = out / "phoneme_similarity.json"
    path.write_text(json.dumps({"names": langs, "matrix": matrix, "inventory_sizes": {lg: len(inv[lg]) for lg in langs},
                                "definition": write_reference.__doc__.split("\n")[0]}, indent=1) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ grid
DEMO_BACKBONE = ROOT / "s3r" / "assets" / "demo" / "backbone.pt"  # the supervised stand-in (stage backbone)
SSL_BACKBONE = ROOT / "s3r" / "assets" / "miniature" / "backbone-ssl.pt"  # tools/pretrain_backbone.py
# The backbone every cell starts from: --backbone; by default the self-supervised one once it is committed.
DEFAULT_BACKBONE = SSL_BACKBONE if SSL_BACKBONE.exists() else DEMO_BACKBONE
BACKBONE = DEFAULT_BACKBONE  # main() sets it from --backbone
# Peak lr per method family, until the lr stage has chosen them (bench/results/miniature_lr.json): the better of 3e-3
# and 1e-2 for each on the built-in demo corpus (Spanish, 200 updates; PER head 9.1 at 1e-2 (75.8 at 1e-3), ft 12.4
# / 13.6, s3r-0.9 9.1 / 7.6 at 3e-3 / 1e-2).
DEMO_LRS = {"head": "1e-2", "ft": "3e-3", "s3r": "1e-2"}
RESULTS = ROOT / "bench" / "results"  # where every stage writes its committed results


def make_methods(lrs: dict[str, str]) -> dict[str, list[str]]:
    """Application 1 methods, in the order they run (the grid runs every method for one seed before the next seed),
    at the peak lr of their family (head, ft, s3r).

    "head": the frozen-encoder baseline, only the CTC head learns: weight finetuning with the encoder frozen for every
    update (upstream freeze_finetune_updates), so that no gradient flows into it (S3-Router at prune rate 1.0 learns
    the same, but pays for a backward pass through the encoder). The last method is S3-Router 0.9 at a second lr
    (3e-3, or 1e-2 when 3e-3 is the family's): how much the masks and their similarity (application 4) depend on it.
    """
    route = lrs["s3r"]
    other = "3e-3" if float(route) != 3e-3 else "1e-2"
    methods = {"head": ["--finetune-weights", "--freeze-finetune-updates", "1000000", "--lr", lrs["head"]],
               "ft": ["--finetune-weights", "--lr", lrs["ft"]]}
    for rate in ("0.9", "0.7", "0.5"):
        methods[f"s3r-{rate}"] = ["--prune-rate", rate, "--no-fix-attn", "--lr", route]
        methods[f"s3r-{rate}-fa"] = ["--prune-rate", rate, "--fix-attn", "--lr", route]
    methods[f"s3r-0.9-lr{other}"] = ["--prune-rate", "0.9", "--no-fix-attn", "--lr", other]
    return methods


def selected_lrs(path: Path | None = None) -> dict[str, str]:
    """The lr stage's choice per family (where it has made one), else the demo corpus's."""
    path = path or RESULTS / "miniature_lr.json"
    chosen = json.loads(path.read_text())["selected"] if path.exists() else {}
    return {**DEMO_LRS, **{k: v for k, v in chosen.items() if v is not None}}


def use_lrs(lrs: dict[str, str]) -> None:
    """Set the methods (and the lrs the pruning curve uses: ft's for weight retraining, s3r's for scores)."""
    global LRS, FT_LR, ROUTE_LR, METHODS, SIMILARITY_METHODS
    LRS, FT_LR, ROUTE_LR = dict(lrs), lrs["ft"], lrs["s3r"]
    METHODS = make_methods(lrs)
    SIMILARITY_METHODS = ["s3r-0.9", list(METHODS)[-1]]


use_lrs(selected_lrs())
# the first 6 are the minimum; zh-TW last: see make_corpus
GRID_LANGS = ["es", "ru", "nl", "it", "tr", "sv-SE", "fr", "tt", "ky", "zh-TW"]
SEEDS = [1, 2]
# The recipe, scaled to minutes of audio and a 2M-parameter model (upstream base_1h: 15k updates at 5e-5, ~600 s of
# audio per update): 10 s of audio per update (200 updates: ~7 passes over 5 minutes of speech), a far higher peak lr
# (METHODS), the yaml's final lr scale 0.05 rather than the README's 1e-4 (which would spend the last quarter of so
# short a run at an lr too small to matter), lighter SpecAugment (3-second utterances, 192 channels). Every method
# gets the same updates and schedule.
RECIPE = ["--max-updates", "200", "--max-tokens", "160000", "--update-freq", "1",
          "--final-lr-scale", "0.05", "--mask-prob", "0.3", "--mask-channel-prob", "0.1", "--mask-channel-length", "16",
          "--layerdrop", "0.05", "--validate-interval", "100", "--save-interval", "50", "--num-workers", "0",
          "--units", "phone", "--init-score", "weight_rank"]
CURVE_LANG = "es"
CURVE_RATES = [0.7, 0.6, 0.5, 0.4, 0.3, 0.2]  # kept fractions: 30% .. 80% sparsity


@functools.cache
def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def python_cmd(*args) -> list[str]:
    return [sys.executable, *map(str, args)]


def run_logged(cmd: list[str], log_path: Path, threads: int) -> float:
    """Run a command with OMP_NUM_THREADS=threads, its output appended to log_path (after the command line, thread
    count included: results depend on it); returns the CPU seconds of that command and its descendants only."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as f:
        f.write(f"$ OMP_NUM_THREADS={threads} {' '.join(map(str, cmd))}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        # wait4 reports this child's own usage (with the descendants it waited for: DataLoader workers, torchrun's
        # workers); os.times() would also count other cells' children that finish meanwhile (--jobs 2).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise RuntimeError(f"{cmd[1]} failed (exit {rc}); see {log_path}")
    return usage.ru_utime + usage.ru_stime


def evaluate(ckpt: Path, data: str, out: Path, json_path: Path, threads: int, root: Path | None = None) -> dict:
    if not json_path.exists():
        run_logged(python_cmd("eval.py", "--checkpoint", ckpt, "--data", data, "--data-root", root or corpus_root(out),
                              "--json", json_path, "--num-workers", "0"), json_path.with_suffix(".log"), threads)
    return json.loads(json_path.read_text())


def train_cell(out: Path, lang: str, method: str, seed: int, args: list[str], threads: int,
               init: Path | None = None, tag: str = "", split: str = "test", data: dict | None = None,
               recipe: list[str] | None = None) -> dict:
    """One experiment: train.py on <lang>-train (validated on <lang>-dev), eval.py on <lang>-<split> (test; dev for
    the lr stage); cached as JSON, keyed by the backbone file, the recipe and args, the split and the thread count.
    A task cell passes `data` ({"train", "valid", "test": --data names, "root": --data-root, "corpus": how its
    corpus was made, a key of the cache too}) and its `recipe`."""
    init = BACKBONE if init is None else init
    recipe = RECIPE if recipe is None else recipe
    data = data or {"train": f"{lang}-train", "valid": f"{lang}-dev", split: f"{lang}-{split}",
                    "root": corpus_root(out)}
    name = f"{method}{tag}-s{seed}"
    cell = out / "cells" / lang / name
    result_path = cell / "result.json"
    backbone = file_sha256(init)  # the cache is keyed by the backbone a cell starts from
    if result_path.exists():
        result = json.loads(result_path.read_text())
        key = (result.get("backbone_sha256"), result.get("recipe"), result.get("threads"), result.get("split", "test"),
               result.get("corpus"))
        if key == (backbone, recipe + args, threads, split, data.get("corpus")):
            return result
        shutil.rmtree(cell)  # trained on another backbone, recipe, lr or corpus, or at another thread count: stale
        log(f"cell {lang} {name}: recomputed (the backbone, the recipe, the corpus or the thread count changed)")
    t0 = time.time()
    cpu = run_logged(python_cmd("train.py", "--init", init, "--data", data["train"], "--data-root", data["root"],
                                "--valid", data["valid"], "--save-dir", cell, "--seed", seed, *recipe, *args),
                     cell / "train.log", threads)
    best = cell / "checkpoint_best.pt"
    ckpt = best if best.exists() else cell / "checkpoint_last.pt"
    scored = evaluate(ckpt, data[split], out, cell / f"{split}.json", threads, data["root"])
    result = {"lang": lang, "method": method + tag, "seed": seed, "per": scored.get("per"), "split": split,
              **({"accuracy": scored["accuracy"]} if "accuracy" in scored else {}),
              f"{split}_utterances": scored["utterances"], "checkpoint": str(ckpt.relative_to(out)),
              "train_cpu_s": round(cpu, 1), "wall_s": round(time.time() - t0, 1), "threads": threads,
              "args": args, "recipe": recipe + args, "backbone_sha256": backbone,
              **({"corpus": data["corpus"]} if data.get("corpus") else {})}
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    metric = "accuracy" if result["per"] is None else "per"
    log(f"cell {lang} {name}: {split} {metric} {100 * result[metric]:.2f} ({result['wall_s']:.0f} s)")
    return result


def run_grid(out: Path, langs: list[str], methods: list[str], seeds: list[int], jobs: int):
    """Application 1: every (seed, language, method) cell; `jobs` cells run side by side, one thread each."""
    from concurrent.futures import ThreadPoolExecutor
    cells = [(lang, m, s) for s in seeds for lang in langs for m in methods]
    threads = max(1, 2 // jobs)
    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(train_cell, out, lang, m, s, METHODS[m], threads) for lang, m, s in cells]
        for f in futures:
            try:
                f.result()
            except RuntimeError as e:
                log(f"error: {e}")


# Application 1 at twice the updates, seed 1 of two languages: whether the grid's order holds past 200 updates, where
# no method has converged (the pruning curve's control: es's ft model gains 14 points from 200 more dense updates).
BUDGET_LANGS = ["es", "ru"]
BUDGET_METHODS = ["head", "ft", "s3r-0.9"]
GRID_UPDATES = int(RECIPE[RECIPE.index("--max-updates") + 1])
BUDGET_UPDATES = 2 * GRID_UPDATES


def run_budget(out: Path, jobs: int, langs=tuple(BUDGET_LANGS), methods=tuple(BUDGET_METHODS)) -> dict:
    """Cells <method>-u<BUDGET_UPDATES>-s1: the method's grid arguments with --max-updates doubled (the schedule's
    phases scale with it); returns budget_rows."""
    from concurrent.futures import ThreadPoolExecutor
    threads = max(1, 2 // jobs)
    tag = f"-u{BUDGET_UPDATES}"
    with ThreadPoolExecutor(jobs) as pool:
        for f in [pool.submit(train_cell, out, lg, m, SEEDS[0], [*METHODS[m], "--max-updates", str(BUDGET_UPDATES)],
                              threads, tag=tag) for lg in langs for m in methods]:
            f.result()
    return budget_rows(out, langs, methods)


def budget_rows(out: Path, langs=tuple(BUDGET_LANGS), methods=tuple(BUDGET_METHODS)) -> dict:
    """{lang: {method: {GRID_UPDATES: test PER, BUDGET_UPDATES: test PER}}}, seed 1, where both cells finished."""
    rows = {}
    for lg in langs:
        for m in methods:
            grid = cell_result(out, lg, f"{m}-s{SEEDS[0]}")
            longer = cell_result(out, lg, f"{m}-u{BUDGET_UPDATES}-s{SEEDS[0]}")
            if grid and longer:
                rows.setdefault(lg, {})[m] = {GRID_UPDATES: grid["per"], BUDGET_UPDATES: longer["per"]}
    return rows


def budget_md(rows: dict) -> list[str]:
    if not rows:
        return []
    methods = [m for m in BUDGET_METHODS if any(m in r for r in rows.values())]
    md = [f"### Application 1 at {BUDGET_UPDATES} updates", "",
          f"Seed {SEEDS[0]}, test PER (%) after the recipe's {GRID_UPDATES} updates and after {BUDGET_UPDATES} (the "
          "same arguments, `--max-updates` doubled; the tri-stage schedule stretches with it).", "",
          "| language | " + " | ".join(f"{m}: {GRID_UPDATES} -> {BUDGET_UPDATES}" for m in methods) + " |",
          "|---|" + "---|" * len(methods)]
    for lg, r in rows.items():
        md.append(f"| {lg} | " + " | ".join(f"{100 * r[m][GRID_UPDATES]:.1f} -> {100 * r[m][BUDGET_UPDATES]:.1f}"
                                           if m in r else "-" for m in methods) + " |")
    return md + [""]


# ------------------------------------------------------------------------------------------------ learning rates
# Each family's peak lr is chosen on the dev split of two held-out languages that no reported result uses (the grid
# reports GRID_LANGS[:6]), with one seed, from a small grid; the grid then runs at the chosen lrs.
LR_LANGS = ["fr", "tt"]
LR_GRID = {"head": ["3e-3", "1e-2", "3e-2", "1e-1"], "ft": ["3e-4", "1e-3", "3e-3", "1e-2"],
           "s3r": ["3e-3", "1e-2", "3e-2", "1e-1"]}
LR_PROBES = {"head": "head", "ft": "ft", "s3r": "s3r-0.9"}  # the method each family's lr is chosen with


def with_lr(args: list[str], lr: str) -> list[str]:
    """A method's train.py arguments with its --lr replaced."""
    i = args.index("--lr")
    return [*args[:i + 1], lr, *args[i + 2:]]


def run_lr(out: Path, langs: list[str] = LR_LANGS, seed: int = SEEDS[0], jobs: int = 2, command: str = "",
           grid: dict[str, list[str]] | None = None) -> dict:
    """Train every (family, lr, language) cell, score its dev PER, pick per family the lr with the lowest mean dev
    PER over `langs` (a family with a failed cell keeps its current lr); write bench/results/miniature_lr.json|md."""
    from concurrent.futures import ThreadPoolExecutor
    reported = set(GRID_LANGS[:6])
    if reported & set(langs):
        raise SystemExit(f"error: --lr-langs {' '.join(langs)}: {', '.join(sorted(reported & set(langs)))} is "
                         "reported by the grid; choose the lrs on languages it does not report")
    grid = grid or LR_GRID
    threads = max(1, 2 // jobs)
    cells = [(fam, lr, lang) for fam, lrs in grid.items() for lr in lrs for lang in langs]
    base = make_methods(DEMO_LRS)
    per, cpu, failed = {}, 0.0, []
    with ThreadPoolExecutor(jobs) as pool:
        futures = {c: pool.submit(train_cell, out, c[2], f"lr-{c[0]}-{c[1]}", seed,
                                  with_lr(base[LR_PROBES[c[0]]], c[1]), threads, split="dev") for c in cells}
        for (fam, lr, lang), f in futures.items():
            try:
                r = f.result()
            except RuntimeError as e:
                log(f"error: {e}")
                failed.append(f"{fam} {lr} {lang}")
                continue
            per.setdefault(fam, {}).setdefault(lr, {})[lang] = r["per"]
            cpu += r["train_cpu_s"]
    mean = {fam: {lr: sum(v.values()) / len(v) for lr, v in per[fam].items() if len(v) == len(langs)}
            for fam in per}
    selected = {fam: (min(grid[fam], key=lambda lr, fam=fam: mean[fam][lr])
                      if fam in mean and len(mean[fam]) == len(grid[fam]) else None) for fam in grid}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    res = {"command": command, "commit": commit, "langs": langs, "seed": seed, "split": "dev", "grid": grid,
           "probes": {fam: LR_PROBES[fam] for fam in grid}, "dev_per": per, "mean_dev_per": mean,
           "selected": selected, "failed": failed, "cpu_minutes": round(cpu / 60, 1), "threads": threads,
           "backbone": str(BACKBONE.relative_to(ROOT)) if BACKBONE.is_relative_to(ROOT) else str(BACKBONE),
           "backbone_sha256": file_sha256(BACKBONE), "recipe": RECIPE}
    path = RESULTS / "miniature_lr.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
    md = ["# The miniature's learning rates, chosen on dev languages the grid does not report", "",
          f"Regenerate: `{command}` (cells cached under runs/miniature/cells/<lang>/lr-*). Commit {commit}. "
          f"{res['cpu_minutes']:.0f} CPU minutes for {len(cells)} cells ({threads} thread(s) each). Backbone "
          f"`{res['backbone']}` (sha256 {res['backbone_sha256'][:12]}).", "",
          f"Each family's lr is chosen with one method ({', '.join(f'{f}: `{m}`' for f, m in res['probes'].items())}),"
          f" trained with the grid's recipe on the train split of {' and '.join(langs)} (seed {seed}) and scored by "
          "phone error rate on their dev split (the checkpoint the grid would keep, chosen on the same dev split), "
          "never on a test split. The grid then runs every method of a family at its chosen lr (s3r: every "
          "S3-Router method, and S3-Router pruning in the pruning curve; ft: weight finetuning, PARP and IMP).", "",
          "| family | peak lr | " + " | ".join(f"{lg} dev PER (%)" for lg in langs) + " | mean | |",
          "|---|---:|" + "---:|" * len(langs) + "---:|---|"]
    for fam, lrs in grid.items():
        for lr in lrs:
            vals = [per.get(fam, {}).get(lr, {}).get(lg) for lg in langs]
            m, chosen = mean.get(fam, {}).get(lr), "**chosen**" if selected[fam] == lr else ""
            md.append(f"| {fam} | {lr} | " + " | ".join("failed" if v is None else f"{100 * v:.1f}" for v in vals)
                      + f" | {'-' if m is None else f'{100 * m:.1f}'} | {chosen} |")
    if failed:
        md += ["", f"Failed cells (their family keeps its lr): {', '.join(failed)}."]
    md += ["", "Chosen: " + ", ".join(f"{fam} {lr or 'none (kept ' + LRS[fam] + ')'}" for fam, lr in selected.items())
           + ".", ""]
    edge = [f"{fam} {lr}" for fam, lr in selected.items() if lr in (grid[fam][0], grid[fam][-1])]
    if edge:  # the best lr may lie outside the grid
        md[-1:] = [f"At the edge of its grid, so possibly not the best lr: {', '.join(edge)}.", ""]
    path.with_suffix(".md").write_text("\n".join(md) + "\n")
    log("lr: chosen " + ", ".join(f"{fam} {lr}" for fam, lr in selected.items()))
    return res


# ------------------------------------------------------------------------------------------------ SSL pilot
PILOT_LANGS, PILOT_METHODS = ["es", "ru"], ["head", "ft", "s3r-0.9"]


def run_pilot(out: Path, init: Path, tag: str, jobs: int, seed: int = SEEDS[0]) -> dict:
    """The paper's regime on a backbone, one seed: head only, weight finetuning and S3-Router 0.9 on es and ru, with
    the grid's recipe. Cells are cached like the grid's (keyed by the backbone file); the table collects every
    backbone piloted so far, by tag, in bench/results/backbone_pilot.{json,md}."""
    from concurrent.futures import ThreadPoolExecutor
    threads = max(1, 2 // jobs)
    cells = [(lang, m) for lang in PILOT_LANGS for m in PILOT_METHODS]
    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda c: train_cell(out, c[0], c[1], seed, METHODS[c[1]], threads, init=init,
                                                     tag=f"-{tag}"), cells))
    path = (RESULTS / "backbone_pilot").with_suffix(".json")
    table = json.loads(path.read_text()) if path.exists() else {"backbones": {}}
    table["backbones"][tag] = {
        "init": str(Path(init).resolve().relative_to(ROOT)) if Path(init).resolve().is_relative_to(ROOT) else str(init),
        "backbone_sha256": file_sha256(init), "seed": seed,
        "per": {r["lang"]: {} for r in results}, "cpu_minutes": round(sum(r["train_cpu_s"] for r in results) / 60, 1)}
    for r in results:
        table["backbones"][tag]["per"][r["lang"]][r["method"].removesuffix(f"-{tag}")] = round(100 * r["per"], 2)
    table["recipe"], table["methods"] = RECIPE, {m: METHODS[m] for m in PILOT_METHODS}
    path.write_text(json.dumps(table, indent=1) + "\n")
    lines = ["# Backbone pilot: head only vs weight finetuning vs S3-Router", "",
             f"PER (%) on the test split, seed {seed}, the miniature's recipe (200 updates; tools/miniature.py RECIPE, "
             f"METHODS). The paper's regime: head only clearly behind both others. Regenerate one row: "
             f"`python -m tools.miniature --stage ssl-pilot --init CHECKPOINT --pilot-tag TAG`.", "",
             "| backbone | " + " | ".join(f"{lg} {m}" for lg in PILOT_LANGS for m in PILOT_METHODS) + " | CPU min |",
             "|---|" + "---:|" * (len(PILOT_LANGS) * len(PILOT_METHODS) + 1)]
    for name, row in table["backbones"].items():
        cols = [row["per"].get(lg, {}).get(m) for lg in PILOT_LANGS for m in PILOT_METHODS]
        lines.append(f"| {name} (`{row['init']}`) | " + " | ".join("" if v is None else f"{v:.1f}" for v in cols)
                     + f" | {row['cpu_minutes']} |")
    (RESULTS / "backbone_pilot").with_suffix(".md").write_text("\n".join(lines) + "\n")
    log(f"pilot {tag}: " + json.dumps(table["backbones"][tag]["per"]))
    return table


# ------------------------------------------------------------------------------------------------ applications 2-4
def cell_result(out: Path, lang: str, name: str) -> dict | None:
    path = out / "cells" / lang / name / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


# The multitask routes of application 2, beside the language routes: keyword spotting (Speech Commands layout),
# speaker identification (VoxCeleb1 layout) and language identification (a path<TAB>label manifest) of espeak-ng
# speech (tools/synth_tasks.py), each trained as a grid cell (s3r-0.9 and ft) with TASK_RECIPE.
# Per class 20 utterances to train, 5 to dev, 5 to test: test sets of 82 clips (ks: 16 words, 6 of them one
# _unknown_ class, + 2 _silence_), 40 (sid: 8 speakers) and 30 (lid: 6 languages), one point of accuracy ~1-3 clips.
TASKS = {  # name: (tools.synth_tasks function, its keyword arguments, the --data names of train / valid / test)
    "ks": ("keywords", {"per_class": 30, "held_out": 5}, ("speech_commands_v0.01-train", "speech_commands_v0.01-dev",
                                                          "speech_commands_v0.01-test")),
    "sid": ("voices", {"speakers": 8, "per_class": 30, "held_out": 5}, ("voxceleb1-train", "voxceleb1-dev",
                                                                         "voxceleb1-test")),
    "lid": ("languages", {"per_class": 30, "held_out": 5}, ("lid/train.tsv", "lid/valid.tsv", "lid/test.tsv")),
}
TASK_TONE = False  # tools.synth_tasks' tone stand-in instead of espeak-ng (tests)
# The grid's recipe at half the updates (1-2 s clips, one label each), without the phone units.
TASK_RECIPE = [x for x in RECIPE if x != "phone" and x != "--units"]
TASK_RECIPE[TASK_RECIPE.index("--max-updates") + 1] = "100"
TASK_RECIPE[TASK_RECIPE.index("--validate-interval") + 1] = "50"


def make_task(out: Path, name: str) -> dict:
    """One task's corpus under out/tasks (written once; a DONE file records how) and its cell's `data` argument,
    "corpus" naming how it was made (a cell trained on a corpus made otherwise is stale)."""
    import tools.synth_tasks
    maker, kwargs, (train, valid, test) = TASKS[name]
    root = out / "tasks" / name
    made = json.dumps({"maker": maker, **kwargs, **({"tone": True} if TASK_TONE else {})})
    if not (root / "DONE").exists() or (root / "DONE").read_text().strip() != made:
        shutil.rmtree(root, ignore_errors=True)
        getattr(tools.synth_tasks, maker)(root, seed=1, workers=2, tone=TASK_TONE, **kwargs)
        (root / "DONE").write_text(made + "\n")
    named = lambda x: str(root / x) if x.endswith(".tsv") else x  # noqa: E731  a manifest is a path under root
    return {"train": named(train), "valid": named(valid), "test": named(test), "root": root, "corpus": made}


def task_cell(out: Path, name: str, method: str, seed: int, threads: int) -> dict:
    return train_cell(out, f"task-{name}", method, seed, METHODS[method], threads, data=make_task(out, name),
                      recipe=TASK_RECIPE)


def sha256_now(path: Path) -> str:
    """The sha256 of a file as it is now (file_sha256 remembers: a cell trained again rewrites its checkpoint)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_bundle(out: Path, langs: list[str], method: str = "s3r-0.9", seed: int = SEEDS[0], jobs: int = 2,
               tasks=tuple(TASKS), seeds=(SEEDS[0],)) -> dict | None:
    """Application 2: every language's route and every task's route in one bundle (python -m s3r.routes bundle)
    against the separately finetuned models (ft), and every route's test score served from the bundle (eval.py
    --bundle --route) against its separately evaluated checkpoint. Task cells are trained here, for every one of
    `seeds` (the bundle holds `seed`'s routes; the others give the multitask comparison its seed mean)."""
    from concurrent.futures import ThreadPoolExecutor

    from s3r import load_pretrained
    from s3r.checkpoint import s3r_checkpoint, save_atomic
    from s3r.model import Wav2Vec2Config
    from s3r.routes import load_route, print_info, route_summary, storage
    threads = max(1, 2 // jobs)
    for t in tasks:  # the corpora first, one at a time: two cells of a task must not both write it
        make_task(out, t)
    with ThreadPoolExecutor(jobs) as pool:
        for f in [pool.submit(task_cell, out, t, m, s, threads) for s in dict.fromkeys([seed, *seeds])
                  for t in tasks for m in (method, "ft")]:
            try:
                f.result()
            except RuntimeError as e:
                log(f"error: {e}")
    members = {lg: lg for lg in langs} | {t: f"task-{t}" for t in tasks}  # route name -> cell folder
    have = {n: c for n, c in members.items() if cell_result(out, c, f"{method}-s{seed}")
            and cell_result(out, c, f"ft-s{seed}")}
    if len(have) < 2:
        log(f"bundle: needs {method} and ft cells of at least 2 languages or tasks (have {len(have)})")
        return None
    folder = out / "bundle"
    folder.mkdir(parents=True, exist_ok=True)
    routes, dense, cells = {}, {}, {}
    for name, where in have.items():
        cells[name] = cell_result(out, where, f"{method}-s{seed}")
        ckpt, source = out / cells[name]["checkpoint"], folder / f"{name}.source"
        ft = out / cell_result(out, where, f"ft-s{seed}")["checkpoint"]
        key = f"{sha256_now(ckpt)} {sha256_now(ft)}\n"
        routes[name], dense[name] = folder / f"{name}.route", folder / f"{name}.ft.pt"
        if not source.exists() or source.read_text() != key:  # made from these checkpoints, or made again
            run_logged(python_cmd("-m", "s3r.routes", "export", ckpt, routes[name]), folder / "bundle.log", threads)
            save_atomic(s3r_checkpoint(load_pretrained(ft)), dense[name])  # the model alone, no optimizer state
            source.write_text(key)
    bundle = folder / "all.bundle"
    key = json.dumps([sha256_now(BACKBONE)] + [sha256_now(r) for r in routes.values()])
    old = json.loads((out / "bundle.json").read_text()) if (out / "bundle.json").exists() else {}
    task_seeds = {t: {m: {str(s): r["accuracy"] for s in seeds
                          if (r := cell_result(out, f"task-{t}", f"{m}-s{s}"))} for m in (method, "ft")}
                  for t in tasks if t in have}  # test accuracy per seed, as JSON keeps it
    majority = {}  # each task's accuracy of always answering its test split's most frequent class (eval.py's counts)
    for t in tasks:
        if t in have and (scored := out / "cells" / f"task-{t}" / f"{method}-s{seed}" / "test.json").exists():
            counts = [n for _, n in json.loads(scored.read_text())["per_class"].values()]
            majority[t] = max(counts) / sum(counts)
    if old.get("key") == key and bundle.exists():
        if (old.get("task_seeds"), old.get("majority")) != (task_seeds, majority):  # more task cells finished
            old.update(task_seeds=task_seeds, majority=majority)
            (out / "bundle.json").write_text(json.dumps(old, indent=1) + "\n")
        return old
    bundle.unlink(missing_ok=True)
    run_logged(python_cmd("-m", "s3r.routes", "bundle", bundle, "--pretrained", BACKBONE,
                          *[f"{n}={r}" for n, r in routes.items()]), folder / "bundle.log", threads)
    info = io.StringIO()
    with contextlib.redirect_stdout(info):  # what `python -m s3r.routes info` prints
        print_info(bundle)
    (folder / "info.txt").write_text(info.getvalue())
    served = {}
    for name, where in have.items():
        task = where.startswith("task-")
        data = make_task(out, name) if task else {"test": f"{name}-test", "root": corpus_root(out)}
        path = folder / f"served-{name}.json"
        path.unlink(missing_ok=True)
        run_logged(python_cmd("eval.py", "--bundle", bundle, "--route", name, "--data", data["test"], "--data-root",
                              data["root"], "--json", path, "--num-workers", "0"), folder / "served.log", threads)
        metric = "per" if cells[name]["per"] is not None else "accuracy"
        score = json.loads(path.read_text())[metric]
        served[name] = {"kind": "task" if task else "language", "metric": metric,
                        "checkpoint": cells[name][metric], "bundle": score, "equal": score == cells[name][metric],
                        "finetuned": cell_result(out, where, f"ft-s{seed}")[metric],
                        "route_bytes": routes[name].stat().st_size, "finetuned_bytes": dense[name].stat().st_size}
    loaded = [load_route(r) for r in routes.values()]
    arithmetic = storage(Wav2Vec2Config.from_dict(loaded[0]["config"]), [route_summary(r) for r in loaded])
    dense_bytes = sum(d.stat().st_size for d in dense.values())
    res = {"key": key, "languages": [n for n in have if not have[n].startswith("task-")],
           "tasks": [n for n in have if have[n].startswith("task-")], "method": method, "seed": seed,
           "bundle_bytes": bundle.stat().st_size, "separate_finetuned_bytes": dense_bytes,
           "route_bytes": {n: r.stat().st_size for n, r in routes.items()}, "backbone_bytes": BACKBONE.stat().st_size,
           "file_change_percent": 100.0 * (bundle.stat().st_size / dense_bytes - 1.0), "arithmetic": arithmetic,
           "served": served, "task_recipe": TASK_RECIPE, "task_seeds": task_seeds, "majority": majority}
    (out / "bundle.json").write_text(json.dumps(res, indent=1) + "\n")
    log(f"bundle: {len(have)} routes, {res['bundle_bytes']:,} B vs {dense_bytes:,} B separate "
        f"({res['file_change_percent']:+.1f}%); served = checkpoint for "
        f"{sum(v['equal'] for v in served.values())} of {len(served)}")
    return res


# The curve's kinds of point, in table order: (kind, label, route granularity, retrained). A structured (neuron+head)
# route keeps the `rate` fraction of every layer's FFN neurons and of its attention heads, and is cut out of the model
# (s3r/compact.py), so it runs faster; an unstructured one keeps every matrix's shape (folded: zeros no kernel skips).
# PARP and IMP (s3r/prune.py) retrain the weights at ft's lr: PARP in one run from the backbone (its first mask is the
# backbone's magnitudes), IMP in IMP_ROUNDS rounds after the ft cell, each the recipe's 200 updates.
CURVE_KINDS = [("omp", "OMP", "weight", False), ("prune", "S3-Router pruning", "weight", True),
               ("omp-nh", "OMP, neuron+head", "neuron+head", False),
               ("prune-nh", "S3-Router pruning, neuron+head", "neuron+head", True),
               ("parp", "PARP", "weight", True), ("imp", "IMP", "weight", True)]
DEFAULT_CURVE_KINDS = [k for k, *_ in CURVE_KINDS] + ["controls"]
IMP_ROUNDS = 3
SPEED_ROUNDS = 15
# The methods train for different numbers of updates after the ft cell's 200: OMP none, S3-Router pruning 200, IMP
# IMP_ROUNDS x 200 (PARP: 200 from the backbone, no ft cell). Two controls at equal updates ("controls" kind): the ft
# model finetuned 200 more updates, dense (as S3-Router pruning: 200 more, here on the weights), and IMP in one round
# (200 updates after ft) at the highest and lowest kept fraction. Not timed: they add no shape the curve lacks.
CONTROL_LABELS = {"ft-more": "finetuned + 200 updates (dense)", "imp1": "IMP, 1 round"}


def control_points(seed: int, rates) -> list[tuple[str, float, str]]:
    """(kind, kept fraction, cell name) of the curve's controls: ft-more, then imp1 at the highest and lowest rate."""
    return [("ft-more", 1.0, f"ft-more-s{seed}")] + [("imp1", r, f"imp1-{r}-s{seed}")
                                                      for r in dict.fromkeys((max(rates), min(rates)))]


def curve_points(out: Path, lang: str, seed: int, rates) -> list[tuple[str, float, Path]]:
    """(kind, rate, deployed checkpoint) of every finished point, the dense finetuned model first (rate 1.0)."""
    ft = cell_result(out, lang, f"ft-s{seed}")
    points = [("dense", 1.0, out / ft["checkpoint"])] if ft else []
    for kind, _, _, retrained in CURVE_KINDS:
        for rate in rates:
            cell = out / "cells" / lang / f"{kind}-{rate}-s{seed}"
            if retrained and (r := cell_result(out, lang, cell.name)):
                points.append((kind, rate, cell / "compact.pt" if kind.endswith("-nh") else out / r["checkpoint"]))
            elif not retrained and (cell / "test.json").exists():
                points.append((kind, rate, cell / "pruned.pt"))
    return points


def prune_cell(out: Path, lang: str, seed: int, rate: float, kind: str, ft_ckpt: Path, threads: int) -> None:
    """One point of the curve: S3-Router pruning (a train_cell) or one-shot magnitude pruning (OMP, evaluated as is);
    neuron+head ones cut into a compact model, whose test PER is the one reported (the model one would deploy)."""
    granularity = dict((k, g) for k, _, g, _ in CURVE_KINDS)[kind]
    structured = ["--route-granularity", granularity] if granularity != "weight" else []
    cell = out / "cells" / lang / f"{kind}-{rate}-s{seed}"
    if kind == "parp":
        train_cell(out, lang, kind, seed, ["--parp", "--prune-rate", str(rate), "--no-fix-attn", "--lr", FT_LR],
                   threads, tag=f"-{rate}")
        return
    if kind == "imp":
        imp_cell(out, lang, seed, rate, ft_ckpt, threads)
        return
    if kind.startswith("prune"):
        train_cell(out, lang, kind, seed, ["--prune-rate", str(rate), "--no-fix-attn", "--init-score",
                                           "weight_magnitude_with_scale", "--lr", ROUTE_LR, *structured], threads,
                   init=ft_ckpt, tag=f"-{rate}")
        if structured:
            compact = cell / "compact.pt"
            if not compact.exists():
                run_logged(python_cmd("-m", "s3r.export", "--compact", compact, out / cell_result(out, lang, cell.name)
                                      ["checkpoint"]), cell / "export.log", threads)
            evaluate(compact, f"{lang}-test", out, cell / "compact_test.json", threads)
        return
    source = cell / "finetuned.sha256"  # the finetuned model it pruned: a recomputed ft cell makes it stale
    if source.exists() and source.read_text() != file_sha256(ft_ckpt):
        shutil.rmtree(cell)
    cell.mkdir(parents=True, exist_ok=True)
    source.write_text(file_sha256(ft_ckpt))
    pruned = cell / "pruned.pt"
    if not pruned.exists():
        run_logged(python_cmd("-m", "s3r.routes", "omp", ft_ckpt, pruned, "--prune-rate", rate, *structured,
                              *["--compact"] * bool(structured)), cell / "omp.log", threads)
    evaluate(pruned, f"{lang}-test", out, cell / "test.json", threads)


def imp_cell(out: Path, lang: str, seed: int, rate: float, ft_ckpt: Path, threads: int,
             rounds: int = IMP_ROUNDS) -> dict:
    """IMP at one kept fraction: `python -m s3r.prune imp` rewinding to the backbone, the ft cell as round 0, then
    `rounds` rounds of the recipe at ft's lr (resumable); the last round's best checkpoint is evaluated. Cell
    imp-<rate>, or imp<rounds>-<rate> for another number of rounds."""
    kind = "imp" if rounds == IMP_ROUNDS else f"imp{rounds}"
    cell = out / "cells" / lang / f"{kind}-{rate}-s{seed}"
    args = ["--data", f"{lang}-train", "--data-root", corpus_root(out), "--valid", f"{lang}-dev", "--seed", seed,
            *RECIPE, "--lr", FT_LR]
    result = cell_result(out, lang, cell.name)
    if result and (result.get("recipe"), result.get("finetuned"), result.get("threads"), result.get("rounds")) == (
            list(map(str, args)), file_sha256(ft_ckpt), threads, rounds):
        return result
    t0 = time.time()
    cpu = run_logged(python_cmd("-m", "s3r.prune", "imp", BACKBONE, cell, "--prune-rate", rate, "--rounds", rounds,
                                "--finetuned", ft_ckpt, "--", *args), cell / "imp.log", threads)
    last = cell / f"round{rounds}"
    ckpt = last / "checkpoint_best.pt" if (last / "checkpoint_best.pt").exists() else last / "checkpoint_pruned.pt"
    test = evaluate(ckpt, f"{lang}-test", out, cell / "test.json", threads)
    result = {"lang": lang, "method": f"{kind}-{rate}", "seed": seed, "per": test["per"],
              "test_utterances": test["utterances"], "checkpoint": str(ckpt.relative_to(out)),
              "train_cpu_s": round(cpu, 1), "wall_s": round(time.time() - t0, 1), "threads": threads,
              "recipe": list(map(str, args)), "finetuned": file_sha256(ft_ckpt), "rounds": rounds}
    (cell / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    log(f"cell {lang} {cell.name}: PER {100 * result['per']:.2f} ({result['wall_s']:.0f} s)")
    return result


def run_curve(out: Path, lang: str = CURVE_LANG, seed: int = SEEDS[0], rates=CURVE_RATES, jobs: int = 2,
              speed_rounds: int = SPEED_ROUNDS, kinds=tuple(DEFAULT_CURVE_KINDS)) -> dict | None:
    """Application 3: S3-Router pruning of the weight-finetuned model vs one-shot magnitude pruning (OMP), per weight
    and per FFN neuron + attention head; then every point's eval speedup against the finetuned model, measured.

    Step 1 is the grid's `ft` cell (trained here if the grid has not); step 2 routes its weights from init_score
    weight_magnitude_with_scale (the first mask IS the OMP mask, per weight or over each group's mean |W|),
    attention included, and trains only the scores and the head.
    """
    from concurrent.futures import ThreadPoolExecutor
    threads = max(1, 2 // jobs)
    ft = train_cell(out, lang, "ft", seed, METHODS["ft"], threads)
    ft_ckpt = out / ft["checkpoint"]
    with ThreadPoolExecutor(jobs) as pool:  # `jobs` cells side by side, as in the grid; the slow ones first
        todo = sorted((k for k in CURVE_KINDS if k[0] in kinds), key=lambda k: not k[3])
        futures = [pool.submit(prune_cell, out, lang, seed, rate, k[0], ft_ckpt, threads) for k in todo
                   for rate in rates]
        for kind, rate, _ in control_points(seed, rates) if "controls" in kinds else []:
            if kind == "ft-more":
                futures.append(pool.submit(train_cell, out, lang, kind, seed, METHODS["ft"], threads, init=ft_ckpt))
            else:
                futures.append(pool.submit(imp_cell, out, lang, seed, rate, ft_ckpt, threads, rounds=1))
        for f in futures:
            f.result()
    measure_speed(out, lang, seed, rates, speed_rounds)  # last, alone: timing
    return curve_rows(out, lang, seed, rates)


def measure_speed(out: Path, lang: str, seed: int, rates, rounds: int) -> dict:
    """Eval-forward CPU time of every point against the dense finetuned model (python -m bench.structured
    --checkpoints: one process, one thread, `rounds` interleaved rounds in a fresh order each, medians of per-round
    ratios). A copy of the finetuned model is timed as a point too: its ratio is the noise. Cached (curve_speed.json)
    for exactly this set of checkpoints."""
    points = curve_points(out, lang, seed, rates)
    control = out / "cells" / lang / f"speed-control-s{seed}.pt"
    shutil.copyfile(points[0][2], control)
    paths = [str(p) for _, _, p in points] + [str(control)]
    path = out / f"curve_speed-{lang}-s{seed}.json"
    if path.exists() and (old := json.loads(path.read_text()))["checkpoints"] == paths and old["rounds"] == rounds:
        return old
    t0 = time.time()
    run_logged(python_cmd("-m", "bench.structured", "--checkpoints", *paths, "--rounds", rounds, "--threads", 1,
                          "--json", path.with_suffix(".tmp")), out / "curve_speed.log", 1)
    ratios = json.loads(path.with_suffix(".tmp").read_text())
    path.with_suffix(".tmp").unlink()
    result = {"checkpoints": paths, "rounds": rounds, "wall_s": round(time.time() - t0, 1),
              "load_average": os.getloadavg(), "ratios": ratios}
    path.write_text(json.dumps(result, indent=1) + "\n")
    log(f"curve speed: {len(paths)} models, {rounds} rounds in {result['wall_s']:.0f} s")
    return result


def routed_weight_counts(path: Path) -> tuple[int, int]:
    """(nonzero, all) entries of the attention and FFN weight matrices of a checkpoint as deployed: routes folded,
    neuron/head routes compacted (the weights are the ones one would ship)."""
    import torch

    from s3r import load_pretrained
    from s3r.compact import compact, fold_masks
    model = load_pretrained(path)
    if model.route_config is not None:
        g = model.route_config.route_granularity
        model = compact(model) if "neuron" in g or "head" in g else fold_masks(model)
    mats = [p for n, p in model.named_parameters() if p.dim() == 2 and (".attention." in n or ".feed_forward." in n)]
    with torch.no_grad():
        return sum(int((p != 0).sum()) for p in mats), sum(p.numel() for p in mats)


def run_similarity(out: Path, langs: list[str], method: str = "s3r-0.9", seed: int = SEEDS[0]) -> dict | None:
    """Application 4: mask similarity of every language pair vs phoneme-inventory similarity (Pearson, Spearman)."""
    have = [lg for lg in langs if cell_result(out, lg, f"{method}-s{seed}")]
    if len(have) < 3:
        log(f"similarity: needs {method} cells of at least 3 languages (have {len(have)})")
        return None
    ref = write_reference(out, have)
    routes = [f"{lg}={out / cell_result(out, lg, f'{method}-s{seed}')['checkpoint']}" for lg in have]
    res_path = out / f"similarity-{method}.json"
    run_logged(python_cmd("-m", "s3r.analysis", "similarity", *routes, "--json", res_path, "--reference", ref,
                          "--plot", RESULTS / f"miniature_similarity_{method}.png"),
               out / "similarity.log", 2)
    result = json.loads(res_path.read_text())
    result["method"] = method
    result["lr"] = METHODS[method][METHODS[method].index("--lr") + 1]
    result["seed_control"] = seed_control(out, have, method)
    result["permutation"] = {key: permutation_test(result, key) for key in ("cosine", "pruned_cosine")}
    res_path.write_text(json.dumps(result, indent=1))
    return result


PERMUTATIONS = 10_000  # random label permutations of the permutation test, when there are more than this many


def permutation_test(sim: dict, key: str, permutations: int = PERMUTATIONS, seed: int = 0) -> dict:
    """One-sided p-values of the Pearson and Spearman correlation between the routes' similarity `key` and the
    reference over the language pairs (a Mantel test): the language labels of the reference matrix are permuted
    (every permutation when there are at most `permutations` of them, else that many at random) and p is the
    share of permutations, the identity included, whose correlation is at least the observed one."""
    import itertools
    import math
    import random

    from s3r.analysis import pearson, spearman
    ref = sim["reference"]
    value = {frozenset(pair): v for pair, v in zip(ref["pairs"], ref["values"], strict=True)}
    pairs = [(p["a"], p["b"]) for p in sim["pairs"] if frozenset((p["a"], p["b"])) in value]
    y = [p["overall"][key] for p in sim["pairs"] if frozenset((p["a"], p["b"])) in value]
    names = sorted({n for pair in pairs for n in pair})
    exact = math.factorial(len(names)) <= permutations
    if exact:
        perms = itertools.permutations(names)
    else:
        rng = random.Random(seed)
        perms = [tuple(names)] + [tuple(rng.sample(names, len(names))) for _ in range(permutations - 1)]
    observed = {f.__name__: f([value[frozenset(pair)] for pair in pairs], y) for f in (pearson, spearman)}
    at_least, n = {name: 0 for name in observed}, 0
    for perm in perms:
        relabel = dict(zip(names, perm, strict=True))
        x = [value[frozenset((relabel[a], relabel[b]))] for a, b in pairs]
        n += 1
        for f in (pearson, spearman):
            at_least[f.__name__] += f(x, y) >= observed[f.__name__] - 1e-12
    return {**{name: observed[name] for name in observed}, **{f"{name}_p": at_least[name] / n for name in observed},
            "permutations": n, "exact": exact}


def seed_control(out: Path, langs: list[str], method: str) -> dict | None:
    """What a cross-language similarity means: the same language's masks from two seeds (every difference is
    noise of training) against two languages' masks from the same seed. Overall pruned-set cosine, averaged."""
    from s3r.analysis import compare
    from s3r.routes import masks_of
    both = [lg for lg in langs if all(cell_result(out, lg, f"{method}-s{s}") for s in SEEDS[:2])]
    if len(both) < 2:
        return None
    masks = {(lg, s): masks_of(out / cell_result(out, lg, f"{method}-s{s}")["checkpoint"])
             for lg in both for s in SEEDS[:2]}
    key = "pruned_cosine"
    same = [compare(masks[lg, SEEDS[0]], masks[lg, SEEDS[1]])["overall"][key] for lg in both]
    cross = [compare(masks[a, s], masks[b, s])["overall"][key] for s in SEEDS[:2] for i, a in enumerate(both)
             for b in both[i + 1:]]
    return {"measure": key, "languages": both, "same_language_two_seeds": sum(same) / len(same),
            "two_languages_same_seed": sum(cross) / len(cross),
            "random": compare(masks[both[0], SEEDS[0]], masks[both[1], SEEDS[0]])["overall"][f"{key}_random"]}


# ------------------------------------------------------------------------------------------------ report
def curve_rows(out: Path, lang: str = CURVE_LANG, seed: int = SEEDS[0], rates=CURVE_RATES) -> dict | None:
    """The pruning curve from its cached cells: every point that has finished (all of them after run_curve), with
    its kind, measured sparsity (of the attention and FFN weights, as deployed), test PER and measured speedup
    (dense time / its time, e2e and transformer layers alone; None until measure_speed has timed it)."""
    points = curve_points(out, lang, seed, rates)
    if not points:
        return None
    speed_path = out / f"curve_speed-{lang}-s{seed}.json"
    ratios = json.loads(speed_path.read_text())["ratios"] if speed_path.exists() else {}
    labels = {k: (label, g) for k, label, g, _ in CURVE_KINDS} | {"dense": ("finetuned (dense)", "weight")}
    dense_count = routed_weight_counts(points[0][2])[1]
    rows = []
    for kind, rate, ckpt in points:
        cell = ckpt.parent if kind == "dense" else out / "cells" / lang / f"{kind}-{rate}-s{seed}"  # IMP's: a round's
        test = cell / ("compact_test.json" if kind == "prune-nh" else "test.json")
        kept, _ = routed_weight_counts(ckpt)
        r = ratios.get(str(ckpt))
        rows.append({"method": labels[kind][0], "kind": kind, "granularity": labels[kind][1], "prune_rate": rate,
                     "sparsity": round(1 - kept / dense_count, 4), "per": json.loads(test.read_text())["per"],
                     "checkpoint": str(ckpt.relative_to(out)), "params": r["params"] if r else None,
                     "speedup": {p: 1 / r[p]["median"] for p in ("e2e", "layers")} if r else None,
                     "time_ratio": {p: r[p] for p in ("e2e", "layers")} if r else None})
        if kind == "prune-nh":  # the routed model's PER too: compact() must not change it (logits within 1e-5)
            rows[-1]["per_routed"] = cell_result(out, lang, cell.name)["per"]
    control = ratios.get(str(out / "cells" / lang / f"speed-control-s{seed}.pt"))
    controls = []  # the equal-updates controls, where run
    for kind, rate, name in control_points(seed, rates):
        if c := cell_result(out, lang, name):
            kept, _ = routed_weight_counts(out / c["checkpoint"])
            controls.append({"method": CONTROL_LABELS[kind], "kind": kind, "prune_rate": rate, "per": c["per"],
                             "sparsity": round(1 - kept / dense_count, 4), "checkpoint": c["checkpoint"]})
    return {"lang": lang, "seed": seed, "rows": rows, "speed_control": control, "controls": controls,
            "speed": {k: v for k, v in json.loads(speed_path.read_text()).items() if k not in ("ratios", "checkpoints")}
            if speed_path.exists() else None}


COLLAPSED = 0.9  # a run whose test PER is above this has collapsed
BLANK_ONLY = 0.99  # or whose last validation has this share of blank frames (train.py's COLLAPSED_BLANK_RATE)
LR_LADDER = ["1e-4", "3e-4", "1e-3", "3e-3", "1e-2", "3e-2", "1e-1"]


def cell_log(out: Path, lang: str, name: str) -> dict:
    """What a cell's train.py log.jsonl says about its run: every validation's (update, error rate, blank rate,
    empty share), the training loss by update, the update of train.py's collapse warning (None: none), and the
    last validation's blank rate and empty share (None where the log predates them)."""
    path = out / "cells" / lang / name / "log.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    valid = [(v["update"], v.get("per", v.get("uer")), v.get("blank_rate"), v.get("empty"))
             for v in lines if "valid" in v]
    loss = [(v["update"], v["loss"]) for v in lines if "loss" in v and "valid" not in v]
    warned = [v["update"] for v in lines if "warning" in v]
    last = valid[-1] if valid else (None, None, None, None)
    return {"valid": valid, "loss": loss, "warned_at": warned[0] if warned else None, "blank_rate": last[2],
            "empty": last[3]}


def collapsed(cell: dict, health: dict) -> bool:
    """A collapsed run: test PER above COLLAPSED, or a model that ended blank-only (every hypothesis of its last
    validation empty, or BLANK_ONLY of its frames blank)."""
    blank_only = health.get("empty") == 1.0 or (health.get("blank_rate") or 0.0) >= BLANK_ONLY
    return cell["per"] > COLLAPSED or blank_only


def lower_lr(args: list[str]) -> list[str]:
    """A method's arguments one step down LR_LADDER (a third of its lr)."""
    lr = args[args.index("--lr") + 1]
    below = [x for x in LR_LADDER if float(x) < float(lr) * 0.99]
    return with_lr(args, below[-1] if below else f"{float(lr) / 3:.0e}")


LONG_WARMUP = ["--phase-ratio", "0.3", "0.2", "0.5"]  # three times the recipe's warm-up (train.py's 0.1 0.4 0.5)


def run_collapse(out: Path, langs: list[str], methods: list[str], seeds: list[int], jobs: int) -> list[dict]:
    """Every collapsed grid cell trained again twice, at one step lower lr and with a three times longer warm-up (the
    rest of its recipe the same): whether either removes the collapse. Cells <method>-lowlr / -warmup, cached."""
    from concurrent.futures import ThreadPoolExecutor
    threads = max(1, 2 // jobs)
    found = [(lg, m, s) for s in seeds for lg in langs for m in methods
             if (c := cell_result(out, lg, f"{m}-s{s}")) and collapsed(c, cell_log(out, lg, f"{m}-s{s}"))]
    variants = {"-lowlr": lower_lr, "-warmup": lambda args: [*args, *LONG_WARMUP]}
    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(train_cell, out, lg, m, s, fix(METHODS[m]), threads, tag=tag)
                   for lg, m, s in found for tag, fix in variants.items()]
        for f in futures:
            try:
                f.result()
            except RuntimeError as e:
                log(f"error: {e}")
    log(f"collapse: {len(found)} collapsed cells, each trained again at a lower lr and with a longer warm-up")
    return [{"lang": lg, "method": m, "seed": s} for lg, m, s in found]


def collapse_rows(out: Path, cells: list[dict]) -> list[dict]:
    """The collapsed ones among `cells` (grid results), with what their logs say and their reruns' PER."""
    rows = []
    for c in cells:
        name = f"{c['method']}-s{c['seed']}"
        health = cell_log(out, c["lang"], name)
        if not collapsed(c, health):
            continue
        loss, rerun = health["loss"], {}
        for tag in ("-lowlr", "-warmup"):
            variant = f"{c['method']}{tag}-s{c['seed']}"
            if r := cell_result(out, c["lang"], variant):
                rerun[tag] = {"per": r["per"], "collapsed": collapsed(r, cell_log(out, c["lang"], variant)),
                              "lr": r["args"][r["args"].index("--lr") + 1]}
        rows.append({"lang": c["lang"], "method": c["method"], "seed": c["seed"], "per": c["per"],
                     "blank_rate": health["blank_rate"], "empty": health["empty"], "warned_at": health["warned_at"],
                     "loss": loss, "valid": health["valid"], "rerun": rerun})
    return rows


def per_cell(pers: list[float]) -> str:
    """'81.6 ±1.2' (mean ± half the range over seeds, in %), or '81.6 (1)' for a single seed."""
    mean = 100 * sum(pers) / len(pers)
    return f"{mean:.1f} ±{50 * (max(pers) - min(pers)):.1f}" if len(pers) > 1 else f"{mean:.1f} (1)"


def collapse_md(rows: list[dict]) -> list[str]:
    """The report's section on collapsed runs: what the loss and the blank rate did, and what the reruns gave."""
    if not rows:
        return []
    num = lambda v: "-" if v is None else f"{100 * v:.0f}"  # noqa: E731  a share in %, rounded
    pct = lambda v: "-" if v is None else f"{num(v)}%"  # noqa: E731
    md = ["### Collapsed runs", "",
          "Each collapsed grid run, with what its log.jsonl says: every validation on the dev split (at update u: "
          "PER / share of the frames blank, in %), the last one's share of empty hypotheses, the training loss (nats "
          "per utterance, the mean since the previous log line: the recipe logs every 200 updates, so one mean over "
          "the run), the update of train.py's collapse warning; and its reruns (`--stage collapse`): one lr step "
          "lower, and a three times longer warm-up.", "",
          "| language | method | seed | test PER | dev PER / blank frames, by update | empty hypotheses | training "
          "loss | warned at | lower lr | longer warm-up |", "|---|---|---:|---:|---|---:|---|---:|---|---|"]
    rerun = lambda r, tag: (f"{100 * r['rerun'][tag]['per']:.1f}" + (" (collapsed)" if r["rerun"][tag]["collapsed"]  # noqa: E731
                            else "") + (f", lr {r['rerun'][tag]['lr']}" if tag == "-lowlr" else "")
                            if tag in r["rerun"] else "not run")
    for r in rows:
        loss = ", ".join(f"{v:.1f} ({u})" for u, v in r["loss"]) or "-"
        valid = ", ".join(f"{u}: {num(e)} / {num(b)}" for u, e, b, _ in r["valid"]) or "-"
        md.append(f"| {r['lang']} | {r['method']} | {r['seed']} | {100 * r['per']:.1f} | {valid} | "
                  f"{pct(r['empty'])} | {loss} | {r['warned_at'] or '-'} | {rerun(r, '-lowlr')} | "
                  f"{rerun(r, '-warmup')} |")
    for tag, name in (("-lowlr", "the lower lr"), ("-warmup", "the longer warm-up")):
        done = [r for r in rows if tag in r["rerun"]]
        if done:
            fixed = sum(not r["rerun"][tag]["collapsed"] for r in done)
            md.append(f"\n{name.capitalize()} removed the collapse in {fixed} of {len(done)} runs.")
    return md + [""]


def backbone_text(backbones: list[str], bb: dict, supervised: str | None) -> str:
    """The report's sentence on the backbone the grid cells (their sha256s: `backbones`) started from."""
    if len(backbones) > 1:
        return f"MIXED: the cells come from {len(backbones)} backbone files; rerun the grid on one."
    if backbones == [supervised] and not bb:
        return f"the supervised stand-in `{DEMO_BACKBONE.relative_to(ROOT)}`."
    if backbones == [supervised]:
        return (f"{bb.get('params', 0) / 1e6:.2f}M-parameter pre-LN wav2vec 2.0 trained with SUPERVISED phone CTC plus "
                f"HuBERT-style MFCC k-means unit prediction on {', '.join(text_sources.PRETRAIN)} "
                f"({bb.get('train_audio_minutes', 0) / 60:.1f} h of speech, {bb.get('updates')} updates, held-in PER "
                f"{100 * bb.get('per', float('nan')):.1f}%): a stand-in for self-supervised pretraining.")
    path = BACKBONE.relative_to(ROOT) if BACKBONE.is_relative_to(ROOT) else BACKBONE
    if backbones[0] != file_sha256(BACKBONE):
        return f"sha256 {backbones[0][:12]}, not --backbone `{path}`: rerun the grid on it."
    ssl = SSL_BACKBONE.exists() and backbones == [file_sha256(SSL_BACKBONE)]
    return (f"`{path}` (sha256 {backbones[0][:12]})" + (f", self-supervised on {', '.join(text_sources.PRETRAIN)} "
            "and, as unlabelled audio, the held-out languages' train clips (tools/pretrain_backbone.py; "
            "bench/results/backbone.md)." if ssl else "."))


def similarity_md(sims: list[dict]) -> list[str]:
    """Application 4's section: per route set (one per lr) the mask similarity against the phone-inventory
    similarity, with permutation p-values and the seed control, and which lr's trend is robust."""
    import statistics
    md = ["## Application 4: mask similarity vs phoneme-inventory similarity", "",
          f"The seed-1 masks of {len(sims[0]['names'])} languages ({len(sims[0]['pairs'])} pairs) against the "
          "cosine similarity of the languages' phone inventories (from their phone transcripts). p: one-sided "
          "permutation p-value of the correlation (the language labels of the inventory matrix permuted; every "
          "permutation when there are at most "
          f"{PERMUTATIONS:,}). Control: the same language learned from two seeds, against two languages learned from "
          "the same seed (pruned sets; seeds 1 and 2).", "",
          "| routes | lr | mask similarity | mean over pairs | random masks | Pearson (p) | Spearman (p) | same "
          "language, two seeds | two languages |", "|---|---|---|---|---|---|---|---|---|"]
    robust = {}
    for sim in sims:
        c = sim.get("seed_control") or {}
        perm = sim.get("permutation") or {k: permutation_test(sim, k) for k in ("cosine", "pruned_cosine")}
        lr = sim.get("lr", "?")
        for key, label in (("cosine", "cosine, kept sets (upstream's measure)"), ("pruned_cosine",
                                                                                  "cosine, pruned sets")):
            t = perm[key]
            mean = statistics.mean(p["overall"][key] for p in sim["pairs"])
            rand = statistics.mean(p["overall"][f"{key}_random"] for p in sim["pairs"])
            control = (f"{c.get('same_language_two_seeds', float('nan')):.4f} | "
                       f"{c.get('two_languages_same_seed', float('nan')):.4f}") if key == "pruned_cosine" else " | "
            md.append(f"| {sim['method']} | {lr} | {label} | {mean:.4f} | {rand:.4f} | {t['pearson']:.2f} "
                      f"({t['pearson_p']:.3f}) | {t['spearman']:.2f} ({t['spearman_p']:.3f}) | {control} |")
        t = perm["cosine"]
        separates = c["same_language_two_seeds"] > c["two_languages_same_seed"] if c else None
        robust[sim["method"]] = (t["pearson_p"] < 0.05 and t["spearman_p"] < 0.05, separates, lr)
    md += ["", "Robust here means: on upstream's measure (kept-set cosine) both Pearson and Spearman positive with "
           "p < 0.05, and the same language from two seeds more alike than two languages (the masks carry the "
           "language, not only seed noise)."]
    for method, (significant, separates, lr) in robust.items():
        verdict = "robust" if significant and separates else "not robust"
        why = [w for w, bad in (("p >= 0.05", not significant), ("the seed control does not separate languages"
                                                                 if separates is False else "no seed control",
                                                                 not separates)) if bad]
        md.append(f"- {method} (lr {lr}): {verdict}" + (f" ({'; '.join(why)})" if why else "") + ".")
    return md + [""] + [f"![similarity, {sim['method']}](miniature_similarity_{sim['method']}.png)"
                        for sim in sims] + [""]


def task_accuracy(bundle: dict) -> dict[str, dict]:
    """Each task's test accuracy, route (the bundle's method) and ft, as the mean over the seeds whose cells of both
    finished (bundle["task_seeds"]); the bundle's own seed alone where those are missing (older bundle.json)."""
    res = {}
    for name, v in bundle.get("served", {}).items():
        if v["kind"] != "task":
            continue
        by = bundle.get("task_seeds", {}).get(name, {})
        route, ft = by.get(bundle["method"], {}), by.get("ft", {})
        seeds = sorted(set(route) & set(ft)) or [str(bundle["seed"])]
        if not set(route) & set(ft):
            route, ft = {seeds[0]: v["checkpoint"]}, {seeds[0]: v["finetuned"]}
        res[name] = {"route": sum(route[s] for s in seeds) / len(seeds), "ft": sum(ft[s] for s in seeds) / len(seeds),
                     "seeds": seeds, "per_seed": {s: (route[s], ft[s]) for s in seeds}}
    return res


def bundle_md(bundle: dict) -> list[str]:
    """Application 2's section: bytes of the bundle against the separately finetuned models, and every route's test
    score served from the bundle against its checkpoint's."""
    ar = bundle["arithmetic"]["fp32"]
    tasks = bundle.get("tasks", [])
    md = ["## Application 2: all routes in one bundle", "",
          f"{len(bundle['languages'])} languages ({', '.join(bundle['languages'])})"
          + (f" and {len(tasks)} tasks ({', '.join(tasks)}: keyword spotting, speaker ID, language ID of espeak-ng "
             "speech, tools/synth_tasks.py; trained as grid cells with half the updates)" if tasks else "")
          + f", {bundle['method']} routes: bundle file {bundle['bundle_bytes']:,} B vs "
          f"{bundle['separate_finetuned_bytes']:,} B for the separately finetuned models (ft) "
          f"({bundle['file_change_percent']:+.1f}%). Arithmetic (fp32): {ar['shared_plus_routes_bytes']:,} B vs "
          f"{ar['dense_models_bytes']:,} B ({ar['change_percent']:+.1f}%).", ""]
    served = bundle.get("served")
    if served:
        equal = sum(v["equal"] for v in served.values())
        md += ["| route | kind | route bytes | finetuned model bytes | test score, checkpoint | test score, served "
               "from the bundle | equal |", "|---|---|---:|---:|---:|---:|---|"]
        for name, v in served.items():
            label = "PER" if v["metric"] == "per" else "accuracy"
            md.append(f"| {name} | {v['kind']} | {v['route_bytes']:,} | {v['finetuned_bytes']:,} | {label} "
                      f"{100 * v['checkpoint']:.2f}% | {100 * v['bundle']:.2f}% | {'yes' if v['equal'] else 'NO'} |")
        md += ["", f"Served from the one bundle file (eval.py with --bundle and --route), {equal} of {len(served)} "
               "routes score exactly what their separately evaluated checkpoints score."]
    acc = task_accuracy(bundle)
    if acc:
        seeds = sorted({s for a in acc.values() for s in a["seeds"]}, key=int)
        floor = ", ".join(f"{t} {100 * v:.1f}%" for t, v in bundle.get("majority", {}).items())
        md += ["", f"Multitask: each task's test accuracy (%) as a {bundle['method']} route and finetuned (ft), per "
               "seed and their mean" + (f" (always answering the most frequent class: {floor})" if floor else "")
               + ".", "",
               "| task | " + " | ".join(f"seed {s}: route / ft" for s in seeds) + " | mean: route / ft |",
               "|---|" + "---|" * (len(seeds) + 1)]
        for name, a in acc.items():
            cells = [(f"{100 * a['per_seed'][s][0]:.1f} / {100 * a['per_seed'][s][1]:.1f}" if s in a["per_seed"]
                      else "-") for s in seeds]
            md.append(f"| {name} | " + " | ".join(cells) + f" | {100 * a['route']:.1f} / {100 * a['ft']:.1f} |")
    return md + [""]


README = ROOT / "README.md"
CLAIMS_START, CLAIMS_END = "<!-- miniature claims: start -->", "<!-- miniature claims: end -->"
COMPARABLE = 0.01  # PER (or accuracy) within 1 point counts as comparable (pruning, multitask)


def claim_rows(mean: dict, bundle: dict | None, curve: dict | None, sims: list[dict],
               budget: dict | None = None) -> list[dict]:
    """The paper's four claims plus multitask, each with a verdict (holds / does not hold / unclear / not run), the
    numbers behind it and where S3-Router loses; `mean`: application 1's PER per language and method (seed mean);
    `budget`: budget_rows (ft ahead of s3r-0.9 at twice the updates: claim 1 fails where that is so in every
    language of the budget rows, and cannot hold where in some)."""
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731  every number below
    rows = []
    # 1. finetuning: S3-Router keeping 90% (upstream's command routes FFN only: s3r-0.9-fa) vs weight finetuning
    claim = "1. Discarding <= 10% of the weights consistently beats weight finetuning (application 1)"
    both = [lg for lg in mean if {"s3r-0.9-fa", "s3r-0.9", "ft"} <= set(mean[lg])]
    if both:
        wins = {m: [lg for lg in both if mean[lg][m] < mean[lg]["ft"]] for m in ("s3r-0.9-fa", "s3r-0.9")}
        avg = {m: sum(mean[lg][m] for lg in both) / len(both) for m in ("s3r-0.9-fa", "s3r-0.9", "ft")}
        head = [lg for lg in both if "head" in mean[lg]]
        verdict = "holds" if len(wins["s3r-0.9-fa"]) == len(both) else \
            "does not hold" if avg["s3r-0.9-fa"] >= avg["ft"] else "unclear"
        loses = [f"{lg}: ft {pct(mean[lg]['ft'])} vs {pct(mean[lg]['s3r-0.9-fa'])}" for lg in both
                 if lg not in wins["s3r-0.9-fa"]]
        loses += [f"{lg}: head only {pct(mean[lg]['head'])} vs {pct(mean[lg]['s3r-0.9-fa'])}" for lg in head
                  if mean[lg]["head"] < mean[lg]["s3r-0.9-fa"]]
        longer = {lg: r for lg, r in (budget or {}).items() if {"ft", "s3r-0.9"} <= set(r)}
        g, u = GRID_UPDATES, BUDGET_UPDATES
        flipped = [lg for lg, r in longer.items() if r["ft"][u] < r["s3r-0.9"][u]]
        loses += [f"{lg} at {u} updates: ft {pct(longer[lg]['ft'][u])} vs s3r-0.9 {pct(longer[lg]['s3r-0.9'][u])}"
                  for lg in flipped]
        if flipped:  # the paper's budgets are far longer: where the order turns with more updates, it counts
            verdict = "does not hold" if len(flipped) == len(longer) else "unclear" if verdict == "holds" else verdict
        rows.append({"claim": claim, "verdict": verdict, "loses": loses, "evidence": (
            f"mean PER over {len(both)} languages: s3r-0.9-fa {pct(avg['s3r-0.9-fa'])}, s3r-0.9 "
            f"{pct(avg['s3r-0.9'])}, ft {pct(avg['ft'])}"
            + (f", head only {pct(sum(mean[lg]['head'] for lg in head) / len(head))}" if head else "")
            + f"; s3r-0.9-fa beats ft in {len(wins['s3r-0.9-fa'])} of {len(both)} languages, s3r-0.9 in "
            f"{len(wins['s3r-0.9'])}"
            + "".join(f"; {lg} seed {SEEDS[0]}, {g} -> {u} updates: ft {pct(r['ft'][g])} -> {pct(r['ft'][u])}, "
                      f"s3r-0.9 {pct(r['s3r-0.9'][g])} -> {pct(r['s3r-0.9'][u])}" for lg, r in longer.items()))})
    else:
        rows.append({"claim": claim, "verdict": "not run", "evidence": "", "loses": []})
    # 2. multilingual: one bundle instead of a model per language, each route serving as its checkpoint
    claim = "2. One shared model with a route per language replaces the per-language models (-88.5% parameters)"
    served = (bundle or {}).get("served") or {}
    langs = {n: v for n, v in served.items() if v["kind"] == "language"}
    if bundle and langs:
        equal = sum(v["equal"] for v in langs.values())
        ar = bundle["arithmetic"]["fp32"]
        verdict = "holds" if bundle["file_change_percent"] < 0 and equal == len(langs) else "does not hold"
        rows.append({"claim": claim, "verdict": verdict, "loses": [f"{n}: served {pct(v['bundle'])} vs checkpoint "
                                                                    f"{pct(v['checkpoint'])}"
                                                                    for n, v in langs.items() if not v["equal"]],
                     "evidence": f"bundle of {len(served)} routes {bundle['file_change_percent']:+.1f}% bytes against "
                                 f"the separately finetuned models (arithmetic, fp32: {ar['change_percent']:+.1f}%); "
                                 f"{equal} of {len(langs)} language routes served from it score as their checkpoints"})
    else:
        rows.append({"claim": claim, "verdict": "not run", "evidence": "", "loses": []})
    # 3. pruning: S3-Router pruning vs OMP, IMP and PARP at the same kept fraction (per weight)
    claim = "3. S3-Router pruning is better than or comparable to OMP, IMP and PARP at the same sparsity"
    points = [r for r in (curve or {}).get("rows", []) if r["granularity"] == "weight" and r["kind"] != "dense"]
    by = {(r["kind"], r["prune_rate"]): r for r in points}
    rates = sorted({rate for kind, rate in by if kind == "prune"}, reverse=True)
    compared = [(rate, kind, by[kind, rate]["per"] - by["prune", rate]["per"]) for rate in rates
                for kind in ("omp", "imp", "parp") if (kind, rate) in by]
    if compared:
        lost = [(rate, kind, d) for rate, kind, d in compared if d < -COMPARABLE]
        names = sorted({k.upper() for _, k, _ in compared})
        # the claim is against every baseline: behind one of them at most of its sparsities is enough to fail it
        beaten_by = [k for k in ("omp", "imp", "parp") if 2 * sum(x == k for _, x, _ in lost)
                     > sum(x == k for _, x, _ in compared)]
        verdict = "holds" if not lost else "does not hold" if beaten_by else "unclear"
        at = lambda rate: " / ".join(f"{k} {pct(by[k, rate]['per'])}" for k in ("prune", "omp", "imp", "parp")  # noqa: E731
                                     if (k, rate) in by)
        rows.append({"claim": claim, "verdict": verdict, "loses": [
            f"{k.upper()} at {100 * (1 - rate):.0f}% sparsity by {-100 * d:.1f} points" for rate, k, d in lost],
            "evidence": "".join(f"{k.upper()} better at most sparsities; " for k in beaten_by)
                        + f"{curve['lang']}, {len(rates)} sparsities: S3-Router pruning better or within "
                        f"{100 * COMPARABLE:.0f} point in {len(compared) - len(lost)} of {len(compared)} comparisons "
                        f"with {', '.join(names)}; PER " + ", ".join(f"{100 * (1 - r):.0f}%: {at(r)}" for r in rates)
                        + "".join(f"; control, {c['method']}" + (f" at {100 * (1 - c['prune_rate']):.0f}%"
                                                                 if c["kind"] != "ft-more" else "")
                                  + f": {pct(c['per'])}" for c in curve.get("controls", []))})
    else:
        rows.append({"claim": claim, "verdict": "not run", "evidence": "", "loses": []})
    # 4. analysis: mask similarity follows phonetic similarity
    claim = "4. Mask similarity between languages correlates with their phonetic similarity"
    if sims:
        robust = {}
        for sim in sims:
            perm = sim.get("permutation") or {"cosine": permutation_test(sim, "cosine")}
            t, c = perm["cosine"], sim.get("seed_control") or {}
            separates = bool(c) and c["same_language_two_seeds"] > c["two_languages_same_seed"]
            robust[sim["method"]] = (t["pearson_p"] < 0.05 and t["spearman_p"] < 0.05 and separates, t,
                                     sim.get("lr", "?"))
        n = sum(r[0] for r in robust.values())
        verdict = "holds" if n == len(robust) else "does not hold" if n == 0 else "unclear"
        rows.append({"claim": claim, "verdict": verdict,
                     "loses": [f"lr {lr}: not robust" for ok, _, lr in robust.values() if not ok],
                     "evidence": "; ".join(f"lr {lr}: Pearson {t['pearson']:.2f} (p {t['pearson_p']:.3f}), Spearman "
                                           f"{t['spearman']:.2f} (p {t['spearman_p']:.3f})"
                                           for _, t, lr in robust.values())})
    else:
        rows.append({"claim": claim, "verdict": "not run", "evidence": "", "loses": []})
    # 5. multitask: task routes in the same bundle, as good as finetuning the task
    claim = "Multitask: task routes (keyword spotting, speaker ID, language ID) in the same bundle match finetuning"
    tasks = {n: v for n, v in served.items() if v["kind"] == "task" and v.get("finetuned") is not None}
    if tasks:
        acc = task_accuracy(bundle)
        behind = {n: acc[n]["ft"] - acc[n]["route"] for n in tasks}  # accuracy points ft is ahead
        lost = [n for n, d in behind.items() if d > COMPARABLE]
        equal = all(v["equal"] for v in tasks.values())
        verdict = "does not hold" if not equal or len(lost) > len(tasks) / 2 else "holds" if not lost else "unclear"
        seeds = {len(a["seeds"]) for a in acc.values()}
        rows.append({"claim": claim, "verdict": verdict,
                     "loses": [f"{n}: ft {pct(acc[n]['ft'])}% vs {pct(acc[n]['route'])}%" for n in lost],
                     "evidence": ", ".join(f"{n} accuracy {pct(acc[n]['route'])}% (ft {pct(acc[n]['ft'])}%)"
                                           for n in tasks)
                                 + (f" (test, mean of {max(seeds)} seeds)" if max(seeds) > 1 else " (test, 1 seed)")
                                 + f"; served from the bundle as their checkpoints: {'yes' if equal else 'NO'}"})
    else:
        rows.append({"claim": claim, "verdict": "not run", "evidence": "", "loses": []})
    return rows


def claims_md(rows: list[dict]) -> list[str]:
    md = ["| claim (paper) | verdict here | the numbers | where S3-Router loses |", "|---|---|---|---|"]
    md += [f"| {r['claim']} | **{r['verdict']}** | {r['evidence'] or '-'} | {'; '.join(r['loses']) or '-'} |"
           for r in rows]
    return md


def write_readme_claims(lines: list[str], readme: Path | None = None) -> bool:
    """Put the claims table between the README's claims markers (where it has them); returns whether it did."""
    readme = readme or README
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    if CLAIMS_START not in text or CLAIMS_END not in text:
        return False
    head, rest = text.split(CLAIMS_START, 1)
    tail = rest.split(CLAIMS_END, 1)[1]
    readme.write_text(head + CLAIMS_START + "\n" + "\n".join(lines) + "\n" + CLAIMS_END + tail, encoding="utf-8")
    return True


def report(out: Path, a):
    """bench/results/miniature.json + miniature.md (+ PNG plots): whatever has finished so far."""
    import statistics

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = RESULTS
    results.mkdir(parents=True, exist_ok=True)
    cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*/*/result.json"))]
    grid = [c for c in cells if c["method"] in METHODS and c["lang"] in a.langs]
    table = {}
    for c in grid:
        table.setdefault(c["lang"], {}).setdefault(c["method"], []).append(c["per"])
    langs = [lg for lg in a.langs if lg in table]
    methods = [m for m in METHODS if any(m in table[lg] for lg in langs)]
    mean = {lg: {m: statistics.mean(v) for m, v in table[lg].items()} for lg in langs}
    collapses = collapse_rows(out, [c for c in grid if c["lang"] in langs])
    n_collapsed = {(r["lang"], r["method"]): 0 for r in collapses}
    for r in collapses:
        n_collapsed[r["lang"], r["method"]] += 1
    backbone_report = out / "backbone" / "report.json"
    supervised = file_sha256(DEMO_BACKBONE) if DEMO_BACKBONE.exists() else None
    backbones = sorted({c["backbone_sha256"] for c in grid}) or [file_sha256(BACKBONE)]
    bb = json.loads(backbone_report.read_text()) if backbone_report.exists() and supervised in backbones else {}
    lr_path = results / "miniature_lr.json"
    lr_choice = json.loads(lr_path.read_text()) if lr_path.exists() else None
    backbone_arg = "" if BACKBONE == DEFAULT_BACKBONE else \
        f" --backbone {BACKBONE.relative_to(ROOT) if BACKBONE.is_relative_to(ROOT) else BACKBONE}"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    cpu_min = sum(c["train_cpu_s"] for c in cells) / 60
    bundle = json.loads((out / "bundle.json").read_text()) if (out / "bundle.json").exists() else None
    curve = curve_rows(out, rates=a.curve_rates)
    sims = [json.loads(p.read_text()) for m in SIMILARITY_METHODS if (p := out / f"similarity-{m}.json").exists()]
    claims = claim_rows(mean, bundle, curve, sims, budget_rows(out))
    summary = {"command": f"python -m tools.miniature{backbone_arg}", "commit": commit, "cells": cells,
               "per_mean": mean, "claims": claims, "collapsed": collapses, "backbone_sha256": backbones, "lrs": LRS,
               "lr_selection": lr_choice and {k: lr_choice[k] for k in ("langs", "mean_dev_per", "selected")},
               "seeds": {lg: {m: len(v) for m, v in table[lg].items()} for lg in langs},
               "cell_cpu_minutes": round(cpu_min, 1), "backbone": {k: v for k, v in bb.items() if k != "vocab"},
               "bundle": bundle, "curve": curve, "budget": budget_rows(out),
               "similarity": [{k: v for k, v in sim.items() if k in ("method", "lr", "names", "reference",
                                                                  "seed_control", "permutation")}
                              | {"pairs": [{"a": p["a"], "b": p["b"], **p["overall"]} for p in sim["pairs"]]}
                              for sim in sims]}
    (results / "miniature.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")

    corpus_s = sum(json.loads(d.read_text())["seconds_to_make"]
                   for d in (corpus_root(out) / RELEASE).glob("*/DONE"))
    md = ["# The miniature: S3-Router on synthetic multilingual speech, CPU scale", "",
          f"Regenerate: `python -m tools.miniature{backbone_arg}` (resumable; cells cached under "
          "runs/miniature/cells). "
          f"Commit {commit}. "
          f"Cost on the 2-core development machine: corpus {corpus_s / 60:.0f} min wall"
          + (f", backbone {bb.get('train_cpu_minutes')} min of training steps" if bb else "")
          + f", {cpu_min:.0f} CPU minutes of finetuning and evaluation cells (two side by side, one thread each).", "",
          f"Status: {sum(c['method'] in a.methods and c['seed'] in a.seeds for c in grid)} of "
          f"{len(a.langs) * len(a.methods) * len(a.seeds)} application-1 cells finished "
          f"({', '.join(a.langs)} x {', '.join(a.methods)} x seeds {', '.join(map(str, a.seeds))}); rerunning the "
          "command continues where it stopped.", "",
          "Speech: espeak-ng reading Debian-packaged text (tools/text_sources.py), CommonVoice layout, ~5 minutes of "
          "training speech per held-out language; targets are the espeak-ng phone transcripts, scored by phone error "
          "rate (PER, %, greedy CTC, test split). Backbone: "
          + backbone_text(backbones, bb, supervised)
          + " It never heard a held-out language's dev or test clips, nor any transcript of them.", "",
          "Caveats: every method gets the same recipe (200 updates of 10 s of audio, tri-stage schedule) with its "
          + (f"family's peak lr chosen on the dev split of {' and '.join(lr_choice['langs'])}, languages reported "
             f"nowhere else (miniature_lr.md: head {LRS['head']}, ft {LRS['ft']}, s3r {LRS['s3r']}"
             + ("; CHOSEN ON ANOTHER BACKBONE: rerun --stage lr" if lr_choice.get("backbone_sha256") not in backbones
                else "") + "); "
             if lr_choice else
             f"own peak lr, the better of 3e-3 and 1e-2 on the built-in demo corpus (ft {FT_LR}, the others "
             f"{ROUTE_LR}); ")
          + "in the pruning curve, S3-Router pruning trains scores and head for 200 more updates on top of the "
          "finetuned model while OMP (as upstream's baseline) does no retraining; "
          "the espeak-ng voices are far more regular than real speakers, so absolute PERs say little about real "
          "speech, only the comparisons between methods do.", ""]
    if langs:
        md += ["## Application 1: PER (%) per held-out language, mean over seeds", "",
               "| language | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for lg in langs:
            cells_md = (per_cell(table[lg][m]) + "†" * n_collapsed.get((lg, m), 0) if m in table[lg] else "-"
                        for m in methods)
            md.append(f"| {lg} | " + " | ".join(cells_md) + " |")
        full = [lg for lg in langs if all(m in mean[lg] for m in methods)]
        if full:
            md.append(f"| mean of {len(full)} | " + " | ".join(
                f"{100 * statistics.mean(mean[lg][m] for lg in full):.1f}"
                                                          for m in methods) + " |")
        md.append("| runs that collapsed (†) | " + " | ".join(
            f"{sum(r['method'] == m for r in collapses)} of {sum(len(table[lg].get(m, [])) for lg in langs)}"
            for m in methods) + " |")
        md += ["", "Mean over seeds ± half their range; (1) = one seed finished so far. head: frozen encoder, CTC head "
               "only; ft: standard weight finetuning; s3r-R: S3-Router keeping fraction R of attention+FFN weights; "
               f"-fa: --fix-attn (FFN only routed). †: one run collapsed (test PER above {100 * COLLAPSED:.0f}%, or "
               f"its last validation blank-only: every hypothesis empty or {100 * BLANK_ONLY:.0f}% of the frames "
               "blank).", "",
               "![PER per language](miniature_per.png)", ""]
        md += collapse_md(collapses) + budget_md(budget_rows(out))
        fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(langs) * len(methods)), 4))
        w = 0.8 / len(methods)
        for k, m in enumerate(methods):
            ax.bar([i + k * w for i in range(len(langs))], [100 * mean[lg].get(m, float("nan")) for lg in langs], w,
                   label=m)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(langs))], langs)
        ax.set(ylabel="PER (%)", title="held-out languages: PER by method (lower is better)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(results / "miniature_per.png", dpi=110)
        plt.close(fig)
    if bundle:
        md += bundle_md(bundle)
    if curve:
        md += [f"## Application 3: pruning curve ({curve['lang']})", "", "| method | sparsity | PER (%) |",
               "|---|---|---|"]
        md += [f"| {r['method']} | {100 * r['sparsity']:.0f}% | {100 * r['per']:.1f} |" for r in curve["rows"]
               if r["granularity"] == "weight"]
        md += [f"| control: {r['method']} | {100 * r['sparsity']:.0f}% | {100 * r['per']:.1f} |"
               for r in curve.get("controls", [])]
        md += ["", f"Updates after the finetuned model's 200: OMP none, S3-Router pruning 200 (scores and head), IMP "
               f"{IMP_ROUNDS} x 200 (weights, rewound to the backbone each round); PARP runs 200 from the backbone "
               "(no ft model). The controls give ft and IMP S3-Router pruning's 200: the ft model finetuned 200 more "
               "updates, dense, and IMP in one round.", "",
               "![pruning curve](miniature_pruning.png)", "",
               "Structured (neuron+head) pruning, PER against measured speedup: miniature_structured.md.", ""]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for m in ("OMP", "IMP", "PARP", "S3-Router pruning"):
            pts = [(r["sparsity"], 100 * r["per"]) for r in curve["rows"] if r["method"] == m]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", label=m)
        ax.axhline(100 * curve["rows"][0]["per"], ls="--", c="gray", label="finetuned, dense")
        ax.set(xlabel="sparsity", ylabel="PER (%)", title=f"pruning the finetuned model ({curve['lang']})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(results / "miniature_pruning.png", dpi=110)
        plt.close(fig)
    if sims:
        md += similarity_md(sims)
    unfinished = "; not run: its cells have not finished." if any(r["verdict"] == "not run" for r in claims) else "."
    table_md = claims_md(claims) + ["", f"From `python -m tools.miniature{backbone_arg}` at commit {commit} "
                                        f"(bench/results/miniature.md){unfinished}"]
    md[2:2] = ["## The paper's claims here", "", *table_md, ""]
    (results / "miniature.md").write_text("\n".join(md) + "\n")
    if write_readme_claims(table_md):
        log(f"report: the claims table -> {README}")
    log(f"report: {len(cells)} cells -> {results / 'miniature.md'}")


def structured_report(out: Path, curve: dict, command: str) -> None:
    """bench/results/miniature_structured.json + .md + miniature_pruning_structured.png: the pruning curve with its
    structured rows, PER against measured speedup, and what structure costs in PER at each kept fraction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter
    results = RESULTS
    results.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    lang, seed, rows = curve["lang"], curve["seed"], curve["rows"]
    retrained = {k for k, _, _, trained in CURVE_KINDS if trained}
    cells = [cell_result(out, lang, f"ft-s{seed}")] + [cell_result(out, lang, f"{r['kind']}-{r['prune_rate']}-s{seed}")
                                                       for r in rows if r["kind"] in retrained]
    cpu_min = sum(c["train_cpu_s"] for c in cells) / 60
    summary = {"command": command, "commit": commit, "curve": curve, "cell_cpu_minutes": round(cpu_min, 1)}
    (results / "miniature_structured.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    speed, ctrl = curve.get("speed") or {}, curve.get("speed_control")
    fmt = lambda r, part: f"{r['speedup'][part]:.2f}" if r["speedup"] else "-"  # noqa: E731  table cells, 2 uses
    md = [f"# The miniature's pruning curve with structured routes ({lang})", "",
          f"Regenerate: `{command}` (resumable; cells cached under runs/miniature/cells). Commit {commit}. "
          f"{cpu_min:.0f} CPU minutes of train.py for its {len(cells)} trained cells (ft included).",
          "",
          "Same backbone, corpus and recipe as the miniature (bench/results/miniature.md), seed "
          f"{seed}: the weight-finetuned model (`ft`) is pruned at each kept fraction (rate) of every attention and "
          "FFN tensor's weights (unstructured) or of every layer's FFN neurons and attention heads (neuron+head). "
          "OMP: one-shot magnitude pruning, no retraining (per weight by |W|; per neuron/head by the group's mean "
          "|W|, i.e. its L1 norm). S3-Router pruning: scores initialised to those magnitudes "
          "(weight_magnitude_with_scale, so its first mask is OMP's), attention included, then scores and head "
          "trained for the recipe's 200 updates, the weights frozen. PARP (s3r/prune.py): the weights finetuned "
          "200 updates from the backbone under a magnitude mask recomputed every 50, pruned weights free to come "
          f"back. IMP: {IMP_ROUNDS} rounds after the ft model, each pruning the last round's smallest |W| (the kept "
          "fraction falling geometrically to the rate), rewinding the survivors to the backbone's values and "
          "finetuning 200 updates under the mask. Neuron+head models are cut into a smaller dense model "
          "(s3r/compact.py) and evaluated as such; unstructured ones are folded into dense matrices with zeros. "
          "Sparsity is measured on the deployed model: the fraction of attention and FFN weight entries that are "
          "gone or zero (the backbone has 4 heads per layer, so a head rate of 0.5 and 0.3 both keep 2).", "",
          "| method | rate | sparsity | params (M) | PER (%) | speedup, end to end | speedup, transformer layers |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['method']} | {r['prune_rate']:g} | {100 * r['sparsity']:.0f}% | "
                  + (f"{r['params'] / 1e6:.2f}" if r["params"] else "-")
                  + f" | {100 * r['per']:.1f} | {fmt(r, 'e2e')} | {fmt(r, 'layers')} |")
    if speed:
        md += ["", f"Speedup = dense eval-forward time / this model's, measured (python -m bench.structured "
               f"--checkpoints): CPU time, one torch thread, a batch of 4 utterances of 8, 7, 6 and 5 s, "
               f"{speed['rounds']} rounds with every model once per round in a fresh random order, median of the "
               "per-round ratios. The machine was shared with other people's jobs (load average "
               f"{speed['load_average'][0]:.1f} on 2 cores at the end), so small differences are noise: a copy of "
               "the dense model timed as one more model gives "
               + (f"{1 / ctrl['e2e']['median']:.2f} end to end and {1 / ctrl['layers']['median']:.2f} for the "
                  "layers" if ctrl else "(no control)")
               + ". End to end includes the convolutional feature encoder, which no route prunes here and which is "
               "a large share of this small model's time."]
    by = {(r["kind"], r["prune_rate"]): r for r in rows}
    rates = sorted({r["prune_rate"] for r in rows if r["kind"] != "dense"}, reverse=True)
    dense = rows[0]
    lines = []
    for rate in rates:
        u, s_, o, on = (by.get((k, rate)) for k in ("prune", "prune-nh", "omp", "omp-nh"))
        if u and s_:
            text = (f"rate {rate:g}: neuron+head S3-Router pruning {100 * s_['per']:.1f}% PER vs "
                    f"{100 * u['per']:.1f}% per weight ({100 * (s_['per'] - u['per']):+.1f} points for the "
                    "structure)")
            if o and on:
                text += (f"; OMP {100 * on['per']:.1f}% per neuron/head vs {100 * o['per']:.1f}% per weight "
                         f"({100 * (on['per'] - o['per']):+.1f})")
            if on:
                text += f"; retraining the structured scores changes PER by {100 * (s_['per'] - on['per']):+.1f}"
            if s_["speedup"]:
                text += (f"; the structured model runs {s_['speedup']['e2e']:.2f}x end to end "
                         f"({s_['speedup']['layers']:.2f}x in the layers)")
            lines.append(f"- {text}.")
    same = [r for r in rows if "per_routed" in r]
    if same:
        equal = sum(r["per"] == r["per_routed"] for r in same)
        md += ["", f"The compact models' PER equals the routed models' at {equal} of {len(same)} neuron+head "
               "S3-Router points (compact() removes exactly the dropped neurons and heads)."]
    if lines:
        md += ["", f"What structure costs (PER points, against the dense finetuned model's {100 * dense['per']:.1f}%):",
               "", *lines]
    md += ["", "![PER against measured speedup](miniature_pruning_structured.png)", ""]
    (results / "miniature_structured.md").write_text("\n".join(md) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, part, name in zip(axes, ("e2e", "layers"), ("end to end", "transformer layers"), strict=True):
        for kind, label, _, _ in CURVE_KINDS:
            pts = [(r["speedup"][part], 100 * r["per"], r["sparsity"]) for r in rows
                   if r["kind"] == kind and r["speedup"]]
            if pts:
                line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if kind.endswith("nh") else "s--",
                                label=label)
                for x, y, sp in pts if kind.endswith("nh") else []:  # the unstructured ones overlap at ~1.0x
                    ax.annotate(f"{100 * sp:.0f}%", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3),
                                color=line.get_color())
        if dense["speedup"]:
            ax.plot([1.0], [100 * dense["per"]], "k*", ms=10, label="finetuned, dense")
        ax.set(xlabel=f"measured speedup, {name} (x)", title=f"{lang}: PER vs speedup, {name}", yscale="log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PER (%)")
    axes[0].legend(fontsize=7)
    fig.text(0.5, 0.005, "labels: sparsity of the attention + FFN weights (unstructured points, unlabelled: "
             "1 - rate, in order along their line)", ha="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(results / "miniature_pruning_structured.png", dpi=110)
    plt.close(fig)
    log(f"report: {len(rows)} curve points -> {results / 'miniature_structured.md'}")


def main(argv=None):
    global BACKBONE
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", default="all", help="all, or one or more (comma-separated) of corpus, demo, backbone, "
                   "lr, grid, collapse, budget, bundle, curve, similarity, report; or ssl-pilot (see --init)")
    p.add_argument("--backbone", default=str(DEFAULT_BACKBONE.relative_to(ROOT)), help="the checkpoint every cell "
                   "starts from (default: %(default)s: the self-supervised backbone when committed, else the "
                   "supervised stand-in)")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--langs", nargs="*", default=GRID_LANGS[:6], help="held-out languages of the grid, in order "
                   f"(default: the first six of {', '.join(GRID_LANGS)})")
    p.add_argument("--methods", nargs="*", help=f"subset of {', '.join(METHODS)} (default: all; the last one's "
                   "name carries its lr)")
    p.add_argument("--similarity-langs", nargs="*", default=GRID_LANGS, help="similarity stage: the languages whose "
                   "seed-1 routes are compared pairwise (default: all ten held-out languages: 45 pairs; the two lr "
                   "languages among them, whose test splits no score uses; routes the grid lacks are trained)")
    p.add_argument("--lr-langs", nargs="*", default=LR_LANGS, help="lr stage: the dev languages the lrs are chosen "
                   "on, none of them reported (default: %(default)s)")
    p.add_argument("--seeds", nargs="*", type=int, default=SEEDS)
    p.add_argument("--jobs", type=int, default=2, help="cells trained side by side (one thread each with 2)")
    p.add_argument("--corpus-langs", nargs="*", default=CORPUS_LANGS, help="languages the corpus stage makes "
                   "(default: all, pretraining and held out; a subset makes the same speech)")
    p.add_argument("--curve-rates", nargs="*", type=float, default=CURVE_RATES, help="kept fractions of the pruning "
                   "curve (default: %(default)s)")
    p.add_argument("--init", default=str(SSL_BACKBONE), help="ssl-pilot: the backbone to pilot")
    p.add_argument("--pilot-tag", default="ssl", help="ssl-pilot: its name in the table and in the cell names")
    p.add_argument("--speed-rounds", type=int, default=SPEED_ROUNDS, help="interleaved timing rounds of the curve")
    p.add_argument("--curve-kinds", nargs="*", default=DEFAULT_CURVE_KINDS, choices=DEFAULT_CURVE_KINDS,
                   help="pruning methods of the curve (default: all: %(default)s; parp and imp retrain the weights, "
                   f"imp in {IMP_ROUNDS} rounds; controls: ft and IMP at S3-Router pruning's number of updates)")
    a = p.parse_args(argv)
    out = Path(a.out)
    command = " ".join(["python -m tools.miniature", *(sys.argv[1:] if argv is None else argv)])
    BACKBONE = Path(a.backbone) if Path(a.backbone).exists() else ROOT / a.backbone  # as given, or in the repo
    BACKBONE = BACKBONE.resolve()
    if not BACKBONE.exists() and not {"corpus", "demo", "backbone"} >= set(a.stage.split(",")):
        raise SystemExit(f"error: --backbone {a.backbone}: no such file")
    stages = set(a.stage.split(","))
    stage = lambda name: name in stages or "all" in stages  # noqa: E731  a predicate read 8 times below
    if stage("corpus"):
        make_corpus(out, a.corpus_langs)
    if stage("demo"):
        make_demo(out)
    if stage("backbone") and not DEMO_BACKBONE.exists():
        run_logged(python_cmd("-m", "tools.pretrain_supervised", "--data-root", corpus_root(out),
                              "--out", out / "backbone",
                              "--save", DEMO_BACKBONE), out / "backbone.log", 2)
    if stage("lr"):
        run_lr(out, a.lr_langs, SEEDS[0], a.jobs, command)
        use_lrs(selected_lrs())
    a.methods = a.methods or list(METHODS)
    unknown = [m for m in a.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: --methods {' '.join(unknown)}: not a method at the current lrs "
                         f"({', '.join(METHODS)})")
    if stage("grid"):
        run_grid(out, a.langs, a.methods, a.seeds, a.jobs)
    if stage("collapse"):
        run_collapse(out, a.langs, a.methods, a.seeds, a.jobs)
    if stage("budget"):
        run_budget(out, a.jobs)
    if stage("bundle"):
        run_bundle(out, a.langs, jobs=a.jobs, seeds=a.seeds)
    if stage("curve") and CURVE_LANG in a.langs:
        curve = run_curve(out, CURVE_LANG, SEEDS[0], a.curve_rates, a.jobs, a.speed_rounds, a.curve_kinds)
        structured_report(out, curve, command)
    if stage("similarity"):  # its routes trained here where the grid has not (seed 1 of the other languages)
        run_grid(out, a.similarity_langs, SIMILARITY_METHODS, SEEDS[:1], a.jobs)
        for method in SIMILARITY_METHODS:
            run_similarity(out, a.similarity_langs, method)
    if stage("report"):
        report(out, a)
    if "ssl-pilot" in stages:  # not part of "all": it pilots a backbone other than the grid's
        run_pilot(out, Path(a.init), a.pilot_tag, a.jobs)


if __name__ == "__main__":
    main()
