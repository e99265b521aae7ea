"""The route format: what a route file holds, its bit packing, and installing one on a model.

This is the low layer of routes: it reads no files and loads no checkpoints, so `s3r.checkpoint` can install the
route given to `load_pretrained(..., route=...)` and `s3r.routes` (exporting, bundling, the command line) can sit
above `s3r.checkpoint` without an import circle. Users import these names from `s3r.routes`.

Bit order of a route (same as `numpy.packbits(mask.flatten(), bitorder="big")`): the weight tensor is flattened
in row-major order, weight i goes to byte i // 8, bit 7 - i % 8 (the first weight is the most significant bit),
1 = kept; the last byte is padded with zeros. Each layer's bits start on a fresh byte. A structured route
(`RouteConfig.route_granularity` row, column, neuron, head) stores one bit per group: the layer's `shape` is
that of its scores, e.g. (1, F) for fc2's neurons, and `view` the weight's shape as they broadcast onto it
(out_proj's heads: shape (1, H, 1), view (C, H, D)).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .classify import with_head
from .config import RouteConfig, Wav2Vec2Config
from .errors import S3RError
from .model import Routable, Wav2Vec2ForCTC, kept_count
from .text import Vocabulary

ROUTE_FORMAT, BUNDLE_FORMAT = "s3r-route", "s3r-bundle"
BIT_ORDER = "row-major flatten; weight i -> byte i//8, bit 7 - i%8 (MSB first, numpy.packbits bitorder=big); 1 = kept"
ROUTE_KEYS = ("weights_fingerprint", "config", "route", "vocab", "layers", "tensors")


class RouteError(S3RError):
    """A route or bundle file that does not fit: wrong format, or learned on other weights."""


_BIT_VALUES = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
_BYTE_BITS = (torch.arange(256, dtype=torch.uint8)[:, None] & _BIT_VALUES).ne(0)  # (256, 8): byte -> its 8 bits


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 (ceil(numel / 8),), MSB first; exactly numpy.packbits of the flattened mask."""
    flat = mask.detach().flatten().cpu().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])  # pad the last byte with zeros
    return (flat.view(-1, 8) * _BIT_VALUES).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Inverse of pack_bits: the bool tensor of `shape` (padding bits dropped)."""
    n = math.prod(shape)
    if packed.numel() != (n + 7) // 8:
        raise RouteError(f"{packed.numel()} packed bytes cannot hold a mask of shape {tuple(shape)}")
    # A table lookup per byte: 5x faster than masking each byte with the 8 bit values (route switching unpacks
    # every routed weight of the model, 85M for wav2vec2-base).
    return _BYTE_BITS.index_select(0, packed.flatten().int()).view(-1)[:n].view(*shape)


def describe(obj: object) -> str:
    """What a file holds, for error messages: an s3r checkpoint, a route, a fairseq checkpoint, a list..."""
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    if obj.get("format") is not None:
        return {"s3r": "an s3r checkpoint", ROUTE_FORMAT: "a route", BUNDLE_FORMAT: "a route bundle"}.get(
            obj["format"], f"format {obj['format']!r}")
    if "model" in obj and ("cfg" in obj or "args" in obj):
        return "a fairseq checkpoint"
    return f"a dict with keys {', '.join(sorted(map(str, obj))[:6])}"


def check_route(obj: object, name: str) -> dict:
    """`obj` if it is a route dict (format and every key present), else a RouteError naming `name`."""
    if not isinstance(obj, dict) or obj.get("format") != ROUTE_FORMAT:
        raise RouteError(f"{name} is not an s3r route file (it holds {describe(obj)}); "
                         f"make one with `python -m s3r.routes export CKPT OUT`")
    missing = [k for k in ROUTE_KEYS if k not in obj]
    if missing:
        raise RouteError(f"{name}: route file without {', '.join(missing)} (truncated or written by another tool)")
    return obj


@torch.no_grad()
def fix_mask(module: Routable, mask: torch.Tensor, view: tuple | None = None, kept: int | None = None) -> None:
    """Route `module` with a given keep-mask, for inference: frozen 0/1 scores whose top-k is exactly `mask`.

    The scores are the mask's own bytes seen as uint8 (1 byte per weight, no copy; fp32 would take 4 and a
    conversion), so a bundle switches routes in a few hundredths of a second at wav2vec2-base size. uint8 cannot
    require a gradient: training a route goes through `Wav2Vec2ForCTC.route`, which makes fp32 scores.
    """
    module.drop_scores()
    mask = mask.to(module.dense_weight().device, torch.bool).contiguous()
    module.scores = nn.Parameter(mask.view(torch.uint8), requires_grad=False)
    kept, n = int(torch.count_nonzero(mask)) if kept is None else kept, mask.numel()  # a route records `kept`
    module.prune_rate = kept / n
    while kept_count(n, module.prune_rate) != kept:  # a float ulp at a time until kept_count gives back `kept`
        module.prune_rate = math.nextafter(module.prune_rate, 1.0 if kept_count(n, module.prune_rate) < kept else 0.0)
    module._mask_cache.install(module.scores, kept, mask)  # switching routes: no selection
    module.view = tuple(view) if view is not None and tuple(view) != module.dense_weight().shape else None


def install_route(model: Wav2Vec2ForCTC, route: dict, fingerprint: str, name: str = "route") -> Wav2Vec2ForCTC:
    """Install a checked route dict on `model` (masks, head, trained tensors, vocabulary); every tensor ends frozen.
    Returns the model with the route's head: `model` itself, or (a route of the other kind, CTC or classification)
    a model of that kind sharing `model`'s encoder modules (s3r/classify.py `with_head`).

    `fingerprint` is `checkpoint.weights_fingerprint(model)` (the caller hashes, bundles hash once): the route is
    refused unless it was learned on exactly these weights. The fixed 0/1 scores are for inference: to continue
    training a route, load its checkpoint instead (a 0 score never gets a gradient through |s|).
    """
    want = route["weights_fingerprint"]
    if fingerprint != want:
        raise RouteError(f"{name} was learned on weights {want[:16]}, but {getattr(model, 'source', 'the model')} "
                         f"has weights {fingerprint[:16]} (sha256 prefixes); load the pretrained checkpoint it was "
                         f"trained on")
    routable = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, Routable)}
    unknown = sorted(set(route["layers"]) - set(routable))
    if unknown:
        raise RouteError(f"{name}: route layer {unknown[0]} is not a routable layer of the model")
    config = Wav2Vec2Config.from_dict(route["config"])
    model = with_head(model, config)
    for weight, module in routable.items():
        entry = route["layers"].get(weight)
        if entry is not None:
            shape, view = tuple(entry["shape"]), tuple(entry.get("view", entry["shape"]))
            if (math.prod(view) != module.dense_weight().numel() or len(shape) != len(view)
                    or any(s not in (1, v) for s, v in zip(shape, view, strict=True))):
                raise RouteError(f"{name}: route layer {weight} of shape {shape} does not fit its weight "
                                 f"{tuple(module.dense_weight().shape)}")
            fix_mask(module, unpack_bits(entry["bits"], shape), entry.get("view"), entry["kept"])
        elif module.scores is not None:  # routed by an earlier route, not by this one: dense again
            module.drop_scores()
    params = dict(model.named_parameters())  # (not state_dict(): a tenth of the time, bundles switch often)
    for key, tensor in route["tensors"].items():
        if key not in params or params[key].shape != tensor.shape:
            raise RouteError(f"{name}: route tensor {key} {tuple(tensor.shape)} does not fit the model")
        with torch.no_grad():
            params[key].copy_(tensor)
    model.config, model.route_config = config, RouteConfig(**route["route"])
    model.vocab = Vocabulary.from_dict(route["vocab"]) if route["vocab"] is not None else None
    return model.requires_grad_(False)
