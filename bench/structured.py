"""Structured routes, measured: a compact model (s3r/compact.py) against the dense model it came from.

    python -m bench.structured            # base (12 layers) and large (24) widths; the lead's run on a quiet machine
    python -m bench.structured --quick    # 1 layer, 2 s of audio, 2 rounds: a smoke test
    python -m bench.structured --device cuda --dtype bfloat16 --two-four   # see bench/gpu.sh
    python -m bench.structured --checkpoints FT.pt A.pt B.pt --json OUT.json  # given models against the first

For each width a random dense encoder is routed per FFN neuron (and per attention head) with random scores,
keeping 1.0 / 0.75 / 0.5 / 0.25 of every layer's neurons, with all heads or with 25% of them dropped, and
`compact()` cuts the dropped ones out. The 1.0 / all-heads variant is the control (same shapes as dense: its
ratio says how much of a difference is noise). Measured per variant, as ratios against the dense model:
  e2e      eval forward of the whole model (feature extractor, transformer, CTC head) under torch.no_grad
  layers   the transformer layers alone (model.encoder on (B, T, C) hidden states with the batch's padding)
  memory   peak memory of one forward of each, above the process with the model loaded. CPU: in a fresh process
           per run, VmHWM after resetting it through /proc/self/clear_refs, glibc returning freed blocks above
           64 KiB to the OS (MALLOC_MMAP_THRESHOLD_); CUDA: torch.cuda.max_memory_allocated in the timing rounds
`--two-four` adds a 2:4 route folded and swapped for torch's semi-structured sparse weights (CUDA fp16/bf16
only; elsewhere the run says it was skipped): the GPU speedup of n:m routes.
Runs are interleaved in a fresh random order every round; tables give the median over rounds of per-round ratios.
On CPU times are CPU time (time.process_time, one torch thread by default), as in bench/speed.py.
Writes bench/results/structured.md and structured.json (or --out).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import random
import statistics
import time
from pathlib import Path

import torch

from bench.common import cpu_peak_mib, describe_machine, run_memory_worker
from s3r.checkpoint import architecture
from s3r.compact import compact, fold_masks, parameter_counts, to_semi_structured
from s3r.model import RouteConfig, Wav2Vec2ForCTC

VOCAB = 32
LAYERS = {"base": 12, "large": 24}
NEURONS = (1.0, 0.75, 0.5, 0.25)
HEADS = (1.0, 0.75)
PARTS = ("e2e", "layers")


# ------------------------------------------------------------------------------------------------ models


def dense_model(width: str, layers: int) -> Wav2Vec2ForCTC:
    torch.manual_seed(0)
    return Wav2Vec2ForCTC(architecture(width, num_hidden_layers=layers, vocab_size=VOCAB)).eval()


def variant_model(dense: Wav2Vec2ForCTC, name: str, device: str, dtype: torch.dtype) -> Wav2Vec2ForCTC:
    """One variant on `device`: "dense", "neurons N heads H" (compact), or "2:4" (semi-structured where possible)."""
    if name == "dense":
        return copy.deepcopy(dense).to(device, dtype)
    model = copy.deepcopy(dense)
    if name == "2:4":
        model.route(RouteConfig(prune_rate=0.5, route_granularity="2:4", fix_attn=False, init_score="weight_rank"))
        small = compact(model).to(device, dtype)
        small.converted = to_semi_structured(small)  # after the move: the kernels exist for CUDA fp16/bf16 only
        return small
    neurons, heads = (float(v) for v in name.split()[1::2])
    torch.manual_seed(1)
    model.route(RouteConfig(prune_rate=neurons, route_granularity="neuron+head", fix_attn=False))
    for layer in model.encoder.layers:  # one prune rate per kind of group (upstream's fc_attn_prune_rate)
        layer.attention.out_proj.prune_rate = heads
    return compact(model).to(device, dtype)


def variant_names(two_four: bool) -> list[str]:
    return ["dense"] + [f"neurons {n} heads {h}" for h in HEADS for n in NEURONS] + ["2:4"] * two_four


def make_inputs(model: Wav2Vec2ForCTC, seconds: list[float], device: str, dtype: torch.dtype) -> dict:
    """A zero-padded noise batch, and hidden states of its frame shape with its padding mask for the layers alone."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([int(s * 16000) for s in seconds])
    wav = torch.randn(len(seconds), int(lengths.max()), generator=g) * 0.1
    wav *= torch.arange(wav.shape[1])[None, :] < lengths[:, None]
    frames = model.output_lengths(lengths)
    T = int(frames.max())
    hidden = torch.randn(len(seconds), T, model.config.hidden_size, generator=g)
    padding = torch.arange(T)[None, :] >= frames[:, None]  # (B, T)
    return {"wav": wav.to(device, dtype), "lengths": lengths.to(device), "hidden": hidden.to(device, dtype),
            "padding": padding.to(device) if bool(padding.any()) else None}


