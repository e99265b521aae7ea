"""Routes as files: S3-Router's applications 2, 3 and 4 (Fu et al., NeurIPS 2022) as tools on checkpoints.

A *route* is what S3-Router learns on top of frozen pretrained weights: one keep/drop bit per routed weight
(attention q/k/v/out and FFN fc1/fc2 by default), plus the few tensors trained alongside (the CTC head, and any
norm or bias unfrozen on request). Stored as bits it is about 1/32 of the fp32 weights it routes, so
    python -m s3r.masks export CKPT OUT.route         # a mask-mode checkpoint -> its route (1 bit per weight)
    load_pretrained(PRETRAINED, masks="OUT.route")     # the trained model again, exactly
Application 2 (multilingual / multitask): one file with the shared weights once and N named routes;
    python -m s3r.masks bundle OUT.bundle --pretrained P nl=nl.route zh=zh.route ...
    python -m s3r.masks info OUT.bundle                # per-layer density and the storage arithmetic
    bundle = load_bundle("OUT.bundle"); model = bundle.use("nl")   # switching reloads no weights
Application 3 (pruning): the one-shot magnitude pruning baseline (OMP) and a per-layer sparsity report;
    python -m s3r.masks omp FINETUNED.pt OUT.pt --prune-rate 0.3  # keep the 30% largest |W| of every tensor
    python -m s3r.masks sparsity CKPT
Application 4 (analysis): how similar are the routes learned for different languages?
    python -m s3r.masks similarity nl.route zh.route es.route --json sim.json [--plot sim.png] [--reference phon.json]

Bit order of a route (same as `numpy.packbits(mask.flatten(), bitorder="big")`): the weight tensor is flattened
in row-major order, weight i goes to byte i // 8, bit 7 - i % 8 (the first weight is the most significant bit),
1 = kept; the last byte is padded with zeros. Each layer's bits start on a fresh byte.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from . import S3RError
from .checkpoint import load_pretrained, load_s3r, s3r_checkpoint, save_atomic, torch_load, weights_fingerprint
from .model import RouteConfig, Routable, Wav2Vec2Config, Wav2Vec2ForCTC

ROUTE_FORMAT, BUNDLE_FORMAT = "s3r-route", "s3r-bundle"
BIT_ORDER = "row-major flatten; weight i -> byte i//8, bit 7 - i%8 (MSB first, numpy.packbits bitorder=big); 1 = kept"
UPSTREAM_REDUCTION = -88.5  # percent, upstream README: 11 languages on XLS-R 300M


class RouteError(S3RError):
    """A route file that does not fit: wrong format, or learned on other weights."""


# ----------------------------------------------------------------------------------------------------------------
# Bits


_BIT_VALUES = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 (ceil(numel / 8),), MSB first; exactly numpy.packbits of the flattened mask."""
    flat = mask.detach().flatten().cpu().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])  # pad the last byte with zeros
    return (flat.view(-1, 8) * _BIT_VALUES).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of pack_bits: the bool tensor of `shape` (padding bits dropped)."""
    n = math.prod(shape)
    if packed.numel() != (n + 7) // 8:
        raise RouteError(f"{packed.numel()} packed bytes cannot hold a mask of shape {tuple(shape)}")
    return (packed.view(-1, 1) & _BIT_VALUES).ne(0).flatten()[:n].view(*shape)


# ----------------------------------------------------------------------------------------------------------------
# Routes: export and apply


def route_from_model(model: Wav2Vec2ForCTC, source: str = "") -> dict:
    """The route of a mask-mode model as a plain dict (tensors, dicts, lists, str, int, float: weights_only-safe)."""
    cfg = model.route_config
    if cfg is None:
        raise RouteError(f"{source or 'model'} is not a mask-mode (routed) model; there is no route to export")
    if cfg.co_train:
        raise RouteError(f"{source}: co_train changed the shared weights, so its masks alone do not reproduce it; "
                         f"export it with `python -m s3r.export --dense` instead")
    layers = {}
    for name, m in model.masks().items():
        layers[name] = {"shape": list(m.shape), "kept": int(m.sum()), "bits": pack_bits(m)}
        weight = model.get_submodule(name.removesuffix(".weight")).dense_weight()
        if m.shape != weight.shape:  # a structured route: one bit per group, broadcast onto the weight seen as `view`
            layers[name]["view"] = list(model.get_submodule(name.removesuffix(".weight")).view or weight.shape)
    # Whatever trained besides the scores (head, unfrozen norms/biases, the mask embedding); the head always,
    # because it is task-specific even when frozen (a random head is not in the shared weights either).
    tensors = {n: p.detach().cpu().clone() for n, p in model.named_parameters()
               if (p.requires_grad or n.startswith("lm_head.")) and not n.endswith(".scores")}
    vocab = getattr(model, "vocab", None)
    return {"format": ROUTE_FORMAT, "version": 1, "bit_order": BIT_ORDER, "source": str(source),
            "weights_fingerprint": weights_fingerprint(model), "config": model.config.to_dict(),
            "route": asdict(cfg), "vocab": vocab.to_dict() if vocab is not None else None,
            "layers": layers, "tensors": tensors}


def export_route(checkpoint: str | Path, out: str | Path, trust_checkpoint: bool = False) -> dict:
    """Write the route of a mask-mode s3r (or upstream fairseq) checkpoint to `out`."""
    model = load_pretrained(checkpoint, trust_checkpoint=trust_checkpoint)
    route = route_from_model(model, str(checkpoint))
    save_atomic(route, out)
    return route


def load_route(route: str | Path | dict) -> dict:
    """A route dict from a file written by `export` (or a dict, passed through after a format check)."""
    name = "route" if isinstance(route, dict) else str(route)
    if not isinstance(route, dict):
        route = torch_load(route)
    if route.get("format") != ROUTE_FORMAT:
        raise RouteError(f"{name} is not an s3r route file (format {route.get('format')!r}); "
                         f"make one with `python -m s3r.masks export CKPT OUT`")
    return route


def apply_route(model: Wav2Vec2ForCTC, route: str | Path | dict, fingerprint: str | None = None) -> Wav2Vec2ForCTC:
    """Install a route on `model` (masks, head, trained tensors, vocabulary); every tensor ends frozen.

    Refused unless the model's weights are those the route was learned on (by `weights_fingerprint`; pass a
    precomputed `fingerprint` to skip re-hashing, as bundles do). The fixed 0/1 scores are for inference:
    to continue training a route, load its checkpoint instead (a 0 score never gets a gradient through |s|).
    """
    name = str(route) if not isinstance(route, dict) else f"the route of {route.get('source') or '?'}"
    route = load_route(route)
    have, want = fingerprint or weights_fingerprint(model), route["weights_fingerprint"]
    if have != want:
        raise RouteError(f"{name} was learned on weights {want[:16]}, but {getattr(model, 'source', 'the model')} "
                         f"has weights {have[:16]} (sha256 prefixes); load the pretrained checkpoint it was trained on")
    config = Wav2Vec2Config.from_dict(route["config"])
    if model.config.vocab_size != config.vocab_size:
        model.set_vocab_size(config.vocab_size)
    for layer, module in model.named_modules():
        if not isinstance(module, Routable):
            continue
        entry = route["layers"].get(f"{layer}.weight")
        if entry is not None:
            module.fix_mask(unpack_bits(entry["bits"], entry["shape"]), entry.get("view"))
        elif module.scores is not None:  # routed by an earlier route, not by this one: dense again
            module.scores = None
            module._init_routing()
    state = model.state_dict()
    for key, tensor in route["tensors"].items():
        if key not in state or state[key].shape != tensor.shape:
            raise RouteError(f"route tensor {key} {tuple(tensor.shape)} does not fit the model")
        state[key].copy_(tensor)
    model.config, model.route_config = config, RouteConfig(**route["route"])
    from .text import Vocabulary
    model.vocab = Vocabulary.from_dict(route["vocab"]) if route["vocab"] is not None else None
    return model.requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# Bundles (application 2): shared weights once, N named routes


def make_bundle(pretrained: str | Path, routes: dict[str, str | Path], trust_checkpoint: bool = False) -> dict:
    """The bundle dict: the shared pretrained weights (without a head) and the named routes, all checked to fit."""
    model = load_pretrained(pretrained, trust_checkpoint=trust_checkpoint)
    fingerprint = weights_fingerprint(model)
    loaded = {}
    for name, path in routes.items():
        route = load_route(path)
        if route["weights_fingerprint"] != fingerprint:
            raise RouteError(f"{path} was learned on weights {route['weights_fingerprint'][:16]}, "
                             f"not on {pretrained} ({fingerprint[:16]})")
        loaded[name] = route
    model.set_vocab_size(0)  # every route brings its own head
    model.vocab = None
    return {"format": BUNDLE_FORMAT, "version": 1, "weights_fingerprint": fingerprint,
            "shared": s3r_checkpoint(model), "routes": loaded}


class RouteBundle:
    """One model on the shared weights; `.use(name)` switches route (masks, head, vocabulary) in place."""

    def __init__(self, model: Wav2Vec2ForCTC, routes: dict[str, dict], fingerprint: str):
        self.model, self.routes, self.fingerprint, self.current = model, routes, fingerprint, None
        # Tensors some route overrides (unfrozen norms, biases): keep the shared values to restore on switching.
        state = model.state_dict()
        self._shared = {k: state[k].clone() for r in routes.values() for k in r["tensors"]
                        if k in state and not k.startswith("lm_head.")}

    @property
    def names(self) -> list[str]:
        return list(self.routes)

    def use(self, name: str) -> Wav2Vec2ForCTC:
        if name not in self.routes:
            raise RouteError(f"no route {name!r} in the bundle; it has {', '.join(self.routes)}")
        state = self.model.state_dict()
        for key, tensor in self._shared.items():
            state[key].copy_(tensor)
        apply_route(self.model, self.routes[name], fingerprint=self.fingerprint)
        self.current = name
        return self.model


def load_bundle(path: str | Path) -> RouteBundle:
    """Read a bundle written by `python -m s3r.masks bundle`; call `.use(name)` before running the model."""
    bundle = torch_load(path)
    if bundle.get("format") != BUNDLE_FORMAT:
        raise RouteError(f"{path} is not an s3r route bundle (format {bundle.get('format')!r})")
    model = load_s3r(bundle["shared"], path)
    model.source = str(path)
    if weights_fingerprint(model) != bundle["weights_fingerprint"]:
        raise RouteError(f"{path}: the shared weights do not match the bundle's fingerprint (corrupted file?)")
    return RouteBundle(model.eval(), bundle["routes"], bundle["weights_fingerprint"])


# ----------------------------------------------------------------------------------------------------------------
# Storage arithmetic


def storage(config: Wav2Vec2Config, routes: list[dict]) -> dict:
    """Bytes of N separately finetuned dense models vs the shared weights plus N routes, in fp32 and fp16.

    Each route is {"routed": number of masked weights, "vocab_size": head outputs, "extra": other trained params}.
    A dense model = backbone + its head; a route = ceil(routed / 8) bytes of bits + its head and extras.
    """
    # Parameter count from a one-layer copy (a 315M-parameter model would take seconds and 1.3 GB to build).
    small = Wav2Vec2ForCTC(replace(config, num_hidden_layers=1, vocab_size=0))
    per_layer = sum(p.numel() for p in small.encoder.layers[0].parameters())
    backbone = sum(p.numel() for p in small.parameters()) + (config.num_hidden_layers - 1) * per_layer
    out = {"routes": len(routes), "backbone_params": backbone}
    for dtype, b in (("fp32", 4), ("fp16", 2)):
        heads = [(config.hidden_size + 1) * r["vocab_size"] for r in routes]
        dense = sum(backbone + h for h in heads) * b
        shared = backbone * b + sum(-(-r["routed"] // 8) + (h + r["extra"]) * b for r, h in zip(routes, heads))
        out[dtype] = {"dense_models_bytes": dense, "shared_plus_routes_bytes": shared,
                      "change_percent": 100.0 * (shared / dense - 1.0)}
    return out


def paper_storage(num_languages: int = 11, vocab_size: int = 50) -> dict:
    """Upstream's accounting: 11 languages on XLS-R 300M, FFN-only routes (fix_attn, as its XLS-R command) and all."""
    config = Wav2Vec2Config.preset("xlsr")
    ffn = 2 * config.hidden_size * config.intermediate_size * config.num_hidden_layers
    attn = 4 * config.hidden_size ** 2 * config.num_hidden_layers
    return {name: storage(config, [{"routed": routed, "vocab_size": vocab_size, "extra": 0}] * num_languages)
            for name, routed in (("fix_attn", ffn), ("attention+ffn", ffn + attn))}


