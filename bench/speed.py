"""s3r against transformers' and torchaudio's wav2vec2: same weights, same padded batch, same work, as ratios.

    python -m bench.speed              # from the repo root: the full run quoted in the README (~20 min, 2 cores)
    python -m bench.speed --quick      # 1 layer, a small batch, base only: under 2 minutes, a smoke test
    python -m bench.speed --device cuda --dtype bfloat16 --layers 12 --configs base   # see bench/gpu.sh

Per config (a base-like and a large-like encoder; on CPU fewer layers than the real 12 / 24):
  ft     one weight-finetuning step: feature extractor frozen (fairseq feature_grad_mult 0), CTC loss, backward,
         Adam over everything else, zero_grad. transformers and torchaudio do exactly the same.
  route  one S3-Router step (s3r only): prune_rate 0.9 with attention masked too (fix_attn off), Adam over scores
         + CTC head, then model.refresh_masks() as train.py does. s3r runs its speed paths (s3r/fast.py) unless
         S3R_REFERENCE=1 is set, which times the plain reference instead.
  eval   one forward under torch.no_grad (model.eval()).
  memory peak resident memory of two steps above the process with the model loaded (so it counts the optimizer
         state, activations, gradients and any cache), each implementation and mode in a fresh subprocess:
         glibc returns every allocation above 64 KiB to the OS when freed (MALLOC_MMAP_THRESHOLD_), malloc_trim,
         the peak RSS counter is reset (/proc/self/clear_refs), two steps run, VmHWM - VmRSS(before) is read.
         On CUDA: torch.cuda.max_memory_allocated above the allocation before the first step.
Every implementation is built from one transformers checkpoint (save_pretrained -> s3r.load_pretrained,
torchaudio's import_huggingface_model) and runs in the same dtype and thread count on the same inputs with the
same dropout rates; LayerDrop and SpecAugment are off so that each step does the same, deterministic amount of
work (torchaudio has no SpecAugment). Runs are interleaved (in a fresh random order every round) and the table
gives the median over rounds of the per-round ratios. On CPU the targets are judged on CPU time
(time.process_time of the process, page faults included) with one torch thread: on a machine shared with other
jobs that is what a step costs, while wall time also counts the waits for a core (both are reported).
Also: data loading (s3r.data.make_loader, 2 workers, over a synthetic FLAC corpus) against the audio the
fastest s3r training step consumes (wall time), and a 2-process gloo DDP S3-Router step against one process.
Writes bench/results/speed.md and speed.json (or --out).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import cpu_peak_mib, describe_machine, run_memory_worker

REPO = Path(__file__).resolve().parent.parent

VOCAB = 32
# transformers config fields of the two encoder shapes (the extractor and positional conv are full size)
CONFIGS = {
    "base": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, feat_extract_norm="group",
                 conv_bias=False, do_stable_layer_norm=False),
    "large": dict(hidden_size=1024, num_attention_heads=16, intermediate_size=4096, feat_extract_norm="layer",
                  conv_bias=True, do_stable_layer_norm=True),
}
COMMON = dict(vocab_size=VOCAB, hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
              feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, mask_feature_prob=0.0,
              ctc_loss_reduction="sum", ctc_zero_infinity=True)
PRUNE_RATE = 0.9
TARGETS = {  # (measure, max ratio): what s3r promises against its peers
    "ft s3r/transformers": 0.90, "eval s3r/transformers": 0.90, "memory ft s3r/transformers": 1.0,
    "memory eval s3r/transformers": 1.0, "route/ft s3r": 1.10,
}


# ------------------------------------------------------------------------------------------------ models


def save_hf_checkpoint(name: str, layers: int, folder: Path) -> Path:
    """A randomly initialised transformers Wav2Vec2ForCTC, saved once; every implementation loads these weights."""
    from transformers import Wav2Vec2Config as HFConfig
    from transformers import Wav2Vec2ForCTC as HFModel
    torch.manual_seed(0)
    model = HFModel(HFConfig(num_hidden_layers=layers, **CONFIGS[name], **COMMON))
    path = folder / f"{name}-{layers}"
    model.save_pretrained(path)
    return path


class Runner:
    """One implementation behind a common call: forward(wav, lengths) -> (logits (B, T, V), out_lengths (B,))."""

    def __init__(self, impl: str, mode: str, path: Path, device: str, dtype: torch.dtype):
        self.impl, self.mode, self.device, self.dtype = impl, mode, device, dtype
        if impl == "s3r":
            from s3r import load_pretrained
            model = load_pretrained(path)
            if mode == "route":
                from s3r import RouteConfig
                # attention and FFN routed (the heavier setting; upstream README's command fixes attention)
                model.route(RouteConfig(prune_rate=PRUNE_RATE, init_score="kaiming_uniform", fix_attn=False))
            else:
                model.freeze_feature_encoder()
        else:
            from transformers import Wav2Vec2ForCTC as HFModel
            model = HFModel.from_pretrained(path, attn_implementation="sdpa")
            model.freeze_feature_encoder()
            if impl == "torchaudio":
                from torchaudio.models.wav2vec2.utils import import_huggingface_model
                model = import_huggingface_model(model)
                model.feature_extractor.requires_grad_(False)
        self.model = model.to(device)
        self.train = mode in ("ft", "route")
        self.model.train(self.train)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=5e-5, betas=(0.9, 0.98), eps=1e-8) if self.train else None

    def forward(self, wav, lengths):
        if self.impl == "s3r":
            return self.model(wav, lengths)
        if self.impl == "torchaudio":
            return self.model(wav, lengths)
        mask = (torch.arange(wav.shape[1], device=wav.device)[None, :] < lengths[:, None]).long()
        logits = self.model(wav, attention_mask=mask).logits
        return logits, self.model._get_feat_extract_output_lengths(lengths)

    def step(self, batch):
        wav, lengths = batch["wav"], batch["lengths"]
        autocast = (torch.autocast(self.device, dtype=self.dtype) if self.dtype != torch.float32
                    else contextlib.nullcontext())
        if not self.train:
            with torch.no_grad(), autocast:
                return self.forward(wav, lengths)[0]
        with autocast:
            logits, out_lengths = self.forward(wav, lengths)
        log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (T, B, V)
        loss = F.ctc_loss(log_probs, batch["targets"], out_lengths, batch["target_lengths"], blank=0,
                          reduction="sum", zero_infinity=True)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.impl == "s3r" and self.mode == "route":
            getattr(self.model, "module", self.model).refresh_masks()  # the scores moved (DDP wraps the model)
        return loss


def make_batch(seconds: list[float], device: str, seed: int = 0) -> dict:
    """Zero-padded noise 'utterances' of the given durations with random CTC targets (about 15 units a second)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([int(s * 16000) for s in seconds])
    wav = torch.randn(len(seconds), int(lengths.max()), generator=g) * 0.1
    wav *= torch.arange(wav.shape[1])[None, :] < lengths[:, None]
    target_lengths = torch.tensor([int(s * 15) for s in seconds])
    targets = torch.randint(1, VOCAB, (len(seconds), int(target_lengths.max())), generator=g)
    return {"wav": wav.to(device), "lengths": lengths.to(device), "targets": targets.to(device),
            "target_lengths": target_lengths.to(device)}


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ timing


