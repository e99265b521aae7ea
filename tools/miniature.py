"""The miniature: S3-Router's four claims measured at CPU scale on synthetic multilingual speech (issue 6).

    python -m tools.miniature                 # all: corpus, backbone, grid, bundle, curve, similarity, report
    python -m tools.miniature --stage corpus  # one stage (corpus, backbone, grid, bundle, curve, similarity, report)

Every stage is resumable: the corpus is written one language at a time (a finished language has a DONE file),
each experiment cell caches its result as JSON under runs/miniature/cells/, and a stage skips what is cached.
Run it again after an interruption and it continues. CPU only; the budget is ~3 h on 2 cores.

Data: espeak-ng speech (tools/synth_corpus.py) of Debian-packaged text (tools/text_sources.py), in the CommonVoice
layout (48 kHz mp3 + TSV) with the espeak-ng phoneme transcripts as targets, scored by phone error rate (PER).
Pretraining languages (tools/text_sources.PRETRAIN) train the backbone; the held-out languages are upstream's ten
CommonVoice languages (tools/text_sources.HELD_OUT), never seen by the backbone.
"""
import argparse
import functools
import hashlib
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


def make_corpus(out: Path, langs: list[str], workers: int = 2):
    """One CommonVoice-layout folder per language under out/corpus/cv-corpus-mini/<lang>, written atomically."""
    from tools.synth_corpus import synth_corpus
    release = corpus_root(out) / RELEASE
    for i, lang in enumerate(langs):
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
BACKBONE = ROOT / "s3r" / "assets" / "demo" / "backbone.pt"
# Application 1 methods, in the order they run; the grid runs every method for one seed before the next seed.
# "head": the frozen-encoder baseline, only the CTC head learns: weight finetuning with the encoder frozen for every
# update (upstream freeze_finetune_updates), so that no gradient flows into it (S3-Router at prune rate 1.0 learns the
# same, but pays for a backward pass through the encoder).
# Peak lr per method: the better of 3e-3 and 1e-2 for each on the built-in demo corpus (Spanish, 200 updates; PER
# head 9.1 at 1e-2 (75.8 at 1e-3), ft 12.4 / 13.6, s3r-0.9 9.1 / 7.6 at 3e-3 / 1e-2).
FT_LR, ROUTE_LR = "3e-3", "1e-2"
METHODS = {
    "head": ["--finetune-weights", "--freeze-finetune-updates", "1000000", "--lr", ROUTE_LR],
    "ft": ["--finetune-weights", "--lr", FT_LR],
    "s3r-0.9": ["--prune-rate", "0.9", "--no-fix-attn", "--lr", ROUTE_LR],
    "s3r-0.9-fa": ["--prune-rate", "0.9", "--fix-attn", "--lr", ROUTE_LR],
    "s3r-0.7": ["--prune-rate", "0.7", "--no-fix-attn", "--lr", ROUTE_LR],
    "s3r-0.7-fa": ["--prune-rate", "0.7", "--fix-attn", "--lr", ROUTE_LR],
    "s3r-0.5": ["--prune-rate", "0.5", "--no-fix-attn", "--lr", ROUTE_LR],
    "s3r-0.5-fa": ["--prune-rate", "0.5", "--fix-attn", "--lr", ROUTE_LR],
    # S3-Router at ft's lr: at 1e-2, 200 Adam steps move a score (kaiming scale, ~0.07 here) far more than its initial
    # value, so the learned masks keep little of their weight_rank init; this column shows what a gentler lr gives
    # (PER, and in application 4, how language-specific the masks are).
    "s3r-0.9-lr3e-3": ["--prune-rate", "0.9", "--no-fix-attn", "--lr", FT_LR],
}
SIMILARITY_METHODS = ["s3r-0.9", "s3r-0.9-lr3e-3"]
DEFAULT_METHODS = list(METHODS)
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


def evaluate(ckpt: Path, data: str, out: Path, json_path: Path, threads: int) -> dict:
    if not json_path.exists():
        run_logged(python_cmd("eval.py", "--checkpoint", ckpt, "--data", data, "--data-root", corpus_root(out),
                              "--json", json_path, "--num-workers", "0"), json_path.with_suffix(".log"), threads)
    return json.loads(json_path.read_text())


