"""Analysis of learned routes: S3-Router's application 4 (Fu et al., NeurIPS 2022) and per-layer sparsity.

How similar are the routes learned for different languages, and does that follow how similar the languages are?
    python -m s3r.analysis similarity nl.route zh.route es.route --json sim.json [--plot sim.png] [--reference r.json]
    python -m s3r.analysis sparsity CKPT       # per-layer sparsity of a route or any checkpoint
Routes, checkpoints and dense (pruned) checkpoints all work: `s3r.routes.masks_of` reads the masks of each.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch

from .errors import ArgumentParser, S3RError
from .routes import RouteError, masks_of, parse_named

__all__ = ["compare", "pearson", "print_sparsity", "read_reference", "run_similarity", "similarity", "spearman"]


# ----------------------------------------------------------------------------------------------------------------
# Similarity (application 4)


def similarity(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Cosine |a∧b| / sqrt(|a||b|) and IoU of two keep-masks, of their pruned sets, and of random masks alike.

    Upstream compares the kept sets. At density 0.9 two masks share most of their ones whatever they learned
    (random masks already score 0.9), so the pruned sets (1 - mask), where the choices are, say more. The random
    baseline has the same kept count per tensor: E|a∧b| = |a||b| / n per tensor, so its cosine is sqrt(d_a d_b).
    """
    a, b = a.flatten().bool(), b.flatten().bool()
    return _similarity_counts(a.numel(), int(a.sum()), int(b.sum()), int((a & b).sum()))


def _similarity_counts(n: int, ka: int, kb: int, kab: int, expected: float | None = None) -> dict:
    """From counts: n weights, ka/kb kept, kab kept by both; `expected`: E[kab] of random masks (ka * kb / n)."""
    expected = ka * kb / n if expected is None else expected

    def cos(both: float, x: float, y: float) -> float:
        return both / math.sqrt(x * y) if x and y else 0.0

    def iou(both: float, x: float, y: float) -> float:
        return both / (x + y - both) if x + y - both else 1.0

    pa, pb, pab, pexp = n - ka, n - kb, n - ka - kb + kab, n - ka - kb + expected
    return {"weights": n, "density_a": ka / n, "density_b": kb / n,
            "cosine": cos(kab, ka, kb), "cosine_random": cos(expected, ka, kb),
            "iou": iou(kab, ka, kb), "iou_random": iou(expected, ka, kb),
            "pruned_cosine": cos(pab, pa, pb), "pruned_cosine_random": cos(pexp, pa, pb),
            "pruned_iou": iou(pab, pa, pb), "pruned_iou_random": iou(pexp, pa, pb)}


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """Per-layer and overall similarity over the tensors both routes mask."""
    layers, total = {}, [0, 0, 0, 0, 0.0]
    for name in (n for n in a if n in b):
        x, y = a[name].flatten().bool(), b[name].flatten().bool()
        counts = (x.numel(), int(x.sum()), int(y.sum()), int((x & y).sum()))
        layers[name] = _similarity_counts(*counts)
        total = [t + c for t, c in zip(total, (*counts, counts[1] * counts[2] / counts[0]), strict=True)]
    if not layers:
        raise RouteError("the two routes mask no tensor in common")
    return {"overall": _similarity_counts(*total[:4], total[4]), "layers": layers,
            "only_in_a": sorted(set(a) - set(b)), "only_in_b": sorted(set(b) - set(a))}


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation (nan when either list is constant)."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((u - mx) * (v - my) for u, v in zip(x, y, strict=True))
    sxx, syy = sum((u - mx) ** 2 for u in x), sum((v - my) ** 2 for v in y)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else float("nan")


def spearman(x: list[float], y: list[float]) -> float:
    """Pearson correlation of the ranks (ties get their average rank, as scipy.stats.spearmanr)."""
    def ranks(v):
        first, last = {}, {}
        for i, value in enumerate(sorted(v)):
            first.setdefault(value, i)
            last[value] = i
        return [(first[value] + last[value]) / 2 + 1 for value in v]
    return pearson(ranks(x), ranks(y))