def _route_summary(route: dict) -> dict:
    head = sum(t.numel() for k, t in route["tensors"].items() if k.startswith("lm_head."))
    return {"routed": sum(math.prod(e["shape"]) for e in route["layers"].values()),
            "vocab_size": route["config"]["vocab_size"],
            "extra": sum(t.numel() for t in route["tensors"].values()) - head}


def print_info(path: str | Path):
    obj = torch_load(path)
    kind = obj.get("format") if isinstance(obj, dict) else None
    if kind not in (ROUTE_FORMAT, BUNDLE_FORMAT):
        raise RouteError(f"{path} is neither a route nor a bundle; for checkpoints use `python -m s3r.masks sparsity`")
    routes = obj["routes"] if kind == BUNDLE_FORMAT else {Path(path).stem: obj}
    size = Path(path).stat().st_size
    print(f"{path}: {kind}, {size:,} bytes, {len(routes)} route(s)")
    for name, route in routes.items():
        s = _route_summary(route)
        bits = sum(e["bits"].numel() for e in route["layers"].values())
        kept = sum(e["kept"] for e in route["layers"].values())
        print(f"\nroute {name}: {len(route['layers'])} routed tensors, {s['routed']:,} weights, "
              f"density {kept / max(s['routed'], 1):.4f}; bits {bits:,} B ({8 * bits / max(s['routed'], 1):.3f} "
              f"bits/weight), head {s['vocab_size']} outputs, {s['extra']:,} other trained params")
        for layer, e in route["layers"].items():
            print(f"  {layer:55s} {'x'.join(map(str, e['shape'])):>11s}  density {e['kept'] / math.prod(e['shape']):.4f}")
    config = Wav2Vec2Config.from_dict(next(iter(routes.values()))["config"])
    print(f"\nstorage: {len(routes)} route(s) + shared weights vs {len(routes)} separately finetuned dense model(s)")
    _print_storage(storage(config, [_route_summary(r) for r in routes.values()]))
    print(f"\npaper accounting: 11 languages on XLS-R 300M (vocabulary 50), upstream reports {UPSTREAM_REDUCTION}%")
    for name, s in paper_storage().items():
        print(f"  routes over {name}:")
        _print_storage(s, indent="    ")