def train_cell(out: Path, lang: str, method: str, seed: int, args: list[str], threads: int,
               init: Path = BACKBONE, tag: str = "") -> dict:
    """One experiment: train.py on <lang>-train (validated on <lang>-dev), eval.py on <lang>-test; cached as JSON."""
    name = f"{method}{tag}-s{seed}"
    cell = out / "cells" / lang / name
    result_path = cell / "result.json"
    backbone = file_sha256(BACKBONE)
    if result_path.exists():
        result = json.loads(result_path.read_text())
        if result.get("backbone_sha256") == backbone and result.get("recipe") == RECIPE + args:
            return result
        shutil.rmtree(cell)  # trained on another backbone or recipe: stale
        log(f"cell {lang} {name}: recomputed (the backbone or the recipe changed)")
    t0 = time.time()
    cpu = run_logged(python_cmd("train.py", "--init", init, "--data", f"{lang}-train", "--data-root", corpus_root(out),
                                "--valid", f"{lang}-dev", "--save-dir", cell, "--seed", seed, *RECIPE, *args),
                     cell / "train.log", threads)
    best = cell / "checkpoint_best.pt"
    ckpt = best if best.exists() else cell / "checkpoint_last.pt"
    test = evaluate(ckpt, f"{lang}-test", out, cell / "test.json", threads)
    result = {"lang": lang, "method": method + tag, "seed": seed, "per": test["per"],
              "test_utterances": test["utterances"], "checkpoint": str(ckpt.relative_to(out)),
              "train_cpu_s": round(cpu, 1), "wall_s": round(time.time() - t0, 1), "threads": threads,
              "args": args, "recipe": RECIPE + args, "backbone_sha256": backbone}
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    log(f"cell {lang} {name}: PER {100 * result['per']:.2f} ({result['wall_s']:.0f} s)")
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


