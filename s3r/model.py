"""wav2vec 2.0 (and data2vec-audio, HuBERT) as one readable file, with S3-Router's score-masked layers.

The encoder follows fairseq `models/wav2vec/wav2vec2.py` numerically and Hugging Face
`models/wav2vec2/modeling_wav2vec2.py` in its module names, so that HF checkpoints load by dropping the
`wav2vec2.` prefix and fairseq checkpoints load through a short table (see `checkpoint.py`):

    waveform (B, S)
      -> FeatureExtractor       7 strided convs, 320x downsampling          (paper Sec. 2, fairseq ConvFeatureExtractionModel)
      -> FeatureProjection      LayerNorm + Linear 512 -> C                   (fairseq layer_norm + post_extract_proj)
      -> [time/channel masking] SpecAugment with the learned `masked_spec_embed` (training only; fairseq apply_mask)
      -> Encoder                positional conv + N transformer layers        (fairseq TransformerEncoder)
      -> lm_head                CTC logits over the vocabulary                (fairseq w2v_encoder.proj)

S3-Router ("Losses Can Be Blessings", Fu et al., NeurIPS 2022, Sec. 3) keeps every pretrained weight frozen and
learns, per weight tensor, a real-valued `scores` tensor of the same shape. The forward pass uses
`weight * mask`, where the mask keeps the entries with the largest `|scores|`; the backward pass treats the
hard top-k as the identity (straight-through), so the scores receive `dL/dW_eff * W` (times `sign(scores)`
from the absolute value). `MaskedLinear` and `MaskedConv1d` below are plain `nn.Linear` / `nn.Conv1d` until
`route()` gives them scores, so one model class serves dense finetuning, masked finetuning and inference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import S3RError


# ----------------------------------------------------------------------------------------------------------------
# Configuration


class ConfigError(S3RError, ValueError):
    """An impossible Wav2Vec2Config or RouteConfig (a ValueError too, for code that catches those)."""


@dataclass
class Wav2Vec2Config:
    """Architecture and regularisation of one encoder; saved inside every s3r checkpoint."""

    # feature extractor: fairseq `conv_feature_layers` = "[(512,10,5)] + [(512,3,2)]*4 + [(512,2,2)]*2"
    conv_dim: tuple = (512, 512, 512, 512, 512, 512, 512)  # fairseq conv_feature_layers[i][0]; HF conv_dim
    conv_kernel: tuple = (10, 3, 3, 3, 3, 2, 2)  # fairseq conv_feature_layers[i][1]; HF conv_kernel
    conv_stride: tuple = (5, 2, 2, 2, 2, 2, 2)  # fairseq conv_feature_layers[i][2]; HF conv_stride
    conv_bias: bool = False  # fairseq conv_bias; HF conv_bias
    feat_extract_norm: str = "group"  # fairseq extractor_mode default|layer_norm; HF feat_extract_norm group|layer
    # transformer
    hidden_size: int = 768  # fairseq encoder_embed_dim; HF hidden_size
    num_hidden_layers: int = 12  # fairseq encoder_layers; HF num_hidden_layers
    num_attention_heads: int = 12  # fairseq encoder_attention_heads; HF num_attention_heads
    intermediate_size: int = 3072  # fairseq encoder_ffn_embed_dim; HF intermediate_size
    hidden_act: str = "gelu"  # fairseq activation_fn; HF hidden_act
    layer_norm_first: bool = False  # fairseq layer_norm_first; HF do_stable_layer_norm (pre-LN: large, XLS-R)
    layer_norm_eps: float = 1e-5  # fairseq uses torch's default; HF layer_norm_eps
    feat_proj_layer_norm: bool = True  # fairseq always normalises the features; HF feat_proj_layer_norm (HuBERT)
    # positional convolution
    conv_pos_kernel: int = 128  # fairseq conv_pos (data2vec: per layer max(3, conv_pos // depth)); HF num_conv_pos_embeddings (data2vec: conv_pos_kernel_size)
    conv_pos_groups: int = 16  # fairseq conv_pos_groups; HF num_conv_pos_embedding_groups
    conv_pos_depth: int = 1  # fairseq pos_conv_depth (data2vec 5: a stack without weight norm); HF data2vec num_conv_pos_embeddings
    # CTC head and input
    vocab_size: int = 0  # size of the CTC output layer; 0 = no head, the model returns hidden states; HF vocab_size
    normalize: bool = False  # zero-mean unit-variance waveform input; fairseq task.normalize; HF feature_extractor do_normalize
    # regularisation (training only)
    hidden_dropout: float = 0.1  # fairseq dropout; HF hidden_dropout
    attention_dropout: float = 0.1  # fairseq attention_dropout; HF attention_dropout
    activation_dropout: float = 0.1  # fairseq activation_dropout; HF activation_dropout
    feat_proj_dropout: float = 0.0  # fairseq dropout_input; HF feat_proj_dropout
    final_dropout: float = 0.0  # fairseq final_dropout (before the CTC head); HF final_dropout
    layerdrop: float = 0.1  # fairseq layerdrop; HF layerdrop
    mask_time_prob: float = 0.0  # fairseq mask_prob; HF mask_time_prob
    mask_time_length: int = 10  # fairseq mask_length; HF mask_time_length
    mask_feature_prob: float = 0.0  # fairseq mask_channel_prob; HF mask_feature_prob
    mask_feature_length: int = 64  # fairseq mask_channel_length; HF mask_feature_length
    gradient_checkpointing: bool = False  # fairseq checkpoint_activations; HF gradient_checkpointing
    # per-layer widths of a compacted neuron/head route (s3r/compact.py); None = the same in every layer. Neither
    # fairseq nor HF has these; the head size stays hidden_size // num_attention_heads
    intermediate_sizes: tuple | None = None
    num_heads_per_layer: tuple | None = None

    def __post_init__(self):
        self.conv_dim, self.conv_kernel, self.conv_stride = (tuple(int(v) for v in t)
                                                            for t in (self.conv_dim, self.conv_kernel, self.conv_stride))
        if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride):
            raise ConfigError("conv_dim, conv_kernel and conv_stride must have the same length")
        if self.feat_extract_norm not in ("group", "layer"):
            raise ConfigError(f"feat_extract_norm must be 'group' or 'layer', not {self.feat_extract_norm!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        for name in ("intermediate_sizes", "num_heads_per_layer"):
            if (sizes := getattr(self, name)) is not None:
                setattr(self, name, sizes := tuple(int(v) for v in sizes))
                if len(sizes) != self.num_hidden_layers or min(sizes) < 1:
                    raise ConfigError(f"{name} needs {self.num_hidden_layers} values >= 1, not {list(sizes)}")

    def layer_sizes(self, i: int) -> tuple[int, int]:
        """(attention heads, FFN width) of transformer layer i."""
        return ((self.num_heads_per_layer or (self.num_attention_heads,) * (i + 1))[i],
                (self.intermediate_sizes or (self.intermediate_size,) * (i + 1))[i])

    @classmethod
    def preset(cls, name: str, **overrides) -> "Wav2Vec2Config":
        """The published architectures: base, large (lv60), xlsr (300M), data2vec-base, hubert-base."""
        large = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                     feat_extract_norm="layer", conv_bias=True, layer_norm_first=True, normalize=True)
        presets = {
            "base": {},
            "hubert-base": {},
            "large": large,
            "xlsr": large,  # XLS-R 300M has the large-lv60 architecture
            "data2vec-base": dict(feat_extract_norm="layer", conv_pos_kernel=19, conv_pos_depth=5, normalize=True),
        }
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r}; choose from {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Wav2Vec2Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown Wav2Vec2Config field(s): {', '.join(unknown)}")
        return cls(**d)


INIT_SCORES = ("kaiming_uniform", "weight_rank", "weight_magnitude_with_scale", "weight_magnitude")
# What one score (one bit of the route) covers in the transformer's linear layers; also "n:m", e.g. "2:4".
GRANULARITIES = ("weight", "row", "column", "neuron", "head", "neuron+head")


def n_of_m(granularity: str) -> tuple[int, int] | None:
    """(n, m) of an "n:m" granularity (keep n of every m consecutive weights along the input), else None."""
    n, colon, m = granularity.partition(":")
    if not colon:
        return None
    if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
        raise ConfigError(f"route granularity {granularity!r} is not n:m with 0 < n < m (e.g. 2:4)")
    return int(n), int(m)


@dataclass
class RouteConfig:
    """Which layers S3-Router masks and what else stays trainable (upstream `wav2vec_ctc_st` options)."""

    # `prune_rate` keeps upstream's name and meaning: the fraction of each routed weight tensor that is KEPT.
    # 0.9 keeps 90% of the weights (10% sparsity); 0.3 keeps 30% (70% sparsity, the pruning recipe).
    prune_rate: float = 0.9  # upstream model.prune_rate
    init_score: str = "kaiming_uniform"  # upstream model.init_score, one of INIT_SCORES
    score_scale: float = 1.0  # upstream model.scale: scores = W / scale for weight_magnitude_with_scale
    fix_attn: bool = False  # upstream model.fix_attn: q/k/v/out stay dense (only the FFN is routed)
    fix_fc: bool = False  # upstream model.fix_fc: fc1/fc2 stay dense (only attention is routed)
    route_feature_extractor: bool = False  # also mask the conv feature extractor (upstream: never)
    route_pos_conv: bool = False  # also mask the positional conv (upstream: never)
    route_feature_projection: bool = False  # also mask post_extract_proj (upstream: disabled in every yaml)
    trainable_proj: bool = True  # upstream model.trainable_proj; upstream defaults to False (a random frozen
    #                              head), every upstream README command sets it True, so it is our default
    trainable_bias: bool = False  # upstream model.trainable_bias
    trainable_layer_norm: bool = False  # upstream model.trainable_layer_norm
    trainable_pos: bool = False  # upstream model.trainable_pos (positional conv)
    trainable_feature_projection: bool = False  # upstream model.trainable_post_extract_proj
    co_train: bool = False  # upstream model.co_train: weights train together with the masks
    # One score per weight (upstream); per output row / input column (upstream Linear_ST_OutStr / InStr); per FFN
    # neuron (its fc1 row and bias, its fc2 column) and/or attention head (q/k/v rows, out_proj columns), which
    # s3r/compact.py cuts out of the matrices; or n:m (n of m consecutive weights, GPU semi-structured sparsity).
    route_granularity: str = "weight"

    def __post_init__(self):
        if not 0.0 < self.prune_rate <= 1.0:
            raise ConfigError(f"prune_rate is the fraction of weights kept and must be in (0, 1], not {self.prune_rate}")
        if self.init_score not in INIT_SCORES:
            raise ConfigError(f"unknown init_score {self.init_score!r}; choose from {', '.join(INIT_SCORES)}")
        nm, g = n_of_m(self.route_granularity), self.route_granularity
        if nm is None and g not in GRANULARITIES:
            raise ConfigError(f"unknown route_granularity {g!r}; choose from {', '.join(GRANULARITIES)} or n:m")
        if nm is not None and abs(self.prune_rate - nm[0] / nm[1]) > 1e-9:
            raise ConfigError(f"route_granularity {g} keeps {nm[0]}/{nm[1]} of the weights: set prune_rate to "
                              f"{nm[0] / nm[1]:g}, not {self.prune_rate}")
        if ("neuron" in g and self.fix_fc) or ("head" in g and self.fix_attn):
            raise ConfigError(f"route_granularity {g} routes {'FFN neurons' if 'neuron' in g else 'attention heads'}, "
                              f"which {'fix_fc' if 'neuron' in g else 'fix_attn'} keeps dense")
        if self.fix_attn and self.fix_fc:
            raise ConfigError("fix_attn and fix_fc together leave nothing to route (to train the CTC head alone, "
                              "keep every weight: prune_rate 1.0)")


# ----------------------------------------------------------------------------------------------------------------
# S3-Router: score-masked layers


def topk_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly the k largest entries of `values` (magnitude pruning when given |W|)."""
    flat = values.detach().flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask[flat.topk(k, sorted=False).indices] = True
    return mask.view_as(values)


