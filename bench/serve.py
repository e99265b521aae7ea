"""One bundle serving N routes against N separately loaded models: resident memory and throughput (application 2).

    nice -n 10 python -m bench.serve                      # demo and base sizes, N = 1, 4, 10; writes bench/results
    python -m bench.serve --sizes demo --routes 1 4 --rounds 2 --out /tmp/serve.md   # a smoke run

For each model size (demo: the committed 1.9M-parameter demo backbone; base: a random wav2vec2-base, 95M) and each
N, N routes are made with random scores (prune rate 0.9, attention and FFN, a 32-symbol CTC head each: speed and
memory do not depend on what a route learned) and serve a mixed stream of max(8, 4N) noise utterances, 1.5-3.5 s
long, whose routes take turns (route i % N for utterance i), through `s3r.transcribe` (audio read from wav files,
greedy decoding). Three ways to serve it:
  bundle    the N routes in one bundle, one model whose route is switched (`transcribe_files`)
  separate  N models, each its route's masks folded into a dense checkpoint (`python -m s3r.export --dense`), all
            loaded, each utterance to its own model
  one       one such dense model serving the whole stream as if it were all one language (the goal's reference)
in two modes: offline (the whole stream at once, grouped per route, 4 utterances a forward pass: one route switch
per route) and online (a request per utterance in stream order, one at a time: the bundle switches at every one).
Throughput is audio seconds per CPU second (time.process_time, one torch thread), in one process per (size, N) with
every variant loaded, the (way, mode) runs interleaved in a fresh random order every round; ratios against `one` in
the same mode are medians over rounds of per-round ratios. Memory is resident memory in a fresh process per way:
RSS after loading minus RSS before (the interpreter with torch and s3r imported and warmed up), and the peak while
serving the stream offline (VmHWM, reset first; glibc returning freed blocks to the OS, bench/common.py). "one model
+ N routes" is the goal's arithmetic: the fp32 parameters and buffers of one model plus N routes' bits and heads.
Writes bench/results/serve.md and serve.json (or --out).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from bench.common import describe_machine, run_memory_worker, status_kib
from s3r.checkpoint import architecture, load_pretrained, s3r_checkpoint, save_atomic
from s3r.compact import fold_masks
from s3r.model import Wav2Vec2ForCTC
from s3r.routes import make_bundle, route_from_model
from s3r.text import Vocabulary
from s3r.transcribe import Routes, transcribe_files

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "s3r" / "assets" / "demo" / "backbone.pt"
KINDS = ("bundle", "separate", "one")
MODES = ("offline", "online")
BATCH = 4  # utterances per forward pass offline
VOCAB = Vocabulary(["<s>", "<pad>", "</s>", "<unk>", "|", "'", *"abcdefghijklmnopqrstuvwxyz"])  # 32 symbols


# ------------------------------------------------------------------------------------------------ set-up


def make_assets(work: Path, size: str, routes: int) -> Path:
    """work/SIZE/: pretrained.pt, rI.route and dI.pt (route I folded into a dense checkpoint) for I < routes, made
    once and reused."""
    d = work / size
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "pretrained.pt").exists():
        if size == "demo":
            model = load_pretrained(DEMO)
        else:
            torch.manual_seed(0)
            model = Wav2Vec2ForCTC(architecture(size, vocab_size=0))
        save_atomic(s3r_checkpoint(model.float()), d / "pretrained.pt")
    for i in range(routes):
        if (d / f"d{i}.pt").exists():
            continue
        torch.manual_seed(100 + i)
        model = load_pretrained(d / "pretrained.pt", prune_rate=0.9, init_score="kaiming_uniform", fix_attn=False,
                                vocab_size=len(VOCAB))
        model.vocab = VOCAB
        save_atomic(route_from_model(model, f"r{i}"), d / f"r{i}.route")
        save_atomic(s3r_checkpoint(fold_masks(model)), d / f"d{i}.pt")
        print(f"  made {size} route {i}", file=sys.stderr, flush=True)
    return d


def make_bundle_file(d: Path, n: int) -> Path:
    path = d / f"bundle{n}.bundle"
    if not path.exists():
        save_atomic(make_bundle(d / "pretrained.pt", {f"r{i}": d / f"r{i}.route" for i in range(n)}), path)
    return path


def make_stream(work: Path, n: int, per_route: int = 4) -> list[tuple[str, str]]:
    """max(8, per_route * N) noise utterances of 1.5-3.5 s as wav files; utterance i belongs to route i % N."""
    d = work / "audio"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    stream = []
    for i in range(max(8, per_route * n)):
        path = d / f"n{n}_{i}.wav"
        audio = (0.1 * rng.standard_normal(int(16000 * rng.uniform(1.5, 3.5)))).astype(np.float32)  # drawn always
        if not path.exists() or sf.info(path).frames != len(audio):
            sf.write(path, audio, 16000)
        stream.append((str(path), f"r{i % n}"))
    return stream


def expected_mib(d: Path, n: int) -> float:
    """One model's fp32 parameters and buffers plus N routes as a bundle holds them (bits, heads, vocabulary)."""
    model = load_pretrained(d / "pretrained.pt")
    one = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    routes = 0
    for i in range(n):
        route = torch.load(d / f"r{i}.route", weights_only=True)
        routes += sum(e["bits"].numel() for e in route["layers"].values())
        routes += sum(t.numel() * t.element_size() for t in route["tensors"].values())
    return (one + routes) / 2**20