def run_part(model: Wav2Vec2ForCTC, part: str, inputs: dict):
    with torch.no_grad():
        if part == "e2e":
            return model(inputs["wav"], inputs["lengths"])
        return model.encoder(inputs["hidden"], inputs["padding"])


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ timing


def time_width(models: dict, inputs: dict, rounds: int, device: str, log=print) -> tuple[dict, dict | None]:
    """{part: {variant: [seconds per round]}}: every (variant, part) once per round, in a fresh random order.

    On CUDA also {variant: {part: peak MiB}}: max_memory_allocated above the allocation before each run.
    """
    runs = [(v, p) for v in models for p in PARTS]
    times = {p: {v: [] for v in models} for p in PARTS}
    peak = {v: dict.fromkeys(PARTS, 0.0) for v in models}
    rng = random.Random(0)
    clock = time.process_time if device == "cpu" else time.perf_counter
    for r in range(rounds + 1):  # round 0 warms up allocators and oneDNN / cuBLAS primitives
        rng.shuffle(runs)
        for variant, part in runs:
            sync(device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                rest = torch.cuda.memory_allocated()
            t0 = clock()
            run_part(models[variant], part, inputs)
            sync(device)
            if r > 0:
                times[part][variant].append(clock() - t0)
            if device == "cuda":
                peak[variant][part] = max(peak[variant][part], (torch.cuda.max_memory_allocated() - rest) / 2**20)
        if r > 0:
            log(f"  round {r}: " + ", ".join(f"{v} {p} {times[p][v][-1]:.3f}" for v, p in sorted(runs)))
    return times, (peak if device == "cuda" else None)


def ratio(num: list[float], den: list[float]) -> dict:
    per_round = [a / b for a, b in zip(num, den, strict=True)]
    return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round),
            "seconds": statistics.median(num)}


# ------------------------------------------------------------------------------------------------ memory


def memory_worker(spec: dict) -> dict:
    """Peak memory of one forward of one variant and part, above the process with its model loaded (fresh process)."""
    torch.set_num_threads(spec["threads"])
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    dense = dense_model(spec["width"], spec["layers"])
    model = variant_model(dense, spec["variant"], device, dtype)
    del dense
    inputs = make_inputs(model, spec["seconds"], device, dtype)
    gc.collect()
    _, peak = cpu_peak_mib(lambda: run_part(model, spec["part"], inputs))
    return {"peak_mib": peak}


def measure_memory(width: str, layers: int, variants: list[str], args) -> dict:
    out = {}
    for variant in variants:
        for part in PARTS:
            spec = dict(width=width, layers=layers, variant=variant, part=part, seconds=args.seconds,
                        device=args.device, dtype=args.dtype, threads=args.threads)
            out.setdefault(variant, {})[part] = run_memory_worker("bench.structured", spec,
                                                                  f"{width} {variant} {part}")["peak_mib"]
    return out


# ------------------------------------------------------------------------------------------------ report


