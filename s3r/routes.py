"""Routes as files: S3-Router's applications 2 and 3 (Fu et al., NeurIPS 2022) as tools on checkpoints.

A *route* is what S3-Router learns on top of frozen pretrained weights: one keep/drop bit per routed weight
(attention q/k/v/out and FFN fc1/fc2 by default), plus the few tensors trained alongside (the CTC head, and any
norm or bias unfrozen on request). Stored as bits it is about 1/32 of the fp32 weights it routes, so
    python -m s3r.routes export CKPT OUT.route          # a mask-mode checkpoint -> its route (1 bit per weight)
    load_pretrained(PRETRAINED, route="OUT.route")      # the trained model again, exactly
Application 2 (multilingual / multitask): one file with the shared weights once and N named routes;
    python -m s3r.routes bundle OUT.bundle --pretrained P nl=nl.route zh=zh.route ...
    python -m s3r.routes info OUT.bundle                # per-layer density and the storage arithmetic
    bundle = load_bundle("OUT.bundle"); model = bundle.use("nl")   # switching reloads no weights
Application 3 (pruning): the one-shot magnitude pruning baseline (OMP);
    python -m s3r.routes omp FINETUNED.pt OUT.pt --prune-rate 0.3  # keep the 30% largest |W| of every tensor
Application 4 (how similar are the routes of different languages?) and per-layer sparsity: `python -m s3r.analysis`.

The file format (bit order, what a route holds, installing one on a model) is in `s3r/route_format.py`, below
`s3r.checkpoint`; this module, which loads and writes checkpoints, sits above it.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .checkpoint import (
    architecture,
    load_pretrained,
    load_s3r,
    s3r_checkpoint,
    save_atomic,
    torch_load,
    weights_fingerprint,
)
from .classify import head_kind, is_head, with_head
from .compact import compact, fold_masks
from .config import RouteConfig, Wav2Vec2Config
from .errors import ArgumentParser, S3RError
from .model import Wav2Vec2ForCTC
from .route_format import (
    BIT_ORDER,
    BUNDLE_FORMAT,
    ROUTE_FORMAT,
    RouteError,
    check_route,
    describe,
    install_route,
    pack_bits,
    unpack_bits,
)

__all__ = ["BIT_ORDER", "RouteBundle", "RouteError", "apply_route", "bundle_from_dict", "export_route", "load_bundle",
           "load_route", "make_bundle", "masks_of", "omp", "pack_bits", "paper_storage", "route_from_model",
           "route_summary", "storage", "unpack_bits"]

UPSTREAM_REDUCTION = -88.5  # percent, upstream README: 11 languages on XLS-R 300M


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
    layers = {name: {"shape": list(m.shape), "kept": int(m.sum()), "bits": pack_bits(m)}
              for name, m in model.masks().items()}
    for name, module in model.routed().items():  # structured: one bit per group, broadcast onto the weight's `view`
        if module.scores.shape != module.dense_weight().shape:
            layers[f"{name}.weight"]["view"] = list(module.view or module.dense_weight().shape)
    # Whatever trained besides the scores (head, unfrozen norms/biases, the mask embedding); the head always,
    # because it is task-specific even when frozen (a random head is not in the shared weights either).
    tensors = {n: p.detach().cpu().clone() for n, p in model.named_parameters()
               if (p.requires_grad or is_head(n)) and not n.endswith(".scores")}
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
    if isinstance(route, dict):
        return check_route(route, f"the route of {route.get('source') or '?'}")
    return check_route(torch_load(route), str(route))


def apply_route(model: Wav2Vec2ForCTC, route: str | Path | dict, fingerprint: str | None = None) -> Wav2Vec2ForCTC:
    """Install a route (file or dict) on `model`: masks, head, trained tensors, vocabulary; every tensor ends frozen.

    Refused unless the model's weights are those the route was learned on (by `weights_fingerprint`; pass a
    precomputed `fingerprint` to skip re-hashing, as bundles do).
    """
    name = str(route) if not isinstance(route, dict) else f"the route of {route.get('source') or '?'}"
    return install_route(model, load_route(route), fingerprint or weights_fingerprint(model), name)


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
    model = with_head(model, replace(model.config, vocab_size=0, labels=None))  # every route brings its own head
    model.vocab = None
    return {"format": BUNDLE_FORMAT, "version": 1, "weights_fingerprint": fingerprint,
            "shared": s3r_checkpoint(model), "routes": loaded}


class RouteBundle:
    """One encoder on the shared weights; `.use(name)` switches route (masks, head, vocabulary or labels) in place and
    returns the model of the route's kind: a `Wav2Vec2ForCTC` for a CTC route, a `Wav2Vec2ForSequenceClassification`
    for a classification route (s3r/classify.py), both running the same encoder modules."""

    def __init__(self, model: Wav2Vec2ForCTC, routes: dict[str, dict], fingerprint: str):
        self.model, self.routes, self.fingerprint, self.current = model, routes, fingerprint, None
        self._models = {}  # head kind -> the model of that kind on the shared encoder, made on first use
        # Tensors some route overrides (unfrozen norms, biases): keep the shared values to restore on switching.
        state = model.state_dict()
        self._shared = {k: state[k].clone() for r in routes.values() for k in r["tensors"]
                        if k in state and not is_head(k)}
        model.register_forward_pre_hook(self._check_route)  # no route yet: no head, so no logits either

    def _check_route(self, module, args):
        if self.current is None:
            raise RouteError(f"the bundle runs no route yet: call .use(name) first (it has {', '.join(self.routes)})")

    def kind(self, name: str) -> str:
        """`ctc` or `classification`: the head of route `name`."""
        return "classification" if self.routes[name]["config"].get("labels") is not None else "ctc"

    @property
    def names(self) -> list[str]:
        return list(self.routes)

    def use(self, name: str) -> Wav2Vec2ForCTC:
        if name not in self.routes:
            raise RouteError(f"no route {name!r} in the bundle; it has {', '.join(self.routes)}")
        state = self.model.state_dict() if self._shared else {}
        for key, tensor in self._shared.items():
            state[key].copy_(tensor)
        kind = self.kind(name)
        model = apply_route(self._models.get(kind, self.model), self.routes[name], fingerprint=self.fingerprint)
        self.model = self._models[kind] = model
        self.current = name
        return model


def load_bundle(path: str | Path) -> RouteBundle:
    """Read a bundle written by `python -m s3r.routes bundle`; call `.use(name)` before running the model."""
    return bundle_from_dict(torch_load(path), path)


def bundle_from_dict(bundle: object, path: str | Path) -> RouteBundle:
    """`load_bundle` on what torch_load read from `path` (for callers that read the file to see what it holds)."""
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        raise RouteError(f"{path} is not an s3r route bundle (it holds {describe(bundle)}); "
                         f"make one with `python -m s3r.routes bundle OUT --pretrained P ROUTE...`")
    missing = [k for k in ("weights_fingerprint", "shared", "routes") if k not in bundle]
    if missing:
        raise RouteError(f"{path}: route bundle without {', '.join(missing)} (truncated or written by another tool)")
    routes = {name: check_route(route, f"{path}: route {name!r}") for name, route in bundle["routes"].items()}
    model = load_s3r(bundle["shared"], path)
    model.source = str(path)
    if weights_fingerprint(model) != bundle["weights_fingerprint"]:
        raise RouteError(f"{path}: the shared weights do not match the bundle's fingerprint (corrupted file?)")
    return RouteBundle(model.eval(), routes, bundle["weights_fingerprint"])


# ----------------------------------------------------------------------------------------------------------------
# Storage arithmetic


def storage(config: Wav2Vec2Config, routes: list[dict]) -> dict:
    """Bytes of N separately finetuned dense models vs the shared weights plus N routes, in fp32 and fp16.

    Each route is {"routed": number of masked weights, "vocab_size": head outputs, "extra": other trained params}.
    A dense model = backbone + its head; a route = ceil(routed / 8) bytes of bits + its head and extras.
    """
    # Parameter count from one-layer copies (a 315M-parameter model would take seconds and 1.3 GB to build), one per
    # distinct layer shape (a compact model's layers differ: s3r/compact.py).
    n = config.num_hidden_layers
    shapes = list(zip(config.num_heads_per_layer or (config.num_attention_heads,) * n,
                      config.intermediate_sizes or (config.intermediate_size,) * n, strict=True))
    one = {s: Wav2Vec2ForCTC(replace(config, num_hidden_layers=1, vocab_size=0, num_heads_per_layer=s[:1],
                                     intermediate_sizes=s[1:])) for s in set(shapes)}
    per_layer = {s: sum(p.numel() for p in m.encoder.layers[0].parameters()) for s, m in one.items()}
    rest = sum(p.numel() for p in one[shapes[0]].parameters()) - per_layer[shapes[0]]  # all but the layers
    backbone = rest + sum(per_layer[s] for s in shapes)
    out = {"routes": len(routes), "backbone_params": backbone}
    heads = [r["head"] if "head" in r else (config.hidden_size + 1) * r["vocab_size"] for r in routes]
    for dtype, b in (("fp32", 4), ("fp16", 2)):
        dense = sum(backbone + h for h in heads) * b
        routes_bytes = sum(-(-r["routed"] // 8) + (h + r["extra"]) * b for r, h in zip(routes, heads, strict=True))
        shared = backbone * b + routes_bytes
        out[dtype] = {"dense_models_bytes": dense, "shared_plus_routes_bytes": shared,
                      "change_percent": 100.0 * (shared / dense - 1.0)}
    return out


def paper_storage(num_languages: int = 11, vocab_size: int = 50) -> dict:
    """Upstream's accounting: 11 languages on XLS-R 300M, FFN-only routes (fix_attn, as its XLS-R command) and all."""
    config = architecture("xlsr")
    ffn = 2 * config.hidden_size * config.intermediate_size * config.num_hidden_layers
    attn = 4 * config.hidden_size ** 2 * config.num_hidden_layers
    return {name: storage(config, [{"routed": routed, "vocab_size": vocab_size, "extra": 0}] * num_languages)
            for name, routed in (("fix_attn", ffn), ("attention+ffn", ffn + attn))}