# ------------------------------------------------------------------------------------------------ serving


class Server:
    """The models of one variant, loaded: `serve(stream)` transcribes a stream of (path, route)."""

    def __init__(self, kind: str, d: Path, n: int):
        self.kind = kind
        if kind == "bundle":
            self.bundle = Routes(make_bundle_file(d, n))
        elif kind == "separate":
            self.models = {f"r{i}": Routes(d / f"d{i}.pt") for i in range(n)}
        else:
            self.one = Routes(d / "d0.pt")

    def serve(self, stream: list[tuple[str, str]], batch: int = 1, online: bool = False) -> list[str]:
        """Offline: the whole stream at once, grouped per route, `batch` utterances a forward pass. Online: one
        request per utterance, in stream order."""
        if online:
            return [self._serve([item], 1)[0] for item in stream]
        return self._serve(stream, batch)

    def _serve(self, stream, batch):
        if self.kind == "bundle":
            return [r.text for r in transcribe_files(self.bundle, stream, batch_size=batch)]
        if self.kind == "one":
            return [r.text for r in transcribe_files(self.one, [(p, None) for p, _ in stream], batch_size=batch)]
        texts = {}
        for route, routes in self.models.items():
            mine = [i for i, (_, r) in enumerate(stream) if r == route]
            for i, r in zip(mine, transcribe_files(routes, [(stream[i][0], None) for i in mine], batch_size=batch),
                            strict=True):
                texts[i] = r.text
        return [texts[i] for i in range(len(stream))]


def audio_seconds(stream) -> float:
    return sum(sf.info(p).duration for p, _ in stream)


def memory_worker(spec: dict) -> dict:
    """In a fresh process: resident MiB of loading one variant, and its peak while serving the stream."""
    torch.set_num_threads(1)
    d, n = Path(spec["dir"]), spec["n"]
    stream = [tuple(x) for x in spec["stream"]]
    Server("one", d, 1).serve(stream[:2], BATCH)  # warm-up: kernels and caches built lazily are not the way's
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status_kib("VmRSS")
    server = Server(spec["variant"], d, n)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    loaded = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    server.serve(stream, BATCH)
    peak = status_kib("VmHWM")
    return {"loaded_mib": (loaded - before) / 1024, "peak_mib": (peak - before) / 1024}


def throughput(d: Path, n: int, stream, rounds: int, seed: int) -> dict:
    """Audio seconds per CPU second of every (kind, mode), interleaved; per-round ratios against `one` in the same
    mode."""
    servers = {k: Server(k, d, n) for k in KINDS}
    audio = audio_seconds(stream)
    for server in servers.values():
        server.serve(stream[:2], BATCH)  # warm-up
    rng = random.Random(seed)
    runs = [(k, mode) for mode in MODES for k in KINDS]
    speeds = {f"{k} {mode}": [] for k, mode in runs}
    texts = {}
    for _ in range(rounds):
        rng.shuffle(runs)
        for k, mode in runs:
            t = time.process_time()
            texts[k, mode] = servers[k].serve(stream, BATCH, online=mode == "online")
            speeds[f"{k} {mode}"].append(audio / (time.process_time() - t))
    for mode in MODES:  # a route's masks and its folded dense model: the same transcripts
        if texts["bundle", mode] != texts["separate", mode]:
            raise RuntimeError(f"bundle and separate models disagree on the transcripts ({d.name}, N={n}, {mode})")
    ratios = {run: statistics.median(s / o for s, o in zip(speeds[run], speeds[f"one {run.split()[1]}"],
                                                            strict=True)) for run in speeds}
    return {"audio_s": audio, "speed": {run: statistics.median(s) for run, s in speeds.items()}, "ratio": ratios,
            "rounds": speeds}