RUNS = [("s3r", "ft"), ("transformers", "ft"), ("torchaudio", "ft"), ("s3r", "route"),
        ("s3r", "eval"), ("transformers", "eval"), ("torchaudio", "eval")]
RATIOS = [  # (label, numerator run, denominator run)
    ("ft s3r/transformers", ("s3r", "ft"), ("transformers", "ft")),
    ("ft s3r/torchaudio", ("s3r", "ft"), ("torchaudio", "ft")),
    ("eval s3r/transformers", ("s3r", "eval"), ("transformers", "eval")),
    ("eval s3r/torchaudio", ("s3r", "eval"), ("torchaudio", "eval")),
    ("route/ft s3r", ("s3r", "route"), ("s3r", "ft")),
]


def time_config(path: Path, batch: dict, rounds: int, device: str, dtype, runs=RUNS, log=print) -> dict:
    """Seconds of every run in every round, interleaved in a fresh random order each round (after one warm-up).

    Returns {"cpu": {run: [...]}, "wall": {run: [...]}}. CPU time (time.process_time: every thread of this process,
    page faults included) is what a step costs whatever else the machine runs; wall time is what it takes here.
    """
    runners = {run: Runner(*run, path, device, dtype) for run in runs}
    times = {"cpu": {run: [] for run in runs}, "wall": {run: [] for run in runs}}
    cuda_peak = {run: 0 for run in runs}  # on CUDA: peak allocation of rounds 0 and 1 above the one before the step
    order = list(runs)
    rng = random.Random(0)
    for r in range(rounds + 1):
        rng.shuffle(order)
        for run in order:
            torch.manual_seed(r)  # the same dropout draws for every implementation in a round
            sync(device)
            if device == "cuda" and r < 2:
                torch.cuda.reset_peak_memory_stats()
                rest = torch.cuda.memory_allocated()
            t0, c0 = time.perf_counter(), time.process_time()
            runners[run].step(batch)
            sync(device)
            if r > 0:  # round 0 warms up allocators, oneDNN primitives and the optimizer state
                times["wall"][run].append(time.perf_counter() - t0)
                times["cpu"][run].append(time.process_time() - c0)
            if device == "cuda" and r < 2:
                cuda_peak[run] = max(cuda_peak[run], torch.cuda.max_memory_allocated() - rest)
        if r > 0:
            clock = "cpu" if device == "cpu" else "wall"
            log(f"  round {r} ({clock} s): " + ", ".join(f"{i} {m} {times[clock][(i, m)][-1]:.3f}" for i, m in runs))
    times = {clock: {f"{i} {m}": t for (i, m), t in per_run.items()} for clock, per_run in times.items()}
    memory = {f"{i} {m}": {"peak_mib": v / 2**20} for (i, m), v in cuda_peak.items()} if device == "cuda" else None
    return times, memory