def kept_count(numel: int, prune_rate: float) -> int:
    """How many of `numel` entries (weights or groups) a tensor keeps: upstream's `numel - int((1 - p) * numel)`."""
    return numel - int((1 - prune_rate) * numel)


def select_mask(scores: torch.Tensor, prune_rate: float, granularity: str = "weight") -> torch.Tensor:
    """Keep-mask shaped like `scores`: the kept_count largest |scores| of the tensor (one per group for structured
    routes), or for "n:m" the n largest of every m consecutive scores along the input dimension (ties by position)."""
    a = scores.detach().abs()
    if (nm := n_of_m(granularity)) is None:
        return topk_mask(a, kept_count(a.numel(), prune_rate))
    groups = a.reshape(a.shape[0], -1, nm[1])  # (out, in / m, m)
    keep = groups.argsort(dim=-1, descending=True, stable=True)[..., : nm[0]]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).view_as(a)


def _kth_largest(a: torch.Tensor, k: int, hint: float | None, band: float) -> float:
    """The k-th largest value of the 1-D tensor `a`.

    A full selection (`kthvalue`) over millions of scores each step is expensive, but after one optimizer step
    the threshold moves very little. So look first at the few values within `band` of last step's threshold:
    if the k-th largest lies among them, select there; otherwise fall back to the full selection.
    """
    n = a.numel()
    if hint is not None:
        lo, hi = hint - band, hint + band
        n_above = int(torch.count_nonzero(a > hi))
        if n_above < k:
            near = a[(a >= lo) & (a <= hi)]
            if n_above + near.numel() >= k:
                return near.kthvalue(near.numel() - (k - n_above) + 1).values.item()
    return a.kthvalue(n - k + 1).values.item()


