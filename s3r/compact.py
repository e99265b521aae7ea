"""A trained route made dense: its masks folded into real zeros (`fold_masks`), its kept fraction changed
(`set_prune_rate`), and structured routes made physically smaller, so that pruning with S3-Router makes the model
faster.

An unstructured route zeroes single weights, which no dense kernel skips. A route with granularity `neuron`
(one bit per FFN hidden unit) or `head` (one bit per attention head) drops whole rows and columns instead:

    fc1 (F, C) -> (F', C), its bias (F,) -> (F',), fc2 (C, F) -> (C, F')        F' = kept neurons of the layer
    q/k/v (H*D, C) -> (H'*D, C) with their biases, out_proj (C, H*D) -> (C, H'*D)   H' = kept heads, D unchanged

`compact(model)` returns that smaller dense model (per-layer FFN widths and head counts go into its config as
`intermediate_sizes` / `num_heads_per_layer`, which neither fairseq nor transformers can express, so a compact
model saves as an s3r checkpoint, not as a Hugging Face directory); its outputs equal the routed model's up to
float rounding. `python -m s3r.export --compact OUT CKPT` writes it.

An `n:m` route (e.g. 2:4) keeps every matrix's shape; `compact` folds it (zeros in the 2:4 pattern), and
`to_semi_structured(model)` then swaps those weights for torch's semi-structured sparse tensors where the device
and dtype have kernels for them (CUDA, fp16/bf16, compute capability 8.0+); everywhere else they stay dense.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.nn as nn

from .classify import new_model
from .config import Wav2Vec2Config
from .errors import S3RError
from .model import MaskedLinear, Wav2Vec2ForCTC, WeightNormConv1d
from .structured import n_of_m


class CompactError(S3RError):
    """A model that compact() cannot shrink (not routed, or routed per weight)."""


@torch.no_grad()
def fold_masks(model: Wav2Vec2ForCTC) -> Wav2Vec2ForCTC:
    """Multiply every mask into its weight and drop the scores, in place: a plain dense model with real zeros."""
    for module in model.routed().values():
        mask = module.mask()
        if isinstance(module, WeightNormConv1d):  # g becomes the masked weight's norm; where it is 0 any v will do
            w = module.dense_weight() * mask
            module.weight_g.copy_(g := w.norm(dim=(0, 1), keepdim=True))
            module.weight_v.copy_(torch.where(g > 0, w, torch.ones_like(w)))
        else:
            module.weight.view(module.view or module.weight.shape).mul_(mask)  # structured: mask broadcasts
        module.drop_scores()
    model.route_config = None
    return model


def set_prune_rate(model: Wav2Vec2ForCTC, prune_rate: float) -> Wav2Vec2ForCTC:
    """Change the kept fraction of every routed layer after training (masks follow at the next forward)."""
    for module in model.routed().values():
        module.prune_rate = prune_rate
    if model.route_config is not None:
        model.route_config = replace(model.route_config, prune_rate=prune_rate)
    return model


def layer_sizes(config: Wav2Vec2Config) -> list[tuple[int, int]]:
    """(attention heads, FFN width) of every transformer layer."""
    n = config.num_hidden_layers
    return list(zip(config.num_heads_per_layer or (config.num_attention_heads,) * n,
                    config.intermediate_sizes or (config.intermediate_size,) * n, strict=True))


def kept_groups(model: Wav2Vec2ForCTC) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Per transformer layer: (kept heads (H,) bool or None, kept FFN neurons (F,) bool or None) of the route."""
    g = model.route_config.route_granularity if model.route_config is not None else "weight"
    out = []
    for layer in model.encoder.layers:
        out_proj, fc2 = layer.attention.out_proj, layer.feed_forward.output_dense
        heads = out_proj.mask().flatten() if "head" in g and out_proj.scores is not None else None
        neurons = fc2.mask().flatten() if "neuron" in g and fc2.scores is not None else None
        out.append((heads, neurons))
    return out