# ------------------------------------------------------------------------------------------------ applications 2-4
def cell_result(out: Path, lang: str, name: str) -> dict | None:
    path = out / "cells" / lang / name / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_bundle(out: Path, langs: list[str], method: str = "s3r-0.9", seed: int = SEEDS[0]) -> dict | None:
    """Application 2: every language's route in one bundle (python -m s3r.routes bundle) vs separate finetuned
    models."""
    from s3r import load_pretrained
    from s3r.checkpoint import s3r_checkpoint, save_atomic
    from s3r.model import Wav2Vec2Config
    from s3r.routes import load_route, route_summary, storage
    have = [lg for lg in langs if cell_result(out, lg, f"{method}-s{seed}") and cell_result(out, lg, f"ft-s{seed}")]
    if len(have) < 2:
        log(f"bundle: needs {method} and ft cells of at least 2 languages (have {len(have)})")
        return None
    folder = out / "bundle"
    folder.mkdir(parents=True, exist_ok=True)
    routes, dense_bytes = {}, 0
    for lang in have:
        route = folder / f"{lang}.route"
        if not route.exists():
            ckpt = out / cell_result(out, lang, f"{method}-s{seed}")["checkpoint"]
            run_logged(python_cmd("-m", "s3r.routes", "export", ckpt, route), folder / "bundle.log", 2)
        routes[lang] = route
        dense = folder / f"{lang}.ft.pt"  # the finetuned model alone, as one would ship it (no optimizer state)
        if not dense.exists():
            model = load_pretrained(out / cell_result(out, lang, f"ft-s{seed}")["checkpoint"])
            save_atomic(s3r_checkpoint(model), dense)
        dense_bytes += dense.stat().st_size
    bundle = folder / "all.bundle"
    run_logged(python_cmd("-m", "s3r.routes", "bundle", bundle, "--pretrained", BACKBONE,
                          *[f"{lg}={r}" for lg, r in routes.items()]), folder / "bundle.log", 2)
    info = subprocess.run(python_cmd("-m", "s3r.routes", "info", bundle), capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    (folder / "info.txt").write_text(info)
    loaded = [load_route(r) for r in routes.values()]
    arithmetic = storage(Wav2Vec2Config.from_dict(loaded[0]["config"]), [route_summary(r) for r in loaded])
    res = {"languages": have, "method": method, "seed": seed, "bundle_bytes": bundle.stat().st_size,
           "separate_finetuned_bytes": dense_bytes, "route_bytes": {lg: r.stat().st_size for lg, r in routes.items()},
           "backbone_bytes": BACKBONE.stat().st_size,
           "file_change_percent": 100.0 * (bundle.stat().st_size / dense_bytes - 1.0), "arithmetic": arithmetic}
    (out / "bundle.json").write_text(json.dumps(res, indent=1) + "\n")
    log(f"bundle: {len(have)} languages, {res['bundle_bytes']:,} B vs {dense_bytes:,} B separate "
        f"({res['file_change_percent']:+.1f}%)")
    return res


def run_curve(out: Path, lang: str = CURVE_LANG, seed: int = SEEDS[0], rates=CURVE_RATES, jobs: int = 2) -> dict | None:
    """Application 3: S3-Router pruning of the weight-finetuned model vs one-shot magnitude pruning (OMP).

    Step 1 is the grid's `ft` cell; step 2 routes its weights from init_score weight_magnitude_with_scale (the first
    mask IS the OMP mask), attention included, and trains only the scores and the head.
    """
    ft = cell_result(out, lang, f"ft-s{seed}")
    if ft is None:
        log(f"curve: needs the ft-s{seed} cell of {lang}")
        return None
    ft_ckpt = out / ft["checkpoint"]
    for rate in rates:
        omp_dir = out / "cells" / lang / f"omp-{rate}-s{seed}"
        source = omp_dir / "finetuned.sha256"  # the finetuned model it pruned: a recomputed ft cell makes it stale
        if source.exists() and source.read_text() != file_sha256(ft_ckpt):
            shutil.rmtree(omp_dir)
        omp_dir.mkdir(parents=True, exist_ok=True)
        source.write_text(file_sha256(ft_ckpt))
        pruned = omp_dir / "pruned.pt"
        if not pruned.exists():
            run_logged(python_cmd("-m", "s3r.routes", "omp", ft_ckpt, pruned, "--prune-rate", rate),
                       omp_dir / "omp.log", 2)
        evaluate(pruned, f"{lang}-test", out, omp_dir / "test.json", 2)
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(jobs) as pool:  # `jobs` cells side by side, as in the grid
        args = lambda rate: ["--prune-rate", str(rate), "--no-fix-attn", "--init-score",  # noqa: E731
                             "weight_magnitude_with_scale", "--lr", ROUTE_LR]
        cells = [pool.submit(train_cell, out, lang, "prune", seed, args(rate), max(1, 2 // jobs), init=ft_ckpt,
                             tag=f"-{rate}") for rate in rates]
        for cell in cells:
            cell.result()
    return curve_rows(out, lang, seed, rates)


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
                          "--plot", ROOT / "bench" / "results" / f"miniature_similarity_{method}.png"),
               out / "similarity.log", 2)
    result = json.loads(res_path.read_text())
    result["method"] = method
    result["seed_control"] = seed_control(out, have, method)
    res_path.write_text(json.dumps(result, indent=1))
    return result


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
    """The pruning curve from its cached cells: every point that has finished (all of them after run_curve)."""
    ft = cell_result(out, lang, f"ft-s{seed}")
    if ft is None:
        return None
    rows = [{"method": "finetuned (dense)", "prune_rate": 1.0, "sparsity": 0.0, "per": ft["per"]}]
    for rate in rates:
        test = out / "cells" / lang / f"omp-{rate}-s{seed}" / "test.json"
        if test.exists():
            rows.append({"method": "OMP", "prune_rate": rate, "sparsity": round(1 - rate, 2),
                         "per": json.loads(test.read_text())["per"]})
    for rate in rates:
        if r := cell_result(out, lang, f"prune-{rate}-s{seed}"):
            rows.append({"method": "S3-Router pruning", "prune_rate": rate, "sparsity": round(1 - rate, 2),
                         "per": r["per"]})
    return {"lang": lang, "seed": seed, "rows": rows}


COLLAPSED = 0.9  # a run whose test PER is above this emits (almost) only blanks: CTC training collapsed


def per_cell(pers: list[float]) -> str:
    """'81.6 ±1.2' (mean ± half the range over seeds, in %), or '81.6 (1)' for a single seed."""
    mean = 100 * sum(pers) / len(pers)
    return f"{mean:.1f} ±{50 * (max(pers) - min(pers)):.1f}" if len(pers) > 1 else f"{mean:.1f} (1)"