class _StraightThrough(torch.autograd.Function):
    """`weight * mask` forward; backward passes dL/dW_eff through the hard top-k to the scores unchanged."""

    @staticmethod
    def forward(ctx, scores, weight, mask):
        ctx.save_for_backward(scores, weight, mask)
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        scores, weight, mask = ctx.saved_tensors
        # dL/d|s| = dL/dW_eff * W (the top-k is treated as the identity); d|s|/ds = sign(s), as upstream,
        # so scores sitting at exactly 0 get no gradient (the `weight_magnitude` trap, see RouteConfig).
        # One score per group (structured routes): the weight is viewed so that the scores broadcast onto it, and
        # the group's score gets the sum over its weights.
        grad_scores = (grad * weight).sum_to_size(scores.shape).mul_(scores.sign()) if ctx.needs_input_grad[0] else None
        grad_weight = grad * mask if ctx.needs_input_grad[1] else None  # co_train: W learns where it is kept
        return grad_scores, grad_weight, None


# Fused optimizers (Adam(fused=True) and friends) update parameters in place without bumping their version counter,
# so the mask cache also keys on this count of optimizer steps, taken by a global post-step hook.
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs):
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class Routable:
    """Mixin for a layer whose weight can be routed: `scores` is None (dense) until `route()` is called."""

    scores: nn.Parameter | None
    prune_rate: float

    def _init_routing(self):
        self.register_parameter("scores", None)
        self.prune_rate = 1.0
        self._mask_key = None  # (scores version, address, prune_rate, optimizer steps) of the cached mask
        self._mask = None
        self.granularity, self.view = "weight", None  # view: the weight's shape as the scores broadcast onto it
        self._threshold: float | None = None
        self._band = 0.0

    def dense_weight(self) -> torch.Tensor:
        return self.weight

    @torch.no_grad()
    def route(self, prune_rate: float, init_score: str = "kaiming_uniform", scale: float = 1.0,
              granularity: str = "weight", view: tuple | None = None, extra: tuple | None = None):
        """Give this layer scores (fp32) and keep `prune_rate` of its weights, or of its groups of weights.

        `granularity` "row"/"column" gives one score per output row / input column of `view` (the weight's shape
        unless given, e.g. (C, H, D) for one score per attention head); "n:m" one per weight, selected n of m.
        `extra` = (sum of |W|, count) per group from other layers sharing the groups (fc1 rows of fc2's neurons).
        """
        weight = self.dense_weight().detach().float()
        view = tuple(view or weight.shape)
        if (nm := n_of_m(granularity)) and weight[0].numel() % nm[1]:
            raise ConfigError(f"route granularity {granularity}: {weight[0].numel()} inputs are not groups of {nm[1]}")
        shape = {"row": view[:1] + (1,) * (len(view) - 1),
                 "column": (1, view[1]) + (1,) * (len(view) - 2)}.get(granularity, view)
        scores = torch.empty(shape, device=weight.device)
        # a group's magnitude: the mean |W| over its weights (ranks as upstream's L1 norms, scaled as one weight)
        norms = weight.abs().view(view).sum_to_size(shape)
        count = weight.numel() // scores.numel()
        if extra is not None:
            norms, count = norms + extra[0].view(shape), count + extra[1]
        norms /= count
        if init_score in ("kaiming_uniform", "weight_rank"):
            nn.init.kaiming_uniform_(scores, a=math.sqrt(5))  # nn.Linear's own init: |s| ~ 1/sqrt(fan_in)
            if shape != weight.shape:  # one score per group, at the scale the per-weight scores have (upstream
                scores.uniform_(-1, 1).div_(math.sqrt(weight[0].numel()))  # draws on the score's own shape)
            if init_score == "weight_rank":
                # Reorder the random scores so that rank(|s|) == rank(|W|): the first mask is per-tensor magnitude
                # pruning, yet the scores keep kaiming scale so that Adam at lr 5e-5 can still reorder them.
                flat = scores.flatten()
                by_size = flat[flat.abs().argsort()]
                flat[norms.flatten().argsort()] = by_size
        elif init_score == "weight_magnitude_with_scale":
            scores.copy_(weight / scale if shape == weight.shape else norms / scale)
        elif init_score == "weight_magnitude":
            # Scores of exactly 1 (kept) and 0 (pruned). A pruned score never receives a gradient through |s|
            # at 0, so this mask can only shrink, never grow: kept for fidelity to upstream, rarely what you want.
            k = round(prune_rate * weight.numel())
            scores.copy_(topk_mask(weight.abs(), k) if granularity == "weight" else
                         select_mask(norms, prune_rate, granularity))
        else:
            raise ConfigError(f"unknown init_score {init_score!r}; choose from {', '.join(INIT_SCORES)}")
        self.scores = nn.Parameter(scores)
        self.prune_rate = prune_rate
        self.granularity, self.view = granularity, (view if view != tuple(weight.shape) else None)
        self._mask_key = None

    @torch.no_grad()
    def fix_mask(self, mask: torch.Tensor, view: tuple | None = None):
        """Route with a given keep-mask, for inference: frozen 0/1 scores whose top-k is exactly `mask`, with the
        mask cached as if selected (switching routes costs no selection). A 0 score never learns (see RouteConfig)."""
        self._init_routing()
        self.scores = nn.Parameter(mask.to(self.dense_weight().device, torch.float32), requires_grad=False)
        self.prune_rate = int(mask.sum()) / mask.numel()
        self._mask = self.scores.detach() > 0  # what mask() would select: ties at 1 are all kept, k = mask.sum()
        if mask.shape != self.dense_weight().shape:  # one bit per group: any structured selection of k groups
            self.granularity, self.view = "column", (tuple(view) if view is not None else None)
        self._mask_key = (self.scores._version, self.scores.data_ptr(), self.prune_rate, _optimizer_steps)

    @torch.compiler.disable  # data-dependent selection and a cache: eager, once per optimizer step
    @torch.no_grad()
    def mask(self) -> torch.Tensor:
        """The boolean keep-mask: exactly round(prune_rate * numel) entries with the largest |scores|.

        Recomputed only when the scores changed (an optimizer step bumps their version counter), so
        gradient accumulation and evaluation pay for one selection, not one per forward pass.
        """
        if self.scores is None:
            return torch.ones_like(self.dense_weight(), dtype=torch.bool)
        key = (self.scores._version, self.scores.data_ptr(), self.prune_rate, _optimizer_steps)
        if key != self._mask_key:
            a = self.scores.detach().abs().flatten()
            n, k = a.numel(), round(self.prune_rate * a.numel())
            if self.granularity != "weight":
                mask = select_mask(self.scores, self.prune_rate, self.granularity)
            elif k >= n:
                mask = torch.ones_like(a, dtype=torch.bool)
            elif k == 0:
                mask = torch.zeros_like(a, dtype=torch.bool)
            else:
                threshold = _kth_largest(a, k, self._threshold, self._band)
                mask = a >= threshold
                surplus = int(torch.count_nonzero(mask)) - k  # (count_nonzero: 4x faster than sum over bools)
                if surplus > 0:  # ties at the threshold: keep the first ones by position
                    tied = torch.nonzero(a == threshold).squeeze(1)
                    mask[tied[-surplus:]] = False
                if self._threshold is not None:  # next step looks within 4x this step's move (at least 1e-4 relative)
                    self._band = max(4 * abs(threshold - self._threshold), 1e-4 * abs(threshold))
                self._threshold = threshold
            self._mask, self._mask_key = mask.view_as(self.scores), key
        return self._mask

    def weight_mask(self) -> torch.Tensor:
        """The keep-mask on the weight's shape (mask() has the scores' shape: one entry per group when structured)."""
        weight = self.dense_weight()
        return self.mask().expand(self.view or weight.shape).reshape(weight.shape)

    def routed_weight(self) -> torch.Tensor:
        weight = self.dense_weight()
        if self.scores is None:
            return weight
        mask, w = self.mask(), weight.view(self.view or weight.shape)
        if not torch.is_grad_enabled():
            return (w * mask).view(weight.shape)
        return _StraightThrough.apply(self.scores, w, mask).view(weight.shape)