def count_flops(path: Path, batch: dict, mode: str, device: str, dtype) -> float:
    """FLOPs of one s3r step (forward and backward, as torch.utils.flop_counter counts matmuls, convs, attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    runner = Runner("s3r", mode, path, device, dtype)
    runner.step(batch)
    with FlopCounterMode(display=False) as counter:
        runner.step(batch)
    return float(counter.get_total_flops())


def matmul_tflops(device: str, dtype, reps: int = 10) -> float:
    """What one large matrix product reaches here: the practical ceiling MFU is also quoted against."""
    n = 8192 if device == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0}  # dense bf16 datasheet figures


def ratio_stats(num: list[float], den: list[float]) -> dict:
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "n": len(ratios)}


# ------------------------------------------------------------------------------------------------ memory


def memory_worker(spec: dict) -> dict:
    """Peak memory of one step (run in a fresh process): bytes above the resting process, see the docstring."""
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    torch.set_num_threads(spec["threads"])
    runner = Runner(spec["impl"], spec["mode"], Path(spec["path"]), device, dtype)
    batch = make_batch(spec["seconds"], device)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        rest = torch.cuda.memory_allocated()
        for _ in range(2):
            runner.step(batch)
        torch.cuda.synchronize()
        return {"rest_mib": rest / 2**20, "peak_mib": (torch.cuda.max_memory_allocated() - rest) / 2**20}

    def two_steps():  # the first step also allocates the optimizer state and any cache (masks, weights)
        for _ in range(2):
            runner.step(batch)
    rest, peak = cpu_peak_mib(two_steps)
    return {"rest_mib": rest, "peak_mib": peak}


def measure_memory(path: Path, seconds, runs, args) -> dict:
    out = {}
    for impl, mode in runs:
        spec = dict(impl=impl, mode=mode, path=str(path), seconds=seconds, device=args.device, dtype=args.dtype,
                    threads=args.threads)
        out[f"{impl} {mode}"] = run_memory_worker("bench.speed", spec, f"{impl} {mode}", cwd=REPO)
    return out


# ------------------------------------------------------------------------------------------------ data loading


def measure_data(step_audio_s_per_s: float, num: int, repeat: int = 10, log=print) -> dict:
    """s3r.data.make_loader over a synthetic LibriSpeech-layout FLAC corpus, against the step's audio rate."""
    from s3r.data import make_loader, resolve_corpus
    from tools.synth_corpus import SENTENCES, synth_corpus  # run from the repo root: python -m bench.speed
    with tempfile.TemporaryDirectory() as root:
        synth_corpus(Path(root), "librispeech", num=num, workers=2, split="train-clean-100", texts=SENTENCES)
        os.environ.setdefault("S3R_CACHE", str(Path(root) / "cache"))
        corpus = resolve_corpus("train-clean-100", root)
        from s3r.text import Vocabulary
        vocab = Vocabulary.build([u.text for u in corpus.utterances], units="letter")
        utterances = corpus.utterances * repeat  # an epoch long enough to time; the files stay in the page cache
        result = {"files": len(corpus.utterances), "utterances": len(utterances),
                  "audio_s": sum(u.seconds for u in utterances)}
        for workers in (0, 2):
            loader = make_loader(utterances, vocab, max_tokens=16000 * 20, num_workers=workers)
            batches = iter(loader)
            next(batches)  # start the workers outside the timing
            t0 = time.perf_counter()
            seen = sum(float(b["lengths"].sum()) / 16000 for b in batches)
            rate = seen / (time.perf_counter() - t0)
            result[f"workers_{workers}_audio_s_per_s"] = rate
            log(f"  data loader, {workers} workers: {rate:.0f} s of audio per second")
    result["step_audio_s_per_s"] = step_audio_s_per_s
    result["ratio"] = result["workers_2_audio_s_per_s"] / step_audio_s_per_s
    return result


