"""Structured routes: one S3-Router score per group of weights instead of one per weight.

model.py's core gives every weight its own score (upstream's Linear_ST). The same scores, top-k and
straight-through gradient can cover groups instead (RouteConfig.route_granularity):

    row, column   one score per output / input of a weight (upstream Linear_ST_OutStr / _InStr)
    neuron        one per FFN neuron: its fc2 column (compact.py then cuts the neuron out)
    head          one per attention head: its out_proj columns, the weight seen as (C, H, D)
    neuron+head   both
    n:m           one per weight, n kept of every m consecutive inputs (2:4: the GPU's sparsity)

Row and column scores broadcast onto the weight as they are: model.py's per-weight core (top-k of
|scores|, StraightThrough, whose backward sums dL/dW_eff * W over each group by sum_to_size) runs
unchanged. Heads and n:m need one step more each, which `GroupScores`, a mixin model.py's masked
layers take ahead of Routable, adds: a `view` the weight is seen as so that head scores broadcast
onto it, and the n-of-m selection in place of the top-k. model.py imports this module, which reads
model.py's layers by attribute only.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .errors import ConfigError

GRANULARITIES = ("weight", "row", "column", "neuron", "head", "neuron+head")  # and "n:m", e.g. 2:4


def n_of_m(granularity: str) -> tuple[int, int] | None:
    """(n, m) of an n:m route granularity (n kept of every m consecutive inputs), else None."""
    n, colon, m = granularity.partition(":")
    if colon and not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
        raise ConfigError(f"route granularity {granularity!r} is not n:m with 0 < n < m (e.g. 2:4)")
    return (int(n), int(m)) if colon else None


def n_of_m_mask(values: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask of the n largest of every m consecutive entries along the rows of `values`
    (ties by position)."""
    groups = values.detach().reshape(values.shape[0], -1, m)  # (rows, inputs / m, m)
    keep = groups.argsort(dim=-1, descending=True, stable=True)[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.view_as(values)


class GroupScores:
    """Mixin ahead of model.Routable: a layer whose scores may cover groups of its weights."""
    def drop_scores(self):
        super().drop_scores()
        self.view = None  # the shape the weight is seen as for the scores, None: its own
        self.n_of_m = None  # (n, m): keep n of every m inputs instead of the top-k

    def mask(self) -> torch.Tensor:
        if self.scores is not None and self.n_of_m:
            return n_of_m_mask(self.scores.abs(), *self.n_of_m)
        return super().mask()

    def routed_weight(self) -> torch.Tensor:
        if self.scores is None or self.view is None:
            return super().routed_weight()
        weight = self.dense_weight()
        return self.apply_mask(weight.view(self.view)).view(weight.shape)


def dense_layers(granularity: str) -> tuple[str, ...]:
    """Name endings of the layers a neuron / head route leaves dense (see layer_groups)."""
    ffn = ("intermediate_dense",) if "neuron" in granularity else ()
    attention = ("q_proj", "k_proj", "v_proj") if "head" in granularity else ()
    return ffn + attention


def layer_groups(model, name: str, layer, granularity: str) -> tuple:
    """(granularity, view, extra) of `add_group_scores` for the layer `name` of `model`.

    A neuron (head) is masked at its fc2 column (out_proj columns) alone: that removes it exactly,
    and a dropped one still gets the gradient of putting it back, which masking its fc1 row too
    would zero (its activation would be act(0) = 0). `extra`: (sum of |W| in the other layers that
    belong to each group, their count), so the group's weight-based score is its mean |W|.
    """
    block = model.get_submodule(name.rpartition(".")[0])
    if "neuron" in granularity and hasattr(block, "intermediate_dense"):  # a FeedForward
        fc1 = block.intermediate_dense  # its rows and biases belong to the neurons too
        sums = fc1.weight.abs().sum(1) + fc1.bias.abs()
        return "column", None, (sums, fc1.in_features + 1)
    if "head" in granularity and hasattr(block, "q_proj"):  # an Attention; its q/k/v rows too
        H, D = block.heads, layer.in_features // block.heads
        sums = 0
        for proj in (block.q_proj, block.k_proj, block.v_proj):
            row_sums = proj.weight.abs().sum(1) + proj.bias.abs()  # (H * D,)
            sums = sums + row_sums.view(H, D).sum(1)  # (H,)
        return "column", (layer.out_features, H, D), (sums, 3 * D * (layer.out_features + 1))
    if granularity in ("row", "column") or ":" in granularity:
        return granularity, None, None
    return "weight", None, None  # a neuron route's attention layers, a head route's FFN layers


def route_layer(model, name: str, layer, cfg, init_score: str) -> None:
    """Scores for one layer of `model` under `cfg.route_granularity` (Wav2Vec2ForCTC.route)."""
    granularity, view, extra = layer_groups(model, name, layer, cfg.route_granularity)
    if granularity == "weight":
        layer.add_scores(cfg.prune_rate, init_score, cfg.score_scale)
    else:
        add_group_scores(layer, cfg.prune_rate, init_score, cfg.score_scale, granularity, view,
                         extra)


@torch.no_grad()
def add_group_scores(layer, prune_rate: float, init_score: str = "weight_rank", scale: float = 1.0,
                     granularity: str = "row", view: tuple | None = None,
                     extra: tuple | None = None) -> None:
    """fp32 scores whose mask keeps `prune_rate` of the `row`s / `column`s of the layer's weight
    seen as `view` ((C, H, D): heads), or n of every m weights (`n:m`). The inits follow model.py's
    initial_scores with a group's mean |W| in place of a weight's |W|."""
    weight = layer.dense_weight().detach().float()
    view, nm = tuple(view or weight.shape), n_of_m(granularity)
    m = nm[1] if nm else 1
    if weight[0].numel() % m:
        raise ConfigError(f"route granularity {granularity}: {weight[0].numel()} inputs are not "
                          f"groups of {m}")
    shapes = {"row": view[:1] + (1,) * (len(view) - 1),
              "column": (1, view[1]) + (1,) * (len(view) - 2)}
    scores = weight.new_empty(shapes.get(granularity, view))
    count = weight.numel() // scores.numel() + (extra[1] if extra else 0)  # weights per group
    sums = weight.abs().view(view).sum_to_size(scores.shape)
    if extra:
        sums = sums + extra[0].view_as(scores)
    norms = sums / count  # each group's mean |W|
    if init_score in ("kaiming_uniform", "weight_rank"):
        nn.init.kaiming_uniform_(scores, a=math.sqrt(5))
        if scores.shape != weight.shape:  # one per group, at the per-weight scale
            scores.uniform_(-1, 1).div_(math.sqrt(weight[0].numel()))
        if init_score == "weight_rank":  # rank(|s|) == rank(mean |W|), ties by position
            flat = scores.view(-1)
            flat[norms.flatten().argsort(stable=True)] = flat[flat.abs().argsort(stable=True)]
    elif init_score == "weight_magnitude_with_scale":
        scores.copy_((weight if scores.shape == weight.shape else norms) / scale)
    elif init_score == "weight_magnitude":  # the mask of the mean |W|s, below as 1 and 0
        scores.copy_(norms)
    else:
        raise ConfigError(f"unknown init_score {init_score!r}")
    layer.drop_scores()
    layer.scores = nn.Parameter(scores)
    layer.prune_rate, layer.n_of_m = prune_rate, nm
    layer.view = view if view != weight.shape else None
    if init_score == "weight_magnitude":
        scores.copy_(layer.mask())