class MaskedLinear(Routable, nn.Linear):
    """nn.Linear whose weight S3-Router can mask; same `weight`/`bias` keys, plus `scores` once routed."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        self._init_routing()

    def forward(self, x):
        return F.linear(x, self.routed_weight(), self.bias)


class MaskedConv1d(Routable, nn.Conv1d):
    """nn.Conv1d whose weight S3-Router can mask."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups, bias=bias)
        self._init_routing()

    def forward(self, x):
        weight = self.routed_weight()
        simple = self.stride == self.dilation == (1,) and self.padding_mode == "zeros" and self.padding != "same"
        if self.groups > 1 and simple and x.device.type == "cpu":  # the positional convs: see GroupedConv1d
            return GroupedConv1d.apply(x, weight, self.bias, self.padding[0], self.groups)
        return self._conv_forward(x, weight, self.bias)


class GroupedConv1d(torch.autograd.Function):
    """F.conv1d (stride 1, groups) whose backward computes both gradients as forward convolutions.

    For the positional conv's long grouped kernel (128 taps, 16 groups) oneDNN's backward kernels are 2-3x slower
    on CPU than its forward, which makes the weight-finetuning step ~5% slower than it need be. Both gradients are
    convolutions themselves: dL/dx correlates dL/dy with the flipped kernel (inputs and outputs swapped per group),
    dL/dw correlates x with dL/dy (the batch taking the place of the channels).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, weight, bias, padding: int, groups: int):  # x (B, C_in, T) -> (B, C_out, T + 2P - K + 1)
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.groups = padding, groups
        return F.conv1d(x, weight, bias, padding=padding, groups=groups)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad):  # grad (B, C_out, T_out)
        x, weight = ctx.saved_tensors
        P, G = ctx.padding, ctx.groups
        (B, _, T), (C_out, I, K) = x.shape, weight.shape
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # dL/dx[i, s] = sum_o,k w[o, i, k] dL/dy[o, s + P - k]
            w_t = weight.view(G, C_out // G, I, K).transpose(1, 2).flip(-1).reshape(G * I, C_out // G, K)
            grad_x = F.conv1d(grad, w_t.to(grad.dtype), padding=K - 1 - P, groups=G)  # (B, C_in, T)
        if ctx.needs_input_grad[1]:  # dL/dw[o, i, k] = sum_b,t dL/dy[b, o, t] x_padded[b, i, t + k]
            x_pad = F.pad(x, (P, P)).view(B, G, I, -1).permute(2, 1, 0, 3).reshape(I, G * B, -1)  # (I, G*B, T + 2P)
            g = grad.view(B, G, C_out // G, -1).permute(1, 2, 0, 3).reshape(C_out, B, -1)  # (C_out, B, T_out)
            grad_w = F.conv1d(x_pad.to(grad.dtype), g, groups=G).transpose(0, 1)  # (I, C_out, K) -> (C_out, I, K)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2))
        return grad_x, grad_w, grad_b, None, None


class WeightNormConv1d(MaskedConv1d):
    """The positional conv: weight = g * v / ||v||, the norm taken per kernel position (weight norm, dim=2).

    Stored as `weight_g` (1, 1, K) and `weight_v` (C, C/groups, K), the fairseq and (older) HF key names.
    """

    def __init__(self, channels: int, kernel_size: int, groups: int):
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=groups)
        v = self.weight.detach()
        del self.weight
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(v.norm(dim=(0, 1), keepdim=True))
        self._dense_key, self._dense = None, None

    def dense_weight(self):
        v, g = self.weight_v, self.weight_g
        if torch.is_grad_enabled() and (v.requires_grad or g.requires_grad):
            return torch._weight_norm(v, g, dim=2)  # the fused kernel torch's weight_norm uses: g * v / ||v||
        return self._frozen_dense_weight()

    @torch.compiler.disable  # a cache keyed by version counters: eager (compiled, every new key would recompile)
    @torch.no_grad()
    def _frozen_dense_weight(self):
        """Frozen (S3-Router, evaluation): the same weight every forward, computed once per version of g and v."""
        v, g = self.weight_v, self.weight_g
        trained = v.requires_grad or g.requires_grad  # then a fused optimizer may step them without a version bump
        key = (v._version, g._version, v.data_ptr(), g.data_ptr(), _optimizer_steps if trained else None)
        if key != self._dense_key:
            self._dense, self._dense_key = torch._weight_norm(v, g, dim=2), key
        return self._dense


# ----------------------------------------------------------------------------------------------------------------
# Feature extractor: waveform (B, S) -> features (B, T, 512), T = 49 frames a second for 16 kHz input


def conv_output_lengths(lengths: torch.Tensor, kernels, strides) -> torch.Tensor:
    """Frames produced from `lengths` samples by valid (unpadded) strided convs: floor((L - k) / s) + 1 each."""
    for k, s in zip(kernels, strides):
        lengths = torch.div(lengths - k, s, rounding_mode="floor") + 1
    return lengths.clamp(min=0)


class ConvLayer(nn.Module):
    """Conv1d -> optional norm -> GELU on channels-last frames. `norm`: 'group' (per channel over time), 'layer'
    (per frame) or None."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int, bias: bool, norm: str | None):
        super().__init__()
        self.conv = MaskedConv1d(in_dim, out_dim, kernel, stride=stride, bias=bias)
        self.norm = norm
        if norm == "group":
            self.layer_norm = nn.GroupNorm(out_dim, out_dim)  # HF calls the group norm `layer_norm` too
        elif norm == "layer":
            self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x):  # (B, S, C_in) -> (B, S', C_out)
        x = strided_conv(x, self.conv.routed_weight(), self.conv.bias, self.conv.stride[0])
        if self.norm is not None:  # fairseq Fp32GroupNorm (over time, per channel) / Fp32LayerNorm (per frame)
            x = normalize(x.float(), 1 if self.norm == "group" else 2, self.layer_norm.weight, self.layer_norm.bias,
                          self.layer_norm.eps).type_as(x)
        return gelu(x)