def report(out: Path, a):
    """bench/results/miniature.json + miniature.md (+ PNG plots): whatever has finished so far."""
    import statistics

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*/*/result.json"))]
    grid = [c for c in cells if c["method"] in METHODS]
    table = {}
    for c in grid:
        table.setdefault(c["lang"], {}).setdefault(c["method"], []).append(c["per"])
    langs = [lg for lg in a.langs if lg in table]
    methods = [m for m in METHODS if any(m in table[lg] for lg in langs)]
    mean = {lg: {m: statistics.mean(v) for m, v in table[lg].items()} for lg in langs}
    backbone_report = out / "backbone" / "report.json"
    bb = json.loads(backbone_report.read_text()) if backbone_report.exists() else {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    cpu_min = sum(c["train_cpu_s"] for c in cells) / 60
    bundle = json.loads((out / "bundle.json").read_text()) if (out / "bundle.json").exists() else None
    curve = curve_rows(out)
    sims = [json.loads(p.read_text()) for m in SIMILARITY_METHODS if (p := out / f"similarity-{m}.json").exists()]
    summary = {"command": "python -m tools.miniature", "commit": commit, "cells": cells, "per_mean": mean,
               "seeds": {lg: {m: len(v) for m, v in table[lg].items()} for lg in langs},
               "cell_cpu_minutes": round(cpu_min, 1), "backbone": {k: v for k, v in bb.items() if k != "vocab"},
               "bundle": bundle, "curve": curve,
               "similarity": [{k: v for k, v in sim.items() if k in ("method", "names", "reference", "seed_control")}
                              | {"pairs": [{"a": p["a"], "b": p["b"], **p["overall"]} for p in sim["pairs"]]}
                              for sim in sims]}
    (results / "miniature.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")

    corpus_s = sum(json.loads(d.read_text())["seconds_to_make"]
                   for d in (corpus_root(out) / RELEASE).glob("*/DONE"))
    md = ["# The miniature: S3-Router on synthetic multilingual speech, CPU scale", "",
          f"Regenerate: `python -m tools.miniature` (resumable; cells cached under runs/miniature/cells). "
          f"Commit {commit}. "
          f"Cost on the 2-core development machine: corpus {corpus_s / 60:.0f} min wall"
          + (f", backbone {bb.get('train_cpu_minutes')} min of training steps" if bb else "")
          + f", {cpu_min:.0f} CPU minutes of finetuning and evaluation cells (two side by side, one thread each).", "",
          f"Status: {len(grid)} of {len(a.langs) * len(a.methods) * len(a.seeds)} application-1 cells finished "
          f"({', '.join(a.langs)} x {', '.join(a.methods)} x seeds {', '.join(map(str, a.seeds))}); rerunning the "
          "command continues where it stopped.", "",
          "Speech: espeak-ng reading Debian-packaged text (tools/text_sources.py), CommonVoice layout, ~5 minutes of "
          "training speech per held-out language; targets are the espeak-ng phone transcripts, scored by phone error "
          "rate (PER, %, greedy CTC, test split). Backbone: "
          f"{bb.get('params', 0) / 1e6:.2f}M-parameter pre-LN wav2vec 2.0 trained with SUPERVISED phone CTC plus "
          f"HuBERT-style MFCC k-means unit prediction on {', '.join(text_sources.PRETRAIN)} "
          f"({bb.get('train_audio_minutes', 0) / 60:.1f} h of speech, {bb.get('updates')} updates, held-in PER "
          f"{100 * bb.get('per', float('nan')):.1f}%): a stand-in for self-supervised pretraining, which two CPU cores "
          "cannot do. The held-out languages below were never seen by it.", "",
          "Caveats: every method gets the same recipe (200 updates of 10 s of audio, tri-stage schedule) with its "
          f"own peak lr, the better of 3e-3 and 1e-2 on the built-in demo corpus (ft {FT_LR}, the others {ROUTE_LR}); "
          "in the pruning curve, S3-Router pruning trains scores and head for 200 more updates on top of the finetuned "
          "model while OMP (as upstream's baseline) does no retraining; "
          "the espeak-ng voices are far more regular than real speakers, so absolute PERs say little about real "
          "speech, only the comparisons between methods do.", ""]
    if langs:
        md += ["## Application 1: PER (%) per held-out language, mean over seeds", "",
               "| language | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for lg in langs:
            cells_md = (per_cell(table[lg][m]) if m in table[lg] else "-" for m in methods)
            md.append(f"| {lg} | " + " | ".join(cells_md) + " |")
        full = [lg for lg in langs if all(m in mean[lg] for m in methods)]
        if full:
            md.append(f"| mean of {len(full)} | " + " | ".join(
                f"{100 * statistics.mean(mean[lg][m] for lg in full):.1f}"
                                                          for m in methods) + " |")
            md.append(f"| runs that collapsed (PER > {100 * COLLAPSED:.0f}%) | " + " | ".join(
                str(sum(p > COLLAPSED for lg in full for p in table[lg][m])) for m in methods) + " |")
        md += ["", "Mean over seeds ± half their range; (1) = one seed finished so far. head: frozen encoder, CTC head "
               "only; ft: standard weight finetuning; s3r-R: S3-Router keeping fraction R of attention+FFN weights; "
               "-fa: --fix-attn (FFN only routed).", "",
               "![PER per language](miniature_per.png)", ""]
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
        ar = bundle["arithmetic"]["fp32"]
        md += ["## Application 2: all routes in one bundle", "",
               f"{len(bundle['languages'])} languages ({', '.join(bundle['languages'])}), {bundle['method']} routes: "
               f"bundle file {bundle['bundle_bytes']:,} B vs {bundle['separate_finetuned_bytes']:,} B for the "
               f"separately "
               f"finetuned models ({bundle['file_change_percent']:+.1f}%). Arithmetic (fp32): "
               f"{ar['shared_plus_routes_bytes']:,} B vs {ar['dense_models_bytes']:,} B "
               f"({ar['change_percent']:+.1f}%).", ""]
    if curve:
        md += [f"## Application 3: pruning curve ({curve['lang']})", "", "| method | sparsity | PER (%) |",
               "|---|---|---|"]
        md += [f"| {r['method']} | {100 * r['sparsity']:.0f}% | {100 * r['per']:.1f} |" for r in curve["rows"]]
        md += ["", "![pruning curve](miniature_pruning.png)", ""]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for m in ("OMP", "S3-Router pruning"):
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
        md += ["## Application 4: mask similarity vs phoneme-inventory similarity", "",
               f"The seed-1 masks of {len(sims[0]['names'])} languages ({len(sims[0]['pairs'])} pairs) against the "
               "cosine similarity of the languages' phone inventories (from their phone transcripts). Control: the "
               "same language learned from two seeds, against two languages learned from the same seed (pruned "
               "sets; seeds 1 and 2).", "",
               "| routes | mask similarity | mean over pairs | random masks | Pearson | Spearman | same language, "
               "two seeds | two languages |", "|---|---|---|---|---|---|---|---|"]
        for sim in sims:
            r, c = sim["reference"], sim.get("seed_control") or {}
            avg = lambda key, sim=sim: statistics.mean(p["overall"][key] for p in sim["pairs"])  # noqa: E731  one-liner used 4 times below
            md += [f"| {sim['method']} | cosine, kept sets (upstream's measure) | {avg('cosine'):.4f} | "
                   f"{avg('cosine_random'):.4f} | {r['cosine']['pearson']:.2f} | {r['cosine']['spearman']:.2f} | | |",
                   f"| {sim['method']} | cosine, pruned sets | {avg('pruned_cosine'):.4f} | "
                   f"{avg('pruned_cosine_random'):.4f} | {r['pruned_cosine']['pearson']:.2f} | "
                   f"{r['pruned_cosine']['spearman']:.2f} | {c.get('same_language_two_seeds', float('nan')):.4f} | "
                   f"{c.get('two_languages_same_seed', float('nan')):.4f} |"]
        md += [""] + [f"![similarity, {sim['method']}](miniature_similarity_{sim['method']}.png)"
                      for sim in sims] + [""]
    (results / "miniature.md").write_text("\n".join(md) + "\n")
    log(f"report: {len(cells)} cells -> {results / 'miniature.md'}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", default="all")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--langs", nargs="*", default=GRID_LANGS[:6], help="held-out languages of the grid, in order "
                   f"(default: the first six of {', '.join(GRID_LANGS)})")
    p.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, help=f"subset of {', '.join(METHODS)}")
    p.add_argument("--seeds", nargs="*", type=int, default=SEEDS)
    p.add_argument("--jobs", type=int, default=2, help="cells trained side by side (one thread each with 2)")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.stage in ("corpus", "all"):
        make_corpus(out, text_sources.PRETRAIN + text_sources.HELD_OUT)
    if a.stage in ("demo", "all"):
        make_demo(out)
    if a.stage in ("backbone", "all") and not BACKBONE.exists():
        run_logged(python_cmd("-m", "tools.pretrain_backbone", "--data-root", corpus_root(out),
                              "--out", out / "backbone",
                              "--save", BACKBONE), out / "backbone.log", 2)
    if a.stage in ("grid", "all"):
        run_grid(out, a.langs, a.methods, a.seeds, a.jobs)
    if a.stage in ("bundle", "all"):
        run_bundle(out, a.langs)
    if a.stage in ("curve", "all"):
        run_curve(out, jobs=a.jobs)
    if a.stage in ("similarity", "all"):
        for method in SIMILARITY_METHODS:
            run_similarity(out, a.langs, method)
    if a.stage in ("report", "all"):
        report(out, a)


if __name__ == "__main__":
    main()