def read_reference(path: str | Path) -> dict[frozenset, float]:
    """A language-similarity file: {"names": [...], "matrix": [[...]]} (symmetric) or {"A|B": value, ...}."""
    try:
        d = json.loads(Path(path).read_text())
        if "names" in d:
            names, matrix = d["names"], d["matrix"]
            return {frozenset((names[i], names[j])): float(matrix[i][j])
                    for i in range(len(names)) for j in range(i + 1, len(names))}
        return {frozenset(k.split("|")): float(v) for k, v in d.items()}
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise RouteError(f"{path}: not a reference similarity file ({type(e).__name__}: {e})") from None


def run_similarity(named: dict[str, str], out_json: str | Path, plot: str | Path | None = None,
                   reference: str | Path | None = None, trust_checkpoint: bool = False) -> dict:
    """Pairwise similarity of the named routes/checkpoints, written to `out_json` (and a plot); with a
    `reference` file, its Pearson and Spearman correlation with the routes' similarities."""
    masks = {name: masks_of(path, trust_checkpoint) for name, path in named.items()}
    names = list(named)
    pairs = [{"a": a, "b": b, **compare(masks[a], masks[b])} for i, a in enumerate(names) for b in names[i + 1:]]
    result = {"names": names, "files": named, "pairs": pairs,
              "note": "cosine/iou over kept weights (upstream); pruned_* over dropped weights; *_random: random "
                      "masks with the same kept count per tensor"}
    if reference:
        ref = read_reference(reference)
        used = [p for p in pairs if frozenset((p["a"], p["b"])) in ref]
        if len(used) < 3:
            raise RouteError(f"{reference} gives a value for only {len(used)} of the {len(pairs)} route pairs (need 3)")
        x = [ref[frozenset((p["a"], p["b"]))] for p in used]
        result["reference"] = {"file": str(reference), "pairs": [[p["a"], p["b"]] for p in used], "values": x}
        for key in ("cosine", "pruned_cosine", "iou", "pruned_iou"):
            y = [p["overall"][key] for p in used]
            result["reference"][key] = {"pearson": pearson(x, y), "spearman": spearman(x, y)}
    Path(out_json).write_text(json.dumps(result, indent=1))
    if plot:
        _plot(result, plot)
    return result


SHORT = {"attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v", "attention.out_proj": "out",
         "feed_forward.intermediate_dense": "fc1", "feed_forward.output_dense": "fc2"}


def short_name(tensor: str) -> str:
    """A routed tensor's name for a plot axis: "encoder.layers.3.feed_forward.intermediate_dense.weight" -> "3 fc1"."""
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.weight", tensor)
    if m and m.group(2) in SHORT:
        return f"{m.group(1)} {SHORT[m.group(2)]}"
    return tensor.removesuffix(".weight").replace("encoder.", "").replace("feature_extractor.", "fe.")