def markdown(result: dict) -> str:
    clock = "CPU time" if result["device"] == "cpu" else "wall time"
    lines = [f"Machine: {result['machine']}. Batch: {len(result['seconds'])} utterances of "
             f"{', '.join(f'{s:g}' for s in result['seconds'])} s, zero-padded; {result['rounds']} interleaved rounds, "
             f"median of per-round ratios ({clock}); compact / dense, lower is better.", ""]
    for width, w in result["widths"].items():
        lines += [f"### {width} width, {w['layers']} layers (dense: e2e {w['dense_s']['e2e']:.3f} s, "
                  f"layers {w['dense_s']['layers']:.3f} s)", "",
                  "| variant | params (M) | FFN widths | heads | e2e time | layers time | e2e memory | layers memory |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, v in w["variants"].items():
            mem = v.get("memory_ratio") or {}
            cells = [name, f"{v['params'] / 1e6:.1f}", str(v["ffn_width"]), str(v["heads"]),
                     f"{v['time']['e2e']['median']:.3f}", f"{v['time']['layers']['median']:.3f}",
                     f"{mem['e2e']:.3f}" if mem else "-", f"{mem['layers']:.3f}" if mem else "-"]
            lines.append("| " + " | ".join(cells) + " |")
        if w.get("note"):
            lines += ["", w["note"]]
        lines.append("")
    return "\n".join(lines)


def time_checkpoints(paths: list[str], args) -> dict:
    """Eval-forward time of each checkpoint against the first (the dense reference, masks folded if routed), as
    deployed: neuron/head routes compacted, others folded; for the pruning curve's measured speedups."""
    from s3r import load_pretrained
    models = {}
    for path in paths:
        model = load_pretrained(path).eval()
        g = model.route_config.route_granularity if model.route_config is not None else ""
        if g:
            model = compact(model) if ("neuron" in g or "head" in g) and path != paths[0] else fold_masks(model)
        models[path] = model.to(args.device, getattr(torch, args.dtype))
    inputs = make_inputs(models[paths[0]], args.seconds, args.device, getattr(torch, args.dtype))
    times, _ = time_width(models, inputs, args.rounds, args.device, log=lambda _: None)
    return {path: {"params": parameter_counts(m)["total"],
                   **{p: ratio(times[p][path], times[p][paths[0]]) for p in PARTS}} for path, m in models.items()}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="base,large", help="comma-separated: base, large")
    p.add_argument("--layers", type=int, help="transformer layers (default: the real 12 / 24)")
    p.add_argument("--seconds", default="8,7,6,5", help="utterance durations of the batch")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--two-four", action="store_true", help="add the 2:4 semi-structured variant (CUDA fp16/bf16)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--quick", action="store_true", help="1 layer, 2 s of audio, 2 rounds")
    p.add_argument("--out", default="bench/results", help="folder for structured.md / structured.json")
    p.add_argument("--checkpoints", nargs="+", metavar="CKPT", help="time these models against the first instead")
    p.add_argument("--json", help="with --checkpoints: write the ratios here")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.seconds = [float(s) for s in args.seconds.split(",")]
    if args.checkpoints:
        torch.set_num_threads(args.threads)
        result = time_checkpoints(args.checkpoints, args)
        for path, r in result.items():
            print(f"{path}: {r['params'] / 1e6:.2f}M params, e2e {r['e2e']['median']:.3f}, "
                  f"layers {r['layers']['median']:.3f} of {args.checkpoints[0]}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        return
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return
    if args.quick:
        args.layers, args.seconds, args.rounds = 1, [2.0, 1.5], 2
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    result = {"machine": describe_machine(args), "device": args.device, "dtype": args.dtype,
              "seconds": args.seconds, "rounds": args.rounds, "widths": {}}
    for width in args.widths.split(","):
        layers = args.layers or LAYERS[width]
        print(f"{width}: {layers} layers", flush=True)
        dense = dense_model(width, layers)
        names = variant_names(args.two_four)
        models = {name: variant_model(dense, name, args.device, dtype) for name in names}
        inputs = make_inputs(dense, args.seconds, args.device, dtype)
        del dense
        note = ""
        if "2:4" in models:
            n = models["2:4"].converted
            note = (f"2:4: {n} of {6 * layers} linear layers as semi-structured sparse tensors" if n else
                    "2:4: no layer converted (semi-structured kernels need CUDA with fp16/bf16): it ran dense")
            print(f"  {note}", flush=True)
        times, memory = time_width(models, inputs, args.rounds, args.device)
        if memory is None and not args.skip_memory:  # CPU: each in a fresh process (see the docstring)
            memory = measure_memory(width, layers, names, args)
        w = result["widths"][width] = {"layers": layers, "note": note, "variants": {},
                                       "dense_s": {p: statistics.median(times[p]["dense"]) for p in PARTS}}
        for name, model in models.items():
            if name == "dense":
                continue
            c = model.config
            v = w["variants"][name] = {
                "params": parameter_counts(model)["total"],
                "ffn_width": c.intermediate_sizes[0] if c.intermediate_sizes else c.intermediate_size,
                "heads": c.num_heads_per_layer[0] if c.num_heads_per_layer else c.num_attention_heads,
                "time": {p: ratio(times[p][name], times[p]["dense"]) for p in PARTS}}
            if memory is not None:
                v["memory_mib"] = memory[name]
                v["memory_ratio"] = {p: memory[name][p] / memory["dense"][p] for p in PARTS}
        if memory is not None:
            w["dense_memory_mib"] = memory["dense"]
        w["dense_params"] = parameter_counts(models["dense"])["total"]
        del models
        gc.collect()
    table = markdown(result)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "structured.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "structured.md").write_text(table)
    print(f"wrote {out / 'structured.md'} and {out / 'structured.json'}")


if __name__ == "__main__":
    main()