def strided_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int) -> torch.Tensor:
    """A valid strided Conv1d on channels-last input, (B, S, C_in) -> (B, T, C_out), as matrix products.

    Output frame t reads input frames t*stride ... t*stride + K - 1: K*C_in consecutive numbers of x. Taken
    `stride` taps at a time, these windows are the rows of a strided view of x (one row every stride*C_in numbers),
    so each group of taps is one batched matrix product that reads x in place, with no im2col copy. For the
    extractor's shapes this is about 10% faster than oneDNN's Conv1d on CPU, and channels-last frames need no
    transposes around the layer norms or before the projection.
    """
    B, S, C = x.shape
    out_dim, _, K = weight.shape
    T = max((S - K) // stride + 1, 0)
    x = x.contiguous()
    w = weight.transpose(1, 2)  # (C_out, K, C_in): the taps in the order they lie in x
    taps = K if C == 1 else stride  # the first conv reads raw samples: copying its windows (K numbers each) is cheap
    out = None
    for j in range(0, K, taps):
        n = min(taps, K - j)
        frames = x.as_strided((B, T, n * C), (S * C, stride * C, 1), x.storage_offset() + j * C)  # (B, T, n*C_in)
        w_j = w[:, j:j + n].reshape(out_dim, n * C).t().expand(B, -1, -1)  # (B, n*C_in, C_out)
        if out is None:
            out = torch.bmm(frames, w_j) if bias is None else torch.baddbmm(bias, frames, w_j)
        else:
            out = out.baddbmm_(frames.to(out.dtype), w_j.to(out.dtype))  # in place: autocast does not cast for us
    return out  # (B, T, C_out)


def normalize(x: torch.Tensor, dim: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
    """(x - mean) / sqrt(var + eps) over `dim`, then the per-channel affine (channels on the last axis, if any).

    A group norm with one group per channel is this over time (dim 1 of (B, T, C)), a layer norm over channels
    (dim 2). Without autograd (the frozen extractor) the same operations run in place on x, the fresh output of a
    conv, with bit-identical results: a new tensor per operation would cost more than its arithmetic.
    """
    inplace = not torch.is_grad_enabled()
    x = x.sub_(x.mean(dim, keepdim=True)) if inplace else x - x.mean(dim, keepdim=True)
    rstd = mean_of_squares(x, dim).add(eps).rsqrt()  # (B, 1, C) or (B, T, 1)
    x = x.mul_(rstd) if inplace else x * rstd
    if weight is not None:
        x = x.mul_(weight).add_(bias) if inplace else x * weight + bias
    return x


def mean_of_squares(x: torch.Tensor, dim: int, block: int = 1024) -> torch.Tensor:
    """x.square().mean(dim, keepdim=True) of (B, T, C), `block` frames at a time: as exact, and no temporary is as
    large as x (torch.linalg.vector_norm needs none either, but it sums long columns naively: 1e-5 relative error)."""
    sums = [part.square().sum(dim, keepdim=True) for part in x.split(block, dim=1)]
    return (sum(sums) if dim == 1 else torch.cat(sums, dim=1)) / x.shape[dim]


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU, in place when autograd is off: the frozen extractor's early tensors are each hundreds of MB, and
    writing a fresh one costs more than computing the GELU (every page of a new allocation faults once)."""
    return F.gelu(x) if torch.is_grad_enabled() else torch.ops.aten.gelu_(x)


class FeatureExtractor(nn.Module):
    """fairseq ConvFeatureExtractionModel: base normalises only the first conv (group norm), large every conv."""

    def __init__(self, dims, kernels, strides, bias: bool, norm: str):
        super().__init__()
        in_dims = (1,) + tuple(dims[:-1])
        self.conv_layers = nn.ModuleList(
            ConvLayer(i, o, k, s, bias, norm if norm == "layer" or n == 0 else None)
            for n, (i, o, k, s) in enumerate(zip(in_dims, dims, kernels, strides)))
        self.kernels, self.strides = tuple(kernels), tuple(strides)

    @torch.compiler.disable  # per-utterance lengths vary every batch; the matrix products gain nothing from compiling
    def forward(self, wav, lengths=None):  # (B, S), lengths (B,) or None -> (B, T, C)
        x = wav.unsqueeze(-1)  # (B, S, 1): channels last throughout
        # A group norm's statistics span the whole padded row (fairseq and HF compute them so), so the layers up to
        # the last group norm run on the padded batch. Every later frame depends only on its own window of samples:
        # there each utterance runs on its valid frames alone, and the padding is neither computed nor kept.
        shared = max((n + 1 for n, layer in enumerate(self.conv_layers) if layer.norm == "group"), default=0)
        for layer in self.conv_layers[:shared]:
            x = layer(x)
        rest = self.conv_layers[shared:]
        if lengths is None or not rest or bool((lengths >= wav.shape[1]).all()):
            for layer in rest:
                x = layer(x)
            return x
        valid = conv_output_lengths(lengths, self.kernels[:shared], self.strides[:shared]).tolist()
        T = int(conv_output_lengths(torch.tensor(wav.shape[1]), self.kernels, self.strides))
        out = x.new_zeros(x.shape[0], T, self.conv_layers[-1].conv.out_channels)  # (B, T, C), zero at padded frames
        for b, n in enumerate(valid):
            y = x[b:b + 1, :n]
            for layer in rest:
                y = layer(y)
            out[b, : y.shape[1]] = y[0]
        return out


class FeatureProjection(nn.Module):
    """LayerNorm over the 512-d conv features, then a Linear to the model width (fairseq post_extract_proj)."""

    def __init__(self, in_dim: int, out_dim: int, layer_norm: bool, eps: float, dropout: float):
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_dim, eps=eps) if layer_norm else nn.Identity()
        self.projection = MaskedLinear(in_dim, out_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):  # (B, T, 512) -> (B, T, C)
        return self.dropout(self.projection(self.layer_norm(x)))


# ----------------------------------------------------------------------------------------------------------------
# Transformer encoder


class PositionalConvLayer(nn.Module):
    """One data2vec positional conv: Conv1d -> LayerNorm without affine -> GELU (no weight norm)."""

    def __init__(self, channels: int, kernel: int, groups: int):
        super().__init__()
        self.conv = MaskedConv1d(channels, channels, kernel, padding=kernel // 2, groups=groups)
        self.layer_norm = nn.LayerNorm(channels, elementwise_affine=False)

    def forward(self, x):  # (B, C, T)
        x = self.conv(x)[..., : x.shape[-1]]  # an even kernel yields one extra frame (fairseq SamePad)
        return F.gelu(self.layer_norm(x.transpose(1, 2)).transpose(1, 2))


class PositionalConvEmbedding(nn.Module):
    """Relative position by convolution: one wide weight-normed conv (wav2vec2, HuBERT) or a stack (data2vec)."""

    def __init__(self, channels: int, kernel: int, groups: int, depth: int):
        super().__init__()
        if depth == 1:
            self.conv = WeightNormConv1d(channels, kernel, groups)
        else:
            self.layers = nn.ModuleList(PositionalConvLayer(channels, kernel, groups) for _ in range(depth))

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        x = x.transpose(1, 2)
        if hasattr(self, "conv"):
            x = F.gelu(self.conv(x)[..., : x.shape[-1]])
        else:
            for layer in self.layers:
                x = layer(x)
        return x.transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention; padded frames are masked out as keys."""

    def __init__(self, dim: int, heads: int, dropout: float, head_dim: int | None = None):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        inner = heads * (head_dim or dim // heads)  # fewer heads than dim // head_dim in a compacted model
        self.q_proj, self.k_proj, self.v_proj = (MaskedLinear(dim, inner) for _ in range(3))
        self.out_proj = MaskedLinear(inner, dim)

    def forward(self, x, key_mask, index=None):  # x (B, T, C), or (N, C): the valid frames at `index` of B*T
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if index is not None:  # attention itself needs the (B, T) layout: padded frames become zero queries/keys
            q, k, v = (unpack_frames(t, index, key_mask.shape[0], key_mask.shape[-1]) for t in (q, k, v))
        B, T, C = q.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.out_proj(y if index is None else y.flatten(0, 1)[index])


def unpack_frames(x: torch.Tensor, index: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """(N, C) valid frames -> (B, T, C), zero at the padded frames; `index` holds their positions in B*T."""
    return x.new_zeros(B * T, x.shape[-1]).index_copy_(0, index, x).view(B, T, -1)


class FeedForward(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout (HF intermediate_dense / output_dense)."""

    def __init__(self, dim: int, hidden: int, act: str, activation_dropout: float, dropout: float):
        super().__init__()
        self.intermediate_dense = MaskedLinear(dim, hidden)
        self.output_dense = MaskedLinear(hidden, dim)
        self.act = ACTIVATIONS[act]
        self.intermediate_dropout = nn.Dropout(activation_dropout)
        self.output_dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.output_dropout(self.output_dense(self.intermediate_dropout(self.act(self.intermediate_dense(x)))))


_gelu_tanh = lambda x: F.gelu(x, approximate="tanh")  # noqa: E731  HF gelu_new, fairseq gelu_accurate
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "swish": F.silu, "silu": F.silu, "gelu_new": _gelu_tanh,
               "gelu_accurate": _gelu_tanh}


class EncoderLayer(nn.Module):
    """One transformer block, post-LN (base: norm after each residual) or pre-LN (large: norm before each branch)."""

    def __init__(self, dim, heads, ffn_dim, act, dropout, attention_dropout, activation_dropout, eps, layer_norm_first,
                 head_dim=None):
        super().__init__()
        self.attention = Attention(dim, heads, attention_dropout, head_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(dim, eps=eps)
        self.feed_forward = FeedForward(dim, ffn_dim, act, activation_dropout, dropout)
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.layer_norm_first = layer_norm_first

    def forward(self, x, key_mask, index=None):  # (B, T, C), or (N, C) valid frames (see Encoder)
        if self.layer_norm_first:
            x = x + self.dropout(self.attention(self.layer_norm(x), key_mask, index))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.dropout(self.attention(x, key_mask, index)))
        return self.final_layer_norm(x + self.feed_forward(x))


class Encoder(nn.Module):
    """Positional conv, then the transformer layers, with fairseq's placement of the outer LayerNorm."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        c = cfg
        self.pos_conv_embed = PositionalConvEmbedding(c.hidden_size, c.conv_pos_kernel, c.conv_pos_groups, c.conv_pos_depth)
        self.layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(c.hidden_size, *c.layer_sizes(i), c.hidden_act, c.hidden_dropout, c.attention_dropout,
                         c.activation_dropout, c.layer_norm_eps, c.layer_norm_first, c.hidden_size // c.num_attention_heads)
            for i in range(c.num_hidden_layers))
        self.layer_norm_first, self.layerdrop = c.layer_norm_first, c.layerdrop
        self.gradient_checkpointing = c.gradient_checkpointing

    def forward(self, x, padding_mask=None):  # x (B, T, C); padding_mask (B, T) True at padded frames
        key_mask = None
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)  # padding must not leak into the positional conv
            key_mask = ~padding_mask[:, None, None, :]  # (B, 1, 1, T)
        x = x + self.pos_conv_embed(x)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)
        B, T, _ = x.shape
        index = None
        if padding_mask is not None:
            # Everything in a layer but attention treats frames one by one, so the layers run on the valid frames
            # alone, packed as (N, C); attention unpacks its queries, keys and values. Padding then costs no work
            # (and the padded frames of the output are zero).
            index = (~padding_mask).flatten().nonzero().squeeze(1)  # (N,) positions in B*T
            x = x.flatten(0, 1)[index]  # (N, C)
        for layer in self.layers:
            if self.training and self.layerdrop > 0 and torch.rand(()) < self.layerdrop:
                continue  # LayerDrop (Fan et al. 2019): skip the whole block
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, key_mask, index, use_reentrant=False)
            else:
                x = layer(x, key_mask, index)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x if index is None else unpack_frames(x, index, B, T)


# ----------------------------------------------------------------------------------------------------------------
# SpecAugment-style masking used while finetuning (fairseq `compute_mask_indices`, static span lengths)


def span_mask(lengths: torch.Tensor, size: int, prob: float, span: int, min_spans: int) -> torch.Tensor:
    """(B, size) boolean mask of random spans covering about `prob` of each row's first `lengths[b]` positions.

    Like fairseq: `int(prob * L / span + U[0,1))` spans (at least `min_spans`) start uniformly at random and may
    overlap; every row then keeps the same number of masked spans as the row with the fewest.
    """
    B = lengths.shape[0]
    starts = []
    for b in range(B):
        L = int(lengths[b])
        n = max(min_spans, int(prob * L / span + torch.rand(()).item()))
        free = L - span
        if free < 1:
            starts.append(torch.zeros(0, dtype=torch.long))
            continue
        starts.append(torch.randperm(free)[: min(n, free)])
    fewest = min(len(s) for s in starts)
    mask = torch.zeros(B, size, dtype=torch.bool)
    for b, s in enumerate(starts):
        s = s[torch.randperm(len(s))[:fewest]]
        idx = (s[:, None] + torch.arange(span)).flatten()
        mask[b, idx] = True
    return mask


# ----------------------------------------------------------------------------------------------------------------
# The model


class Wav2Vec2ForCTC(nn.Module):
    """wav2vec 2.0 encoder with an optional CTC head: model(wav, lengths) -> (logits or hidden states, lengths)."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        c = self.config = config
        self.feature_extractor = FeatureExtractor(c.conv_dim, c.conv_kernel, c.conv_stride, c.conv_bias, c.feat_extract_norm)
        self.feature_projection = FeatureProjection(c.conv_dim[-1], c.hidden_size, c.feat_proj_layer_norm,
                                                    c.layer_norm_eps, c.feat_proj_dropout)
        self.masked_spec_embed = nn.Parameter(torch.empty(c.hidden_size).uniform_())  # fairseq mask_emb
        self.encoder = Encoder(c)
        self.final_dropout = nn.Dropout(c.final_dropout)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size) if c.vocab_size > 0 else None
        self.route_config: RouteConfig | None = None

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return conv_output_lengths(lengths, self.config.conv_kernel, self.config.conv_stride)

    def set_vocab_size(self, vocab_size: int):
        """Replace the CTC head by a freshly initialised one with `vocab_size` outputs (0 removes it)."""
        self.config = replace(self.config, vocab_size=vocab_size)
        self.lm_head = nn.Linear(self.config.hidden_size, vocab_size) if vocab_size > 0 else None
        if self.lm_head is not None and self.route_config is not None:
            self.lm_head.requires_grad_(self.route_config.trainable_proj)

    def freeze_feature_encoder(self):
        """Freeze the conv feature extractor (fairseq feature_grad_mult = 0); it then runs without autograd."""
        for p in self.feature_extractor.parameters():
            p.requires_grad_(False)

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor | None = None):
        """wav (B, S) 16 kHz; lengths (B,) valid samples or None -> out (B, T, V or C), out_lengths (B,)."""
        if wav.dim() != 2:
            raise ValueError(f"expected a (batch, samples) waveform, got shape {tuple(wav.shape)}")
        B, S = wav.shape
        if lengths is None:
            lengths = torch.full((B,), S, dtype=torch.long, device=wav.device)
        frozen = not any(p.requires_grad for p in self.feature_extractor.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            features = self.feature_extractor(wav, lengths)  # (B, T, 512)
        x = self.feature_projection(features)  # (B, T, C)
        out_lengths = self.output_lengths(lengths).clamp(max=x.shape[1])
        padding_mask = None
        if bool((out_lengths < x.shape[1]).any()):
            padding_mask = torch.arange(x.shape[1], device=x.device)[None, :] >= out_lengths[:, None]  # (B, T)
        if self.training:
            x = self.apply_spec_augment(x, out_lengths)
        x = self.encoder(x, padding_mask)
        if self.lm_head is not None:
            x = self.lm_head(self.final_dropout(x))  # (B, T, V)
        return x, out_lengths

    def apply_spec_augment(self, x, lengths):
        """Replace random time spans with the learned mask embedding and zero random channel spans."""
        c = self.config
        B, T, C = x.shape
        if c.mask_time_prob > 0:
            m = span_mask(lengths.cpu(), T, c.mask_time_prob, c.mask_time_length, min_spans=2).to(x.device)
            x = torch.where(m.unsqueeze(-1), self.masked_spec_embed.to(x.dtype), x)
        if c.mask_feature_prob > 0:
            m = span_mask(torch.full((B,), C), C, c.mask_feature_prob, c.mask_feature_length, min_spans=0).to(x.device)
            x = x.masked_fill(m.unsqueeze(1), 0.0)
        return x

    # -- S3-Router -------------------------------------------------------------------------------------------

    def routable_layers(self, cfg: RouteConfig) -> dict[str, Routable]:
        """The layers `cfg` routes, by name: attention q/k/v/out and FFN fc1/fc2 unless fixed, others on request."""
        chosen = {}
        for name, module in self.named_modules():
            if not isinstance(module, Routable):
                continue
            g = cfg.route_granularity  # neuron/head: the output side (fc2, out_proj) holds one score per group
            if ".attention." in name:
                wanted = not cfg.fix_attn and ("head" not in g or name.endswith(".out_proj"))
            elif ".feed_forward." in name:
                wanted = not cfg.fix_fc and ("neuron" not in g or name.endswith(".output_dense"))
            elif name.startswith("feature_extractor."):
                wanted = cfg.route_feature_extractor
            elif name.startswith("encoder.pos_conv_embed."):
                wanted = cfg.route_pos_conv
            elif name.startswith("feature_projection."):
                wanted = cfg.route_feature_projection
            else:
                wanted = False
            if wanted:
                chosen[name] = module
        return chosen

    def route(self, cfg: RouteConfig, init_scores: bool = True) -> "Wav2Vec2ForCTC":
        """Switch to mask mode: give the routed layers scores and freeze everything `cfg` does not train.

        `init_scores=False` only creates score tensors (to be filled from a checkpoint). Weight-based inits read the
        weights present now, so load the (finetuned) weights first, as upstream's pruning recipe requires.
        """
        for name, module in self.routable_layers(cfg).items():
            module.route(cfg.prune_rate, cfg.init_score if init_scores else "kaiming_uniform", cfg.score_scale,
                         *self._groups(name, module, cfg.route_granularity))
        self.route_config = cfg
        for name, p in self.named_parameters():
            p.requires_grad_(self._trains_in_mask_mode(name, cfg))
        return self

    def _groups(self, name: str, module: Routable, g: str) -> tuple:
        """(granularity, view, extra) of one routed layer (see Routable.route) under route granularity `g`.

        A neuron (head) is masked where its output enters the residual stream, at its fc2 column (out_proj columns):
        that removes it exactly, and a dropped one still gets the straight-through gradient of putting it back, which
        masking its fc1 row too would zero (a dropped unit's activation and output weights would both be 0).
        """
        parent = self.get_submodule(name.rpartition(".")[0])
        if "neuron" in g and isinstance(parent, FeedForward):
            fc1 = parent.intermediate_dense  # its rows and bias belong to the neurons too
            return "column", None, (fc1.weight.abs().sum(1) + fc1.bias.abs(), fc1.weight.shape[1] + 1)
        if "head" in g and isinstance(parent, Attention):
            H, C = parent.heads, module.weight.shape[0]
            rows = [(p.weight.abs().sum(1) + p.bias.abs()).view(H, -1).sum(1) for p in
                    (parent.q_proj, parent.k_proj, parent.v_proj)]
            return "column", (C, H, module.weight.shape[1] // H), (sum(rows), 3 * (C + 1) * module.weight.shape[1] // H)
        if g in ("row", "column") or n_of_m(g):
            if isinstance(parent, (FeedForward, Attention)):
                return g, None, None
        return "weight", None, None

    def _trains_in_mask_mode(self, name: str, cfg: RouteConfig) -> bool:
        if name.endswith(".scores"):
            return True
        if name == "masked_spec_embed":  # upstream trains mask_emb as a side effect; used only by time masking
            return self.config.mask_time_prob > 0
        if name.startswith("lm_head."):
            return cfg.trainable_proj
        if name.startswith("feature_extractor."):
            return False  # frozen in every upstream recipe (feature_grad_mult 0)
        if name.startswith("encoder.pos_conv_embed.") and cfg.trainable_pos:
            return True
        if name.startswith("feature_projection.projection.") and cfg.trainable_feature_projection:
            return True
        if "layer_norm" in name and cfg.trainable_layer_norm:
            return True
        if name.endswith(".bias") and cfg.trainable_bias:
            return True
        return cfg.co_train

    def set_prune_rate(self, prune_rate: float):
        """Change the kept fraction of every routed layer (masks follow at the next forward)."""
        for module in self.modules():
            if isinstance(module, Routable) and module.scores is not None:
                module.prune_rate = prune_rate
        if self.route_config is not None:
            self.route_config = replace(self.route_config, prune_rate=prune_rate)

    def masks(self) -> dict[str, torch.Tensor]:
        """Boolean keep-mask of every routed layer, keyed by the layer's weight name (e.g. `...q_proj.weight`)."""
        return {f"{name}.weight": m.mask() for name, m in self.named_modules()
                if isinstance(m, Routable) and m.scores is not None}

    @torch.no_grad()
    def fold_masks(self) -> "Wav2Vec2ForCTC":
        """Multiply every mask into its weight and drop the scores: a plain dense model with real zeros."""
        for module in self.modules():
            if isinstance(module, Routable) and module.scores is not None:
                mask = module.weight_mask()
                if isinstance(module, WeightNormConv1d):  # fold into v; g is unchanged only where v keeps its norm
                    w = module.dense_weight() * mask
                    norm = w.norm(dim=(0, 1), keepdim=True)
                    module.weight_g.copy_(norm)
                    module.weight_v.copy_(torch.where(norm > 0, w, torch.ones_like(w)))  # g = 0 there
                else:
                    module.weight.mul_(mask)
                module.scores = None
                module._init_routing()
        self.route_config = None
        return self