# ------------------------------------------------------------------------------------------------ DDP


def _ddp_worker(rank: int, world: int, path: str, seconds, steps: int, threads: int, port: int, out: str):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    runner = Runner("s3r", "route", Path(path), "cpu", torch.float32)
    if world > 1:
        runner.model = DDP(runner.model)
    runner.impl = "s3r"
    batch = make_batch(seconds, "cpu", seed=rank)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        runner.step(batch)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(json.dumps(times[1:]))
    if world > 1:
        del runner  # DDP and its optimizer must go before the process group, or gloo aborts at exit
        gc.collect()
        dist.destroy_process_group()


def measure_ddp(path: Path, seconds, rounds: int, steps: int, log=print) -> dict:
    """Median S3-Router step of 2 gloo processes (1 thread each, one batch each) vs 1 process with 2 threads."""
    import torch.multiprocessing as mp
    single, ddp = [], []
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times.json")
        for r in range(rounds):
            for world in ((1, 2) if r % 2 == 0 else (2, 1)):
                threads = 2 if world == 1 else 1
                port = 29500 + random.Random().randrange(1000)
                mp.spawn(_ddp_worker, args=(world, str(path), seconds, steps, threads, port, out), nprocs=world)
                t = statistics.median(json.loads(Path(out).read_text()))
                (single if world == 1 else ddp).append(t)
                log(f"  DDP round {r + 1}: {world} process(es): {t:.2f}s per step")
    ratios = [d / s for d, s in zip(ddp, single, strict=True)]
    return {"single_s": single, "ddp_s": ddp, "step_ratio": statistics.median(ratios),
            "throughput_ratio": statistics.median(2 / x for x in ratios)}


# ------------------------------------------------------------------------------------------------ report