def route_summary(route: dict) -> dict:
    """The sizes `storage` needs from one route: routed weights, its head's kind, outputs (CTC vocabulary or class
    labels) and parameters, other trained parameters."""
    config = Wav2Vec2Config.from_dict(route["config"])
    head = sum(t.numel() for k, t in route["tensors"].items() if is_head(k))
    return {"routed": sum(math.prod(e["shape"]) for e in route["layers"].values()), "kind": head_kind(config),
            "vocab_size": config.vocab_size, "labels": len(config.labels or ()), "head": head,
            "extra": sum(t.numel() for t in route["tensors"].values()) - head}


def print_info(path: str | Path) -> None:
    """Print per-layer density and the storage arithmetic of a route or bundle file."""
    obj = torch_load(path)
    kind = obj.get("format") if isinstance(obj, dict) else None
    if kind not in (ROUTE_FORMAT, BUNDLE_FORMAT):
        raise RouteError(f"{path} is neither a route nor a bundle (it holds {describe(obj)}); for checkpoints use "
                         f"`python -m s3r.analysis sparsity`")
    if kind == BUNDLE_FORMAT:
        routes = {n: check_route(r, f"{path}: route {n!r}") for n, r in obj.get("routes", {}).items()}
    else:
        routes = {Path(path).stem: check_route(obj, str(path))}
    size = Path(path).stat().st_size
    print(f"{path}: {kind}, {size:,} bytes, {len(routes)} route(s)")
    kinds = {}  # head kind -> [routes, bytes of bits, bytes of head and other trained tensors (fp32)]
    for name, route in routes.items():
        s = route_summary(route)
        bits = sum(e["bits"].numel() for e in route["layers"].values())
        kept = sum(e["kept"] for e in route["layers"].values())
        outputs = f"{s['labels']} labels" if s["kind"] == "classification" else f"{s['vocab_size']} outputs"
        print(f"\nroute {name}: {len(route['layers'])} routed tensors, {s['routed']:,} weights, "
              f"density {kept / max(s['routed'], 1):.4f}; bits {bits:,} B ({8 * bits / max(s['routed'], 1):.3f} "
              f"bits/weight), {s['kind']} head {outputs} ({s['head']:,} params), {s['extra']:,} other trained params")
        total = kinds.setdefault(s["kind"], [0, 0, 0])
        total[0], total[1], total[2] = total[0] + 1, total[1] + bits, total[2] + 4 * (s["head"] + s["extra"])
        for layer, e in route["layers"].items():
            shape, density = "x".join(map(str, e["shape"])), e["kept"] / math.prod(e["shape"])
            print(f"  {layer:55s} {shape:>11s}  density {density:.4f}")
    print("\nper head kind (fp32):")
    for kind, (n, bits, tensors) in kinds.items():
        print(f"  {kind}: {n} route(s), masks {bits:,} B, heads and other trained tensors {tensors:,} B, "
              f"total {bits + tensors:,} B")
    config = Wav2Vec2Config.from_dict(next(iter(routes.values()))["config"])
    print(f"\nstorage: {len(routes)} route(s) + shared weights vs {len(routes)} separately finetuned dense model(s)")
    _print_storage(storage(config, [route_summary(r) for r in routes.values()]))
    print(f"\npaper accounting: 11 languages on XLS-R 300M (vocabulary 50), upstream reports {UPSTREAM_REDUCTION}%")
    for name, s in paper_storage().items():
        print(f"  routes over {name}:")
        _print_storage(s, indent="    ")