def bench(args) -> dict:
    work = Path(args.work)
    results = {"machine": describe_machine(args), "rounds": args.rounds, "rows": []}
    for size in args.sizes:
        d = make_assets(work, size, max(args.routes))
        for n in args.routes:
            stream = make_stream(work, n, args.per_route)
            make_bundle_file(d, n)
            row = {"size": size, "n": n, "utterances": len(stream), "expected_mib": expected_mib(d, n),
                   "rounds_run": args.rounds}
            for v in ("bundle", "separate", "one"):
                spec = {"dir": str(d), "n": n, "variant": v, "stream": stream}
                row[f"memory_{v}"] = run_memory_worker("bench.serve", spec, f"{size} N={n} {v}", cwd=REPO)
            row.update(throughput(d, n, stream, args.rounds, seed=n))
            results["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return results


def report(results: dict) -> str:
    lines = ["# One bundle serving N routes vs N separately loaded models", "",
             "`nice -n 10 python -m bench.serve` (its docstring says what each way and mode does). "
             f"Machine: {results['machine']}. Throughput: medians of the interleaved rounds (a row's count below).",
             "The N = 1 rows' `N models` and `one model` are the same model doing the same work: their ratio shows "
             "the noise of the measurement.", "",
             "Resident memory, MiB above the process before loading (after loading / peak while serving):", "",
             "| size | N | one model + N routes | bundle | N separate models | bundle / separate | one model |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        b, s, o = r["memory_bundle"], r["memory_separate"], r["memory_one"]
        lines.append(f"| {r['size']} | {r['n']} | {r['expected_mib']:.1f} | {b['loaded_mib']:.1f} / "
                     f"{b['peak_mib']:.1f} | {s['loaded_mib']:.1f} / {s['peak_mib']:.1f} | "
                     f"{b['loaded_mib'] / s['loaded_mib']:.2f} | {o['loaded_mib']:.1f} / {o['peak_mib']:.1f} |")
    lines += ["", "Throughput, audio seconds per CPU second (in brackets: the ratio to one model serving the stream as "
              "if it were all one language, in the same mode). Offline: the whole stream at once, grouped per route, "
              f"{BATCH} utterances a forward pass; online: one request per utterance in stream order (the bundle "
              "switches route at every one):", "",
              "| size | N | utterances (audio s), rounds | bundle, offline | N models, offline | one model, offline | "
              "bundle, online | N models, online | one model, online |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        cells = [f"{r['speed'][f'{k} {m}']:.1f} ({r['ratio'][f'{k} {m}']:.2f})" for m in MODES for k in KINDS]
        rounds = r.get("rounds_run", results["rounds"])
        lines.append(f"| {r['size']} | {r['n']} | {r['utterances']} ({r['audio_s']:.0f}), {rounds} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["demo", "base"], choices=["demo", "base", "large"])
    p.add_argument("--routes", nargs="+", type=int, default=[1, 4, 10])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-route", type=int, default=4, help="utterances per route in the stream (at least 8 in all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=str(REPO / "runs" / "bench-serve"), help="models, routes and audio (reused)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "serve.md"))
    p.add_argument("--keep", action="store_true", help="keep the rows of other sizes from --out's JSON")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return
    args.device, args.dtype = "cpu", "float32"
    results = bench(args)
    out = Path(args.out)
    if args.keep and out.with_suffix(".json").exists():  # rows of the sizes not run now, from the last run
        old = json.loads(out.with_suffix(".json").read_text())["rows"]
        results["rows"] = [r for r in old if r["size"] not in args.sizes] + results["rows"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(results))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(report(results))


if __name__ == "__main__":
    main()