def _print_storage(s: dict, indent: str = "  "):
    for dtype in ("fp32", "fp16"):
        d = s[dtype]
        print(f"{indent}{dtype}: dense {d['dense_models_bytes'] / 1e6:,.1f} MB, shared + routes "
              f"{d['shared_plus_routes_bytes'] / 1e6:,.1f} MB, change {d['change_percent']:+.1f}%")


# ----------------------------------------------------------------------------------------------------------------
# Pruning (application 3): one-shot magnitude pruning and sparsity


def omp(model: Wav2Vec2ForCTC, prune_rate: float, fix_attn: bool = False) -> Wav2Vec2ForCTC:
    """One-shot magnitude pruning: keep the `prune_rate` fraction of largest |W| of every routed tensor, no training.

    The same thing as the first mask of pruning step 2 (init_score weight_magnitude_with_scale: scores = W).
    """
    return model.route(RouteConfig(prune_rate=prune_rate, init_score="weight_magnitude_with_scale", fix_attn=fix_attn))


def masks_of(path: str | Path, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """Keep-masks by weight name from a route file or any checkpoint (a dense one: its nonzero attention/FFN weights)."""
    obj = torch_load(path, trust_checkpoint) if Path(path).is_file() else None
    if isinstance(obj, dict) and obj.get("format") == ROUTE_FORMAT:
        return {k: unpack_bits(e["bits"], e["shape"]) for k, e in obj["layers"].items()}
    model = load_pretrained(path, trust_checkpoint=trust_checkpoint)
    if model.route_config is not None:
        return model.masks()
    return {f"{n}.weight": m.dense_weight().detach() != 0 for n, m in model.routable_layers(RouteConfig()).items()}


def print_sparsity(path: str | Path, trust_checkpoint: bool = False):
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
    """From counts: n weights, ka/kb kept, kab kept by both; `expected` = E[kab] of random masks (default: one tensor)."""
    expected = ka * kb / n if expected is None else expected
    cos = lambda both, x, y: both / math.sqrt(x * y) if x and y else 0.0  # noqa: E731
    iou = lambda both, x, y: both / (x + y - both) if x + y - both else 1.0  # noqa: E731
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
        total = [t + c for t, c in zip(total, (*counts, counts[1] * counts[2] / counts[0]))]
    if not layers:
        raise RouteError("the two routes mask no tensor in common")
    return {"overall": _similarity_counts(*total[:4], total[4]), "layers": layers,
            "only_in_a": sorted(set(a) - set(b)), "only_in_b": sorted(set(b) - set(a))}


def pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((u - mx) * (v - my) for u, v in zip(x, y))
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


def run_similarity(named: dict[str, str], out_json: str, plot: str | None = None, reference: str | None = None,
                   trust_checkpoint: bool = False) -> dict:
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


def _plot(result: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ref = result.get("reference")
    fig, axes = plt.subplots(1, 3 if ref else 2, figsize=(15 if ref else 10, 4))
    for ax, key in zip(axes, ("cosine", "pruned_cosine")):
        for p in result["pairs"]:
            y = [v[key] for v in p["layers"].values()]
            line, = ax.plot(y, label=f"{p['a']}-{p['b']}")
            ax.plot([v[f"{key}_random"] for v in p["layers"].values()], "--", color=line.get_color(), alpha=0.5)
        ax.set(title=f"{key.replace('_', ' ')} per routed tensor (dashed: random)", xlabel="routed tensor (model order)")
    axes[0].legend(fontsize=6)
    if ref:
        overall = {(p["a"], p["b"]): p["overall"]["cosine"] for p in result["pairs"]}
        y = [overall[tuple(pair)] for pair in ref["pairs"]]
        axes[2].scatter(ref["values"], y)
        for pair, u, v in zip(ref["pairs"], ref["values"], y):
            axes[2].annotate("-".join(pair), (u, v), fontsize=6)
        axes[2].set(xlabel="reference similarity", ylabel="mask cosine (kept)",
                    title=f"Pearson {ref['cosine']['pearson']:.2f}, Spearman {ref['cosine']['spearman']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _named(items: list[str]) -> dict[str, str]:
    """NAME=FILE or FILE (named by its stem); names must be unique."""
    named = {}
    for item in items:
        name, _, path = item.rpartition("=") if "=" in item else (Path(item).stem, "", item)
        if name in named:
            raise RouteError(f"two routes are named {name!r}; use NAME=FILE")
        named[name] = path
    return named


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m s3r.masks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("export", help="the route of a mask-mode checkpoint, one bit per routed weight")
    c.add_argument("checkpoint")
    c.add_argument("out")
    c = sub.add_parser("bundle", help="shared weights once + N named routes in one file")
    c.add_argument("out")
    c.add_argument("--pretrained", required=True, help="the shared weights every route was learned on")
    c.add_argument("routes", nargs="+", help="ROUTE or NAME=ROUTE")
    c = sub.add_parser("info", help="per-layer density and storage arithmetic of a route or bundle")
    c.add_argument("file")
    c = sub.add_parser("omp", help="one-shot magnitude pruning per tensor (attention + FFN), no retraining")
    c.add_argument("checkpoint")
    c.add_argument("out")
    c.add_argument("--prune-rate", type=float, required=True, help="fraction of each tensor KEPT (0.3 = 70%% sparsity)")
    c.add_argument("--fix-attn", action="store_true", help="prune the FFN only")
    c.add_argument("--route", action="store_true", help="write a route file instead of a dense checkpoint with zeros")
    c = sub.add_parser("sparsity", help="per-layer sparsity of a route or checkpoint")
    c.add_argument("checkpoint")
    c = sub.add_parser("similarity", help="pairwise mask similarity of routes or checkpoints")
    c.add_argument("routes", nargs="+", help="ROUTE or NAME=ROUTE (route files or checkpoints)")
    c.add_argument("--json", required=True, help="output JSON")
    c.add_argument("--plot", help="output PNG (needs matplotlib)")
    c.add_argument("--reference", help='language similarity JSON: {"names": [...], "matrix": [[...]]} or {"A|B": v}')
    for c in sub.choices.values():
        c.add_argument("--trust-checkpoint", action="store_true", help="allow unpickling arbitrary classes")
    args = p.parse_args(argv)
    trust = args.trust_checkpoint
    try:
        if args.cmd == "export":
            route = export_route(args.checkpoint, args.out, trust)
            n = sum(math.prod(e["shape"]) for e in route["layers"].values())
            size = Path(args.out).stat().st_size
            print(f"wrote {args.out}: {len(route['layers'])} routed tensors, {n:,} weights, {size:,} bytes "
                  f"({8 * size / n:.3f} bits per routed weight)")
        elif args.cmd == "bundle":
            bundle = make_bundle(args.pretrained, _named(args.routes), trust)
            save_atomic(bundle, args.out)
            print(f"wrote {args.out}: {len(bundle['routes'])} routes, {Path(args.out).stat().st_size:,} bytes")
        elif args.cmd == "info":
            print_info(args.file)
        elif args.cmd == "omp":
            model = omp(load_pretrained(args.checkpoint, trust_checkpoint=trust), args.prune_rate, args.fix_attn)
            save_atomic(route_from_model(model, args.checkpoint) if args.route else s3r_checkpoint(model.fold_masks()), args.out)
            print(f"wrote {args.out}: magnitude-pruned to keep {args.prune_rate} of every "
                  f"{'FFN' if args.fix_attn else 'attention and FFN'} weight tensor")
        elif args.cmd == "sparsity":
            print_sparsity(args.checkpoint, trust)
        elif args.cmd == "similarity":
            if len(args.routes) < 2:
                raise RouteError("similarity needs at least two routes")
            if args.plot:
                try:
                    import matplotlib  # noqa: F401
                except ImportError:
                    raise RouteError("--plot needs matplotlib (pip install matplotlib); run without --plot for JSON only") from None
            result = run_similarity(_named(args.routes), args.json, args.plot, args.reference, trust)
            for pair in result["pairs"]:
                o = pair["overall"]
                print(f"{pair['a']} vs {pair['b']}: cosine {o['cosine']:.4f} (random {o['cosine_random']:.4f}), "
                      f"pruned cosine {o['pruned_cosine']:.4f} (random {o['pruned_cosine_random']:.4f}), "
                      f"IoU {o['iou']:.4f} (random {o['iou_random']:.4f})")
            for key in ("cosine", "pruned_cosine", "iou", "pruned_iou") if args.reference else ():
                r = result["reference"][key]
                print(f"reference vs {key}: Pearson {r['pearson']:.3f}, Spearman {r['spearman']:.3f}")
    except (S3RError, OSError, ValueError) as e:  # ValueError: a config value out of range (--prune-rate 2)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