def _print_storage(s: dict, indent: str = "  ") -> None:
    for dtype in ("fp32", "fp16"):
        d = s[dtype]
        print(f"{indent}{dtype}: dense {d['dense_models_bytes'] / 1e6:,.1f} MB, shared + routes "
              f"{d['shared_plus_routes_bytes'] / 1e6:,.1f} MB, change {d['change_percent']:+.1f}%")


# ----------------------------------------------------------------------------------------------------------------
# Pruning (application 3): one-shot magnitude pruning; the masks of any file


def omp(model: Wav2Vec2ForCTC, prune_rate: float, fix_attn: bool = False,
        route_granularity: str = "weight") -> Wav2Vec2ForCTC:
    """One-shot magnitude pruning: keep the `prune_rate` fraction of largest |W| of every routed tensor, no training
    (structured: of its groups by their mean |W|, i.e. L1 norm: FFN neurons, heads, rows, columns, or n of m).

    The same thing as the first mask of pruning step 2 (init_score weight_magnitude_with_scale: scores = W).
    """
    return model.route(RouteConfig(prune_rate=prune_rate, init_score="weight_magnitude_with_scale", fix_attn=fix_attn,
                                   route_granularity=route_granularity))


def masks_of(path: str | Path, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """Keep-masks by weight name from a route file or any checkpoint (dense: its nonzero attention/FFN weights)."""
    obj = torch_load(path, trust_checkpoint) if Path(path).is_file() else None
    if isinstance(obj, dict) and obj.get("format") == ROUTE_FORMAT:
        return {k: unpack_bits(e["bits"], e["shape"]) for k, e in check_route(obj, str(path))["layers"].items()}
    model = load_pretrained(path, trust_checkpoint=trust_checkpoint)
    if model.route_config is not None:
        return model.masks()
    layers = model.routable_layers(RouteConfig(fix_attn=False))  # attention and FFN, whatever the defaults
    return {f"{n}.weight": m.dense_weight().detach() != 0 for n, m in layers.items()}


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_named(items: list[str]) -> dict[str, str]:
    """NAME=FILE or FILE (named by its stem); names must be unique."""
    named = {}
    for item in items:
        name, _, path = item.rpartition("=") if "=" in item else (Path(item).stem, "", item)
        if name in named:
            raise RouteError(f"two routes are named {name!r}; use NAME=FILE")
        named[name] = path
    return named


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m s3r.routes", description=__doc__,
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
    c.add_argument("--route-granularity", default="weight", help="structured pruning: neuron, head, neuron+head, row, "
                   "column or n:m (see RouteConfig)")
    c.add_argument("--compact", action="store_true", help="write the smaller dense model (neuron/head: s3r.compact)")
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
            bundle = make_bundle(args.pretrained, parse_named(args.routes), trust)
            save_atomic(bundle, args.out)
            print(f"wrote {args.out}: {len(bundle['routes'])} routes, {Path(args.out).stat().st_size:,} bytes")
        elif args.cmd == "info":
            print_info(args.file)
        elif args.cmd == "omp":
            model = omp(load_pretrained(args.checkpoint, trust_checkpoint=trust), args.prune_rate, args.fix_attn,
                        args.route_granularity)
            out = (route_from_model(model, args.checkpoint) if args.route else s3r_checkpoint(compact(model))
                   if args.compact else s3r_checkpoint(fold_masks(model)))
            save_atomic(out, args.out)
            print(f"wrote {args.out}: magnitude-pruned to keep {args.prune_rate} of every "
                  f"{'FFN' if args.fix_attn else 'attention and FFN'} tensor's {args.route_granularity}s")
    except (S3RError, OSError, ValueError) as e:  # ValueError: a config value out of range (--prune-rate 2)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