def plot_similarity(result: dict):
    """The figure `--plot` writes: per routed tensor (named by layer and matrix), each pair's similarity (solid) and
    the same for random masks of the same densities (dashed, what chance alone gives), kept and pruned sets; with a
    reference, the overall cosine against it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ref = result.get("reference")
    layers = list(result["pairs"][0]["layers"])
    fig, axes = plt.subplots(1, 3 if ref else 2, figsize=(max(10, 0.3 * len(layers)) + (5 if ref else 0), 5))
    for ax, key in zip(axes, ("cosine", "pruned_cosine"), strict=False):
        for p in result["pairs"]:
            line, = ax.plot([p["layers"][t][key] for t in layers], marker=".", label=f"{p['a']} vs {p['b']}")
            ax.plot([p["layers"][t][f"{key}_random"] for t in layers], "--", color=line.get_color(), alpha=0.6)
        ax.plot([], [], "--", color="gray", label="random masks, same densities")
        # from below chance up to 1 (identical masks), so a gap from the baseline is seen against the whole scale
        low = min(v for line in ax.get_lines() for v in line.get_ydata())
        ax.set_ylim(low - 0.02 * (1 - low), 1.0 + 0.02 * (1 - low))
        ax.set_xticks(range(len(layers)), [short_name(t) for t in layers], rotation=90, fontsize=7)
        ax.set(title=f"{'kept' if key == 'cosine' else 'pruned'} weights: cosine per routed tensor",
               xlabel="routed tensor (layer, matrix)", ylabel=f"cosine of the {'kept' if key == 'cosine' else 'pruned'}"
               " sets (1 = the same)")
        ax.legend(fontsize=8)
    if ref:
        overall = {(p["a"], p["b"]): p["overall"]["cosine"] for p in result["pairs"]}
        y = [overall[tuple(pair)] for pair in ref["pairs"]]
        axes[2].scatter(ref["values"], y)
        for pair, u, v in zip(ref["pairs"], ref["values"], y, strict=True):
            axes[2].annotate("-".join(pair), (u, v), fontsize=7)
        axes[2].set(xlabel="reference similarity", ylabel="mask cosine (kept)",
                    title=f"Pearson {ref['cosine']['pearson']:.2f}, Spearman {ref['cosine']['spearman']:.2f}")
    fig.tight_layout()
    return fig


def _plot(result: dict, path: str | Path) -> None:
    plot_similarity(result).savefig(path, dpi=120)


# ----------------------------------------------------------------------------------------------------------------
# Sparsity


def print_sparsity(path: str | Path, trust_checkpoint: bool = False) -> None:
    """Per-layer sparsity (fraction of weights dropped) of a route or checkpoint, with attention/FFN/total rows."""
    masks = masks_of(path, trust_checkpoint)
    groups: dict[str, list[int]] = {}
    print(f"{'layer':55s} {'weights':>10s} {'sparsity':>9s}")
    for name, m in masks.items():
        n, kept = m.numel(), int(m.sum())
        print(f"{name:55s} {n:10,d} {1 - kept / n:9.4f}")
        group = "attention" if ".attention." in name else "ffn" if ".feed_forward." in name else "other"
        for g in (group, "total"):
            groups.setdefault(g, [0, 0])[0] += n
            groups[g][1] += kept
    for g, (n, kept) in sorted(groups.items(), key=lambda item: item[0] == "total"):
        print(f"{g:55s} {n:10,d} {1 - kept / n:9.4f}")


# ----------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m s3r.analysis", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("similarity", help="pairwise mask similarity of routes or checkpoints")
    c.add_argument("routes", nargs="+", help="ROUTE or NAME=ROUTE (route files or checkpoints)")
    c.add_argument("--json", required=True, help="output JSON")
    c.add_argument("--plot", help="output PNG (needs matplotlib)")
    c.add_argument("--reference", help='language similarity JSON: {"names": [...], "matrix": [[...]]} or {"A|B": v}')
    c = sub.add_parser("sparsity", help="per-layer sparsity of a route or checkpoint")
    c.add_argument("checkpoint")
    for c in sub.choices.values():
        c.add_argument("--trust-checkpoint", action="store_true", help="allow unpickling arbitrary classes")
    args = p.parse_args(argv)
    trust = args.trust_checkpoint
    try:
        if args.cmd == "sparsity":
            print_sparsity(args.checkpoint, trust)
        elif args.cmd == "similarity":
            if len(args.routes) < 2:
                raise RouteError("similarity needs at least two routes")
            if args.plot:
                try:
                    import matplotlib  # noqa: F401  imported only to fail early, before minutes of work
                except ImportError:
                    raise RouteError("--plot needs matplotlib (pip install matplotlib, or s3r[plot]); run "
                                     "without --plot for JSON only") from None
            result = run_similarity(parse_named(args.routes), args.json, args.plot, args.reference, trust)
            for pair in result["pairs"]:
                o = pair["overall"]
                print(f"{pair['a']} vs {pair['b']}: cosine {o['cosine']:.4f} (random {o['cosine_random']:.4f}), "
                      f"pruned cosine {o['pruned_cosine']:.4f} (random {o['pruned_cosine_random']:.4f}), "
                      f"IoU {o['iou']:.4f} (random {o['iou_random']:.4f})")
            for key in ("cosine", "pruned_cosine", "iou", "pruned_iou") if args.reference else ():
                r = result["reference"][key]
                print(f"reference vs {key}: Pearson {r['pearson']:.3f}, Spearman {r['spearman']:.3f}")
    except (S3RError, OSError, ValueError) as e:  # ValueError: a config value out of range
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