def markdown(result: dict) -> str:
    clock = result["clock"]
    lines = [f"Machine: {result['machine']}. Batch: {len(result['seconds'])} utterances of "
             f"{', '.join(f'{s:g}' for s in result['seconds'])} s, zero-padded. {result['rounds']} interleaved "
             f"rounds; ratio = median of the per-round ratios [min-max], lower is better for s3r; targets are judged "
             f"on {clock} time.", "",
             f"Command: `{result['command']}`." + (f" {result['note']}" if result.get("note") else ""), "",
             f"| config | measure | s3r | peer | ratio, {clock} time | ratio, {'wall' if clock == 'cpu' else 'cpu'} "
             f"time | target | met |", "|---|---|---|---|---|---|---|---|"]
    other = "wall" if clock == "cpu" else "cpu"
    for name, cfg in result["configs"].items():
        t = cfg["times"][clock]
        for label, num, den in RATIOS:
            a, b = " ".join(num), " ".join(den)
            if label not in cfg["ratios"][clock]:
                continue
            s, w = cfg["ratios"][clock][label], cfg["ratios"][other][label]
            target = TARGETS.get(label)
            met = "" if target is None else ("yes" if s["median"] <= target else "**no**")
            lines.append(f"| {name} {cfg['layers']}L | {label} (step, s) | {statistics.median(t[a]):.2f} | "
                         f"{statistics.median(t[b]):.2f} | {s['median']:.3f} [{s['min']:.2f}-{s['max']:.2f}] | "
                         f"{w['median']:.3f} | {f'<= {target:.2f}' if target else ''} | {met} |")
        m = cfg.get("memory", {})
        for label, (a, b) in (("memory ft s3r/transformers", ("s3r ft", "transformers ft")),
                              ("memory eval s3r/transformers", ("s3r eval", "transformers eval")),
                              ("memory route/ft s3r", ("s3r route", "s3r ft"))):
            if a in m and b in m:
                r = m[a]["peak_mib"] / m[b]["peak_mib"]
                target = TARGETS.get(label)
                met = "" if target is None else ("yes" if r <= target else "**no**")
                lines.append(f"| {name} {cfg['layers']}L | {label} (peak MiB) | {m[a]['peak_mib']:.0f} | "
                             f"{m[b]['peak_mib']:.0f} | {r:.3f} | | {f'<= {target:.2f}' if target else ''} | {met} |")
    if "data" in result:
        d = result["data"]
        lines.append(f"| {d['config']} | data loading (2 workers) / training step, audio s per wall s | "
                     f"{d['workers_2_audio_s_per_s']:.0f} | {d['step_audio_s_per_s']:.1f} | {d['ratio']:.1f}x | | "
                     f">= 5x | {'yes' if d['ratio'] >= 5 else '**no**'} |")
    if "ddp" in result:
        d = result["ddp"]
        lines.append(f"| {d['config']} | 2-process gloo DDP route step (1 thread each) / 1 process (2 threads), wall | "
                     f"{statistics.median(d['ddp_s']):.2f} | {statistics.median(d['single_s']):.2f} | "
                     f"{d['step_ratio']:.3f} (throughput x{d['throughput_ratio']:.2f}) | | | |")
    for name, cfg in result["configs"].items():
        if "mfu" in cfg:
            f = cfg["mfu"]
            lines += ["", f"Model FLOP utilization, {name} {cfg['layers']}L (FLOPs counted by torch.utils.flop_counter "
                      f"on s3r's own step; peak {f['peak_tflops']} TFLOP/s; one large matmul reaches "
                      f"{f['matmul_tflops']:.0f} here):", "",
                      "| step | TFLOP | TFLOP/s | MFU | of the matmul |", "|---|---|---|---|---|"]
            for mode in ("ft", "route"):
                m = f[mode]
                mfu = f"{100 * m['mfu']:.1f}%" if m["mfu"] else "?"
                lines.append(f"| s3r {mode} | {m['flops'] / 1e12:.2f} | {m['tflops']:.1f} | {mfu} | "
                             f"{100 * m['of_matmul']:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="base only, 1 layer, small batch, 3 rounds: under 2 minutes")
    p.add_argument("--configs", default=None, help="default base,large (quick: base)")
    p.add_argument("--layers", type=int, default=None, help="transformer layers (default 4, quick 1)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, quick 3)")
    p.add_argument("--seconds", default=None, help="utterance durations, comma separated (default 5,4.3,3.6,3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the timed steps (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype")
    p.add_argument("--clock", choices=["cpu", "wall"], default=None,
                   help="which time the targets are judged on (default: cpu on CPU, wall on CUDA)")
    p.add_argument("--impls", default="s3r,transformers,torchaudio")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-data", action="store_true")
    p.add_argument("--skip-ddp", action="store_true")
    p.add_argument("--mfu", action="store_true", help="s3r's model FLOP utilization of the first config's steps")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak (default: a table by name)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for speed.md and speed.json")
    p.add_argument("--note", default="", help="a line for the results (what else ran on the machine, say)")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return 0
    torch.set_num_threads(args.threads)
    clock = args.clock or ("cpu" if args.device == "cpu" else "wall")
    configs = (args.configs or ("base" if args.quick else "base,large")).split(",")
    layers = args.layers or (1 if args.quick else 4)
    rounds = args.rounds or (3 if args.quick else 7)
    seconds = [float(s) for s in args.seconds.split(",")] if args.seconds else \
        ([2.0, 1.5] if args.quick else [5.0, 4.3, 3.6, 3.0])
    impls = args.impls.split(",")
    runs = [run for run in RUNS if run[0] in impls]
    dtype = getattr(torch, args.dtype)
    given = argv if argv is not None else sys.argv[1:]
    shown = [a for i, a in enumerate(given) if not (a.startswith("--note") or (i and given[i - 1] == "--note"))]
    result = {"machine": describe_machine(args), "command": " ".join(["python -m bench.speed", *shown]),
              "note": args.note, "seconds": seconds,
              "rounds": rounds, "clock": clock, "configs": {}}
    print(result["machine"])
    with tempfile.TemporaryDirectory() as tmp:
        for name in configs:
            path = save_hf_checkpoint(name, layers, Path(tmp))
            print(f"{name}, {layers} layers:")
            batch = make_batch(seconds, args.device)
            times, cuda_memory = time_config(path, batch, rounds, args.device, dtype, runs)
            cfg = {"layers": layers, "times": times, "ratios": {c: {} for c in times}}
            for c, per_run in times.items():
                for label, num, den in RATIOS:
                    if " ".join(num) in per_run and " ".join(den) in per_run:
                        cfg["ratios"][c][label] = ratio_stats(per_run[" ".join(num)], per_run[" ".join(den)])
            if cuda_memory is not None:
                cfg["memory"] = cuda_memory
            elif not args.skip_memory:
                mem_runs = [run for run in runs if run[0] != "torchaudio"]
                if args.quick:
                    mem_runs = [run for run in mem_runs if run[1] == "ft"]
                cfg["memory"] = measure_memory(path, seconds, mem_runs, args)
                print("  peak MiB: " + ", ".join(f"{k} {v['peak_mib']:.0f}" for k, v in cfg["memory"].items()))
            if args.mfu and name == configs[0] and "s3r" in impls:
                name_gpu = torch.cuda.get_device_name() if args.device == "cuda" else ""
                peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name_gpu), None)
                cfg["mfu"] = {"peak_tflops": peak, "matmul_tflops": matmul_tflops(args.device, dtype)}
                for mode in ("ft", "route"):
                    flops = count_flops(path, batch, mode, args.device, dtype)
                    tflops = flops / statistics.median(times["wall"][f"s3r {mode}"]) / 1e12
                    cfg["mfu"][mode] = {"flops": flops, "tflops": tflops, "mfu": tflops / peak if peak else None,
                                        "of_matmul": tflops / cfg["mfu"]["matmul_tflops"]}
                    print(f"  s3r {mode} step: {flops / 1e12:.2f} TFLOP, {tflops:.1f} TFLOP/s" +
                          (f", MFU {tflops / peak:.1%} of {peak:g}" if peak else ""))
            result["configs"][name] = cfg
            if name == configs[0] and args.device == "cpu" and "s3r" in impls:
                # the fastest s3r training step sets the pace the loader must keep
                step_s = min(statistics.median(times["wall"][k]) for k in ("s3r ft", "s3r route"))
                if not args.skip_data:
                    result["data"] = {"config": f"{name} {layers}L",
                                      **measure_data(sum(seconds) / step_s, num=12 if args.quick else 40)}
                if not args.skip_ddp:
                    result["ddp"] = {"config": f"{name} {layers}L",
                                     **measure_ddp(path, seconds, rounds=1 if args.quick else 2, steps=2)}
    table = markdown(result)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.md").write_text(table)
    (out / "speed.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