@torch.no_grad()
def compact(model: Wav2Vec2ForCTC) -> Wav2Vec2ForCTC:
    """The dense model without the FFN neurons and attention heads `model`'s route drops; `model` is unchanged.

    Routed layers that are not cut (per-weight, row, column or n:m routes, and attention under a `neuron` route)
    get their masks folded in as zeros (`fold_masks`).
    """
    source = getattr(model, "source", "model")
    if model.route_config is None:
        raise CompactError(f"{source} is not a routed model; there is nothing to compact")
    g = model.route_config.route_granularity
    if "neuron" not in g and "head" not in g and n_of_m(g) is None:
        raise CompactError(f"{source} is routed per {g}, which drops no whole neuron or head; "
                           f"export it with --dense (route with --route-granularity neuron, head or neuron+head)")
    groups = kept_groups(model)
    dense = fold_masks(copy.deepcopy(model))
    config = dense.config
    head_dim = config.hidden_size // config.num_attention_heads
    state = dense.state_dict()
    full, heads_per_layer, widths = layer_sizes(config), [], []
    for i, (heads, neurons) in enumerate(groups):
        attn, ffn = f"encoder.layers.{i}.attention.", f"encoder.layers.{i}.feed_forward."
        if heads is not None:
            rows = (heads.nonzero() * head_dim + torch.arange(head_dim, device=heads.device)).flatten()  # (H' * D,)
            for proj in ("q_proj", "k_proj", "v_proj"):
                for p in ("weight", "bias"):
                    state[attn + f"{proj}.{p}"] = state[attn + f"{proj}.{p}"][rows]
            state[attn + "out_proj.weight"] = state[attn + "out_proj.weight"][:, rows]
        heads_per_layer.append(int(heads.sum()) if heads is not None else full[i][0])
        if neurons is not None:
            for p in ("weight", "bias"):
                state[ffn + f"intermediate_dense.{p}"] = state[ffn + f"intermediate_dense.{p}"][neurons]
            state[ffn + "output_dense.weight"] = state[ffn + "output_dense.weight"][:, neurons]
        widths.append(int(neurons.sum()) if neurons is not None else full[i][1])
    config = replace(config,
                     num_heads_per_layer=None if heads_per_layer == [h for h, _ in full] else tuple(heads_per_layer),
                     intermediate_sizes=None if widths == [f for _, f in full] else tuple(widths))
    param = next(model.parameters())
    small = new_model(config).to(param.device, param.dtype)  # a classifier stays one
    small.load_state_dict(state)
    small.vocab, small.source = getattr(model, "vocab", None), f"compact({source})"
    return small.requires_grad_(False).train(model.training)


def parameter_counts(model: Wav2Vec2ForCTC) -> dict[str, int]:
    """Parameters of the attention blocks, the FFNs and the whole model, scores excluded."""
    counts = {"attention": 0, "ffn": 0, "total": 0}
    for name, p in model.named_parameters():
        if not name.endswith(".scores"):
            counts["total"] += p.numel()
            counts["attention"] += p.numel() * (".attention." in name)
            counts["ffn"] += p.numel() * (".feed_forward." in name)
    return counts


def is_n_of_m(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every m consecutive weights along the input dimension hold at most n nonzeros."""
    if weight.dim() != 2 or weight.shape[1] % m:
        return False
    return bool((weight.reshape(weight.shape[0], -1, m) != 0).sum(-1).le(n).all())


def semi_structured_supported(weight: torch.Tensor) -> bool:
    """Whether torch has 2:4 sparse kernels for this weight's device and dtype (CUDA fp16/bf16, sm 8.0+)."""
    return (weight.is_cuda and weight.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(weight.device) >= (8, 0))


@torch.no_grad()
def to_semi_structured(model: Wav2Vec2ForCTC) -> int:
    """Swap every dense 2:4-patterned transformer linear weight for a semi-structured sparse tensor, in place.

    Returns how many layers were converted: 0 on CPU, in fp32, or for weights without the 2:4 pattern (those stay
    dense, as do shapes the kernels refuse). Inference only: the sparse weights are frozen. Run it after moving the
    model to its CUDA device and fp16/bf16 dtype.
    """
    from torch.sparse import to_sparse_semi_structured
    converted = 0
    for layer in model.encoder.layers:
        for module in layer.modules():
            if not isinstance(module, MaskedLinear) or module.scores is not None:
                continue
            w = module.weight
            if not (semi_structured_supported(w) and is_n_of_m(w, 2, 4)):
                continue
            try:
                module.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
            except RuntimeError:  # a shape the kernels do not take (they need multiples of 32/64): stays dense
                continue
            converted += 1
    return converted
