"""wav2vec 2.0 (XLS-R, data2vec-audio, HuBERT) with S3-Router's score-masked layers: the configs, the masked
layers, then the encoder in the order a waveform (B, S) meets it:

    FeatureExtractor   7 strided convs, 320x down    fairseq ConvFeatureExtractionModel (models/wav2vec/wav2vec2.py)
    FeatureProjection  LayerNorm + Linear 512 -> C   fairseq layer_norm + post_extract_proj
    spec_augment       time / channel span masks     fairseq apply_mask, compute_mask_indices (data/data_utils.py)
    Encoder            positional conv + N blocks    fairseq TransformerEncoder (post-LN base, pre-LN large/XLS-R)
    lm_head            CTC logits                    fairseq Wav2VecEncoder.proj, Wav2VecCtc (wav2vec2_asr.py)

Numerics follow fairseq, module names Hugging Face's `modeling_wav2vec2.py` (checkpoint.py maps fairseq's keys).
data2vec-audio differs in its positional conv (5 small convs), HuBERT in having no LayerNorm before the projection.
S3-Router (Fu et al., NeurIPS 2022, Sec. 3; upstream `operation_st.py`) keeps each pretrained weight W frozen and
learns `scores` of its shape: the forward pass uses W * mask, the mask keeping the `kept_count` largest |scores|;
the backward pass takes the hard top-k as the identity (straight-through): dL/ds = dL/dW_eff * W * sign(s).
This file is the reference, in plain PyTorch; faster versions of a few pieces live in `fast.py` (dispatch points
read `if fast....`); `S3R_REFERENCE=1` or `s3r.fast.set_enabled(False)` turns them all off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from . import fast
from .errors import ConfigError, ShapeError


# ---------------------------------------------------------------------------------------------------- Configuration
@dataclass
class Wav2Vec2Config:
    """Architecture and regularisation of one encoder; saved inside every s3r checkpoint."""
    conv_dim: tuple = (512, 512, 512, 512, 512, 512, 512)  # fairseq conv_feature_layers[i][0]; HF conv_dim
    conv_kernel: tuple = (10, 3, 3, 3, 3, 2, 2)  # fairseq conv_feature_layers[i][1]; HF conv_kernel
    conv_stride: tuple = (5, 2, 2, 2, 2, 2, 2)  # fairseq conv_feature_layers[i][2]; HF conv_stride
    conv_bias: bool = False  # fairseq conv_bias; HF conv_bias
    feat_extract_norm: str = "group"  # fairseq extractor_mode default|layer_norm; HF feat_extract_norm group|layer
    hidden_size: int = 768  # fairseq encoder_embed_dim; HF hidden_size
    num_hidden_layers: int = 12  # fairseq encoder_layers; HF num_hidden_layers
    num_attention_heads: int = 12  # fairseq encoder_attention_heads; HF num_attention_heads
    intermediate_size: int = 3072  # fairseq encoder_ffn_embed_dim; HF intermediate_size
    hidden_act: str = "gelu"  # fairseq activation_fn; HF hidden_act
    layer_norm_first: bool = False  # fairseq layer_norm_first; HF do_stable_layer_norm (pre-LN: large, XLS-R)
    layer_norm_eps: float = 1e-5  # fairseq uses torch's default; HF layer_norm_eps
    feat_proj_layer_norm: bool = True  # fairseq always normalises the features; HF feat_proj_layer_norm (HuBERT)
    conv_pos_kernel: int = 128  # fairseq conv_pos (data2vec: max(3, conv_pos // depth)); HF num_conv_pos_embeddings
    conv_pos_groups: int = 16  # fairseq conv_pos_groups; HF num_conv_pos_embedding_groups
    conv_pos_depth: int = 1  # fairseq pos_conv_depth (data2vec 5: no weight norm); HF data2vec num_conv_pos_embeddings
    vocab_size: int = 0  # CTC outputs; 0 = no head, the model returns hidden states; HF vocab_size
    normalize: bool = False  # zero-mean unit-variance waveform; fairseq task.normalize; HF do_normalize
    blank_weight: float = 0.0  # fairseq Wav2Vec2CtcConfig.blank_weight: added to (or set as) the blank logit
    blank_mode: str = "add"  # fairseq Wav2Vec2CtcConfig.blank_mode: add | set
    hidden_dropout: float = 0.1  # (this and below: training only) fairseq dropout; HF hidden_dropout
    attention_dropout: float = 0.1  # fairseq attention_dropout; HF attention_dropout
    activation_dropout: float = 0.1  # fairseq activation_dropout; HF activation_dropout
    feat_proj_dropout: float = 0.0  # fairseq dropout_input; HF feat_proj_dropout
    final_dropout: float = 0.0  # fairseq final_dropout (before the CTC head); HF final_dropout
    layerdrop: float = 0.1  # fairseq layerdrop; HF layerdrop
    apply_spec_augment: bool = True  # fairseq apply_mask; HF apply_spec_augment (False: no time or channel masks)
    mask_time_prob: float = 0.0  # fairseq mask_prob; HF mask_time_prob
    mask_time_length: int = 10  # fairseq mask_length; HF mask_time_length
    mask_feature_prob: float = 0.0  # fairseq mask_channel_prob; HF mask_feature_prob
    mask_feature_length: int = 64  # fairseq mask_channel_length; HF mask_feature_length
    gradient_checkpointing: bool = False  # fairseq checkpoint_activations; HF gradient_checkpointing
    # per-layer sizes of a model cut down by s3r/compact.py (None: all alike); no fairseq or HF field. Head size stays.
    intermediate_sizes: tuple | None = None
    num_heads_per_layer: tuple | None = None

    def __post_init__(self):
        self.conv_dim, self.conv_kernel, self.conv_stride = (
            tuple(int(v) for v in t) for t in (self.conv_dim, self.conv_kernel, self.conv_stride))
        if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride):
            raise ConfigError("conv_dim, conv_kernel and conv_stride must have the same length")
        if self.feat_extract_norm not in ("group", "layer"):
            raise ConfigError(f"feat_extract_norm must be 'group' or 'layer', not {self.feat_extract_norm!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        if self.blank_mode not in ("add", "set"):
            raise ConfigError(f"blank_mode must be 'add' or 'set', not {self.blank_mode!r}")
        for name in ("intermediate_sizes", "num_heads_per_layer"):
            if (sizes := getattr(self, name)) is not None and (len(sizes) != self.num_hidden_layers or min(sizes) < 1):
                raise ConfigError(f"{name} needs {self.num_hidden_layers} values >= 1, not {list(sizes)}")
            setattr(self, name, None if sizes is None else tuple(int(v) for v in sizes))

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> Wav2Vec2Config:
        if unknown := sorted(set(d) - {f.name for f in fields(cls)}):
            raise ConfigError(f"unknown Wav2Vec2Config field(s): {', '.join(unknown)}")
        return cls(**d)


INIT_SCORES = ("kaiming_uniform", "weight_rank", "weight_magnitude_with_scale", "weight_magnitude")
GRANULARITIES = ("weight", "row", "column", "neuron", "head", "neuron+head")  # and "n:m", e.g. "2:4"


def n_of_m(granularity: str) -> tuple[int, int] | None:
    """(n, m) of an n:m route granularity (n kept of every m consecutive inputs); None for the others."""
    n, colon, m = granularity.partition(":")
    if colon and not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
        raise ConfigError(f"route granularity {granularity!r} is not n:m with 0 < n < m (e.g. 2:4)")
    return (int(n), int(m)) if colon else None


@dataclass
class RouteConfig:
    """What S3-Router masks and trains (upstream `wav2vec_ctc_st`); defaults: upstream README's finetuning command."""
    # `prune_rate` keeps upstream's name and meaning: the fraction of each routed weight tensor that is KEPT
    # (upstream: "weight remaining ratio"). 0.9 keeps 90% of the weights (10% sparsity); 0.3 keeps 30% (70%).
    prune_rate: float = 0.9  # upstream model.prune_rate
    init_score: str = "weight_rank"  # upstream model.init_score (model default kaiming_uniform), one of INIT_SCORES
    score_scale: float = 1.0  # upstream model.init_score_scale: scores = W / scale for weight_magnitude_with_scale
    fix_attn: bool = True  # upstream model.fix_attn (model default False): q/k/v/out stay dense, only the FFN is routed
    fix_fc: bool = False  # upstream model.fix_fc: fc1/fc2 stay dense (only attention is routed)
    route_feature_extractor: bool = False  # mask the extractor too (upstream no_prune_extractor, off in every yaml)
    route_pos_conv: bool = False  # mask the positional conv too (upstream no_prune_pos, off in every yaml)
    route_feature_projection: bool = False  # also mask post_extract_proj (upstream: disabled in every yaml)
    trainable_proj: bool = True  # upstream model.trainable_proj (model default False: a random frozen head)
    trainable_bias: bool = False  # upstream model.trainable_bias
    trainable_layer_norm: bool = False  # upstream model.trainable_layer_norm
    trainable_pos: bool = False  # upstream model.trainable_pos (positional conv)
    trainable_feature_projection: bool = False  # upstream model.trainable_post_extract_proj
    co_train: bool = False  # upstream model.co_train: weights train together with the masks
    # What one score (one route bit) covers: a `weight` (upstream), a `row` / `column` (upstream Linear_ST_OutStr /
    # InStr), an FFN `neuron` or attention `head` (s3r/compact.py cuts them out), `neuron+head`, or `n:m` (GPU 2:4).
    route_granularity: str = "weight"

    def __post_init__(self):
        if not 0.0 < self.prune_rate <= 1.0:
            raise ConfigError(f"prune_rate (the fraction kept) must be in (0, 1], not {self.prune_rate}")
        if self.init_score not in INIT_SCORES:
            raise ConfigError(f"unknown init_score {self.init_score!r}; choose from {', '.join(INIT_SCORES)}")
        if self.fix_attn and self.fix_fc:
            raise ConfigError("fix_attn and fix_fc leave nothing to route (to train the head alone: prune_rate 1.0)")
        g, nm = self.route_granularity, n_of_m(self.route_granularity)
        if nm is None and g not in GRANULARITIES:
            raise ConfigError(f"unknown route_granularity {g!r}; choose from {', '.join(GRANULARITIES)} or n:m")
        if nm and self.prune_rate != nm[0] / nm[1]:
            raise ConfigError(f"route_granularity {g} keeps {nm[0]} of {nm[1]}: set prune_rate {nm[0] / nm[1]:g}")
        if ("neuron" in g and self.fix_fc) or ("head" in g and self.fix_attn):
            raise ConfigError(f"route_granularity {g} routes what fix_fc / fix_attn keep dense: turn those off")


# -------------------------------------------------------------------------------------- S3-Router: score-masked layers
def kept_count(numel: int, prune_rate: float) -> int:
    """Entries a mask keeps of a tensor of `numel`: upstream GetSubnet's `numel - int((1 - prune_rate) * numel)`."""
    return numel - int((1 - prune_rate) * numel)


def topk_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly the k largest entries of `values`; among equal values the first by position win."""
    flat = values.detach().flatten()
    order = flat.argsort(descending=True, stable=True)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view_as(values)


def n_of_m_mask(values: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask of the n largest of every m consecutive entries along the rows of `values` (ties by position)."""
    groups = values.detach().reshape(values.shape[0], -1, m)  # (rows, inputs / m, m)
    keep = groups.argsort(dim=-1, descending=True, stable=True)[..., :n]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).view_as(values)


class StraightThrough(torch.autograd.Function):
    """W * mask forward; backward passes dL/dW_eff through the hard top-k to the scores unchanged."""
    @staticmethod
    def forward(ctx, scores, weight, mask, revive=False):
        ctx.save_for_backward(scores, weight, mask)
        ctx.revive = revive
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        scores, weight, mask = ctx.saved_tensors
        # dL/d|s| = dL/dW_eff * W (top-k taken as the identity), summed over a score's group (structured routes);
        # d|s|/ds = sign(s), as upstream, so a score at exactly 0 gets no gradient (`weight_magnitude`, see route).
        grad_scores = (grad * weight).sum_to_size(scores.shape).mul_(scores.sign()) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:  # co_train: W learns where kept; revive (PARP): everywhere
            grad_weight = grad if ctx.revive else grad * mask
        return grad_scores, grad_weight, None, None


class Routable:
    """Mixin for a layer whose weight S3-Router can mask: `scores` is None (dense) until `route()` is called."""
    def __init__(self, *args, **kwargs):  # the torch layer's own arguments and init, then dense
        super().__init__(*args, **kwargs)
        self._init_routing()

    def _init_routing(self):
        self.register_parameter("scores", None)
        self.prune_rate = 1.0
        self.view, self.n_of_m = None, None  # structured routes (see route)
        self.revive = False  # PARP (s3r/prune.py): pruned weights learn too, so they can grow back
        self._mask_cache = fast.MaskCache()

    def dense_weight(self) -> torch.Tensor:
        return self.weight

    @torch.no_grad()
    def route(self, prune_rate: float, init_score: str = RouteConfig.init_score, scale: float = 1.0,
              granularity: str = "weight", view: tuple | None = None, extra: tuple | None = None):
        """fp32 scores whose mask keeps `prune_rate` of the weights, or of the `row`s / `column`s of the weight seen as
        `view` ((C, H, D): heads), or `n:m`; `extra` = (|W| sums, count) of each group's weights in other layers."""
        weight = self.dense_weight().detach().float()
        view, self.n_of_m = tuple(view or weight.shape), n_of_m(granularity)
        m = self.n_of_m[1] if self.n_of_m else 1
        if weight[0].numel() % m:
            raise ConfigError(f"route granularity {granularity}: {weight[0].numel()} inputs are not groups of {m}")
        shape = {"row": view[:1] + (1,) * (len(view) - 1), "column": (1, view[1]) + (1,) * (len(view) - 2)}
        scores = weight.new_empty(shape.get(granularity, view))
        count = weight.numel() // scores.numel() + (extra[1] if extra else 0)  # weights per group
        norms = (weight.abs().view(view).sum_to_size(scores.shape) + (extra[0].view_as(scores) if extra else 0)) / count
        if init_score in ("kaiming_uniform", "weight_rank"):
            nn.init.kaiming_uniform_(scores, a=math.sqrt(5))  # nn.Linear's own init: |s| <= 1/sqrt(fan_in)
            if scores.shape != weight.shape:  # one per group, at the per-weight scale (upstream: its own fan_in)
                scores.uniform_(-1, 1).div_(math.sqrt(weight[0].numel()))
            if init_score == "weight_rank":
                # Reorder the random scores so that rank(|s|) == rank(|W|) (groups: their mean |W|; ties by position):
                # the first mask is magnitude pruning, yet the scores keep kaiming scale for Adam at lr 5e-5.
                flat = scores.flatten()
                flat[norms.flatten().argsort(stable=True)] = flat[flat.abs().argsort(stable=True)]
        elif init_score == "weight_magnitude_with_scale":
            scores.copy_((weight if scores.shape == weight.shape else norms) / scale)
        elif init_score == "weight_magnitude":
            # Scores of exactly 1 (kept) and 0 (pruned). A score at 0 never gets a gradient (sign(0) = 0) and the
            # kept ones stay above it, so this mask cannot change at all: kept for fidelity to upstream only.
            scores.copy_(n_of_m_mask(norms, *self.n_of_m) if self.n_of_m else
                         topk_mask(norms, kept_count(norms.numel(), prune_rate)))
        else:
            raise ConfigError(f"unknown init_score {init_score!r}; choose from {', '.join(INIT_SCORES)}")
        self.scores = nn.Parameter(scores)
        self.prune_rate, self.view = prune_rate, (view if view != weight.shape else None)
        self._mask_cache.clear()

    def mask(self) -> torch.Tensor:
        """The boolean keep-mask: the kept_count(numel, prune_rate) largest |scores|, ties kept by position."""
        if self.scores is None:
            return torch.ones_like(self.dense_weight(), dtype=torch.bool)
        if self.n_of_m:  # the n largest |scores| of every m consecutive inputs, selected at every forward
            return n_of_m_mask(self.scores.abs(), *self.n_of_m)
        k = kept_count(self.scores.numel(), self.prune_rate)
        if fast.enabled():
            return self._mask_cache.get(self.scores, k)  # fast.py: one selection per optimizer step, not per forward
        return topk_mask(self.scores.abs(), k)

    def routed_weight(self) -> torch.Tensor:
        weight = self.dense_weight()
        if self.scores is None:
            return weight
        view = self.view or weight.shape  # structured: the scores broadcast onto the weight seen as `view`
        routed = StraightThrough.apply(self.scores, weight.view(view), self.mask(), self.revive)
        return routed.view_as(weight)


class MaskedLinear(Routable, nn.Linear):
    """nn.Linear whose weight S3-Router can mask; the same `weight`/`bias` keys, plus `scores` once routed."""
    def forward(self, x):
        return F.linear(x, self.routed_weight(), self.bias)


class MaskedConv1d(Routable, nn.Conv1d):
    """nn.Conv1d whose weight S3-Router can mask."""
    def forward(self, x):  # (B, C_in, T) -> (B, C_out, T')
        if fast.grouped_conv_applies(self, x):  # fast.py: the positional conv's backward as forward convs (CPU)
            return fast.grouped_conv1d(x, self.routed_weight(), self.bias, self.padding[0], self.groups)
        return self._conv_forward(x, self.routed_weight(), self.bias)


class WeightNormConv1d(MaskedConv1d):
    """The positional conv: g * v / ||v|| per kernel position; fairseq's weight_g (1, 1, K), weight_v (C, C/g, K)."""
    def __init__(self, channels: int, kernel_size: int, groups: int):
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=groups)
        v = self.weight.detach()
        del self.weight
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(v.norm(dim=(0, 1), keepdim=True))

    def dense_weight(self):
        # g * v / ||v||_(0,1): the fused kernel torch.nn.utils.weight_norm itself runs (6x the plain expression)
        return torch._weight_norm(self.weight_v, self.weight_g, dim=2)


# ----------------------------------------- Feature extractor: waveform (B, S) -> (B, T, 512), 49 frames a second
def group_norm_over_valid(x: torch.Tensor, lengths: torch.Tensor | None, norm: nn.GroupNorm) -> torch.Tensor:
    """`norm` (nn.GroupNorm(C, C): each channel over time) of x (B, C, T), every utterance's statistics taken over
    its own `lengths` (B,) valid frames, so that padding never changes a result (s3r; fairseq and HF include the
    padding: a padded batch gives other numbers than each utterance alone). Frames past the end are normalised with
    the same statistics; nothing valid reads them (the later convs are valid convolutions)."""
    if lengths is None or bool((lengths >= x.shape[-1]).all()):
        return norm(x)
    valid = (torch.arange(x.shape[-1], device=x.device) < lengths[:, None]).unsqueeze(1)  # (B, 1, T)
    n = lengths.clamp(min=1)[:, None, None].to(x.dtype)
    mean = x.masked_fill(~valid, 0.0).sum(-1, keepdim=True) / n  # (B, C, 1)
    var = (x - mean).masked_fill(~valid, 0.0).square().sum(-1, keepdim=True) / n
    x = (x - mean) * torch.rsqrt(var + norm.eps)
    return x * norm.weight[:, None] + norm.bias[:, None]


class ConvLayer(nn.Module):
    """Conv1d -> optional norm -> GELU. `norm`: 'group' (per channel over time), 'layer' (per frame) or None."""
    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int, bias: bool, norm: str | None):
        super().__init__()
        self.conv = MaskedConv1d(in_dim, out_dim, kernel, stride=stride, bias=bias)
        self.norm = norm
        if norm == "group":
            self.layer_norm = nn.GroupNorm(out_dim, out_dim)  # HF calls the group norm `layer_norm` too
        elif norm == "layer":
            self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x, lengths=None):  # (B, C_in, S), lengths (B,) valid output frames -> (B, C_out, S')
        x = self.conv(x)
        if self.norm == "group":  # fairseq Fp32GroupNorm: statistics in fp32 whatever the autocast dtype
            x = group_norm_over_valid(x.float(), lengths, self.layer_norm).type_as(x)
        elif self.norm == "layer":  # fairseq Fp32LayerNorm over the channels of each frame
            x = self.layer_norm(x.float().transpose(1, 2)).transpose(1, 2).type_as(x)
        return F.gelu(x)


class FeatureExtractor(nn.Module):
    """fairseq ConvFeatureExtractionModel: base normalises only the first conv (group norm), large every conv."""
    def __init__(self, c: Wav2Vec2Config):
        super().__init__()
        dims, norm = c.conv_dim, c.feat_extract_norm
        self.conv_layers = nn.ModuleList(
            ConvLayer(i, o, k, s, c.conv_bias, norm if norm == "layer" or n == 0 else None)
            for n, (i, o, k, s) in enumerate(zip((1, *dims[:-1]), dims, c.conv_kernel, c.conv_stride, strict=True)))

    def forward(self, wav, lengths=None):  # (B, S), lengths (B,) or None -> (B, T, C)
        if fast.enabled() and wav.device.type == "cpu":  # fast.py: channels-last matrix products, padding skipped
            return fast.extract_features(self.conv_layers, wav, lengths)
        x = wav.unsqueeze(1)  # (B, 1, S)
        for layer in self.conv_layers:
            k, s = layer.conv.kernel_size[0], layer.conv.stride[0]
            lengths = None if lengths is None else torch.div(lengths - k, s, rounding_mode="floor") + 1  # valid frames
            x = layer(x, lengths)
        return x.transpose(1, 2)


class FeatureProjection(nn.Module):
    """LayerNorm over the 512-d conv features, then a Linear to the model width (fairseq post_extract_proj)."""
    def __init__(self, c: Wav2Vec2Config):
        super().__init__()
        self.layer_norm = nn.LayerNorm(c.conv_dim[-1], c.layer_norm_eps) if c.feat_proj_layer_norm else nn.Identity()
        self.projection = MaskedLinear(c.conv_dim[-1], c.hidden_size)
        self.dropout = nn.Dropout(c.feat_proj_dropout)

    def forward(self, x):  # (B, T, 512) -> (B, T, C)
        return self.dropout(self.projection(self.layer_norm(x)))


# ------------------------------------------------------------------------------------------------- Transformer encoder
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
    def __init__(self, c: Wav2Vec2Config):
        super().__init__()
        args = c.hidden_size, c.conv_pos_kernel, c.conv_pos_groups
        if c.conv_pos_depth == 1:
            self.conv = WeightNormConv1d(*args)
        else:
            self.layers = nn.ModuleList(PositionalConvLayer(*args) for _ in range(c.conv_pos_depth))

    def forward(self, x, padding_mask=None):  # (B, T, C), zero at padded frames; padding_mask (B, T) -> (B, T, C)
        x = x.transpose(1, 2)
        if hasattr(self, "conv"):
            return F.gelu(self.conv(x)[..., : x.shape[-1]]).transpose(1, 2)  # SamePad: see PositionalConvLayer
        for layer in self.layers:
            x = layer(x)
            if padding_mask is not None:  # zero past the end again, as each utterance alone sees (s3r; not so in
                x = x.masked_fill(padding_mask[:, None, :], 0.0)  # fairseq and HF: the next conv reads the bias)
        return x.transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention; padded frames are masked out as keys."""
    def __init__(self, dim: int, heads: int, dropout: float, head_dim: int | None = None):
        super().__init__()
        self.heads, self.dropout, inner = heads, dropout, heads * (head_dim or dim // heads)  # compact: fewer heads
        self.q_proj, self.k_proj, self.v_proj = (MaskedLinear(dim, inner) for _ in range(3))
        self.out_proj = MaskedLinear(inner, dim)

    def forward(self, x, key_mask=None):  # (B, T, C); key_mask (B, 1, 1, T) True at frames that may be attended
        return self.out_proj(self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), key_mask))

    def attend(self, q, k, v, key_mask):  # (B, T, C) each -> (B, T, C)
        B, T, C = q.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, T, C)


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "swish": F.silu, "silu": F.silu,  # HF gelu_new = fairseq gelu_accurate
               **dict.fromkeys(("gelu_new", "gelu_accurate"), partial(F.gelu, approximate="tanh"))}


class FeedForward(nn.Module):
    """fc1 -> activation -> dropout -> fc2 -> dropout (HF intermediate_dense / output_dense)."""
    def __init__(self, dim: int, hidden: int, act: str, activation_dropout: float, dropout: float):
        super().__init__()
        self.intermediate_dense, self.output_dense = MaskedLinear(dim, hidden), MaskedLinear(hidden, dim)
        self.act = ACTIVATIONS[act]
        self.intermediate_dropout, self.output_dropout = nn.Dropout(activation_dropout), nn.Dropout(dropout)

    def forward(self, x):
        return self.output_dropout(self.output_dense(self.intermediate_dropout(self.act(self.intermediate_dense(x)))))


class EncoderLayer(nn.Module):
    """One transformer block, post-LN (base: norm after each residual) or pre-LN (large: norm before each branch)."""
    def __init__(self, c: Wav2Vec2Config, heads: int, ffn_dim: int):  # heads, ffn_dim: this layer's (compact)
        super().__init__()
        dim = c.hidden_size
        self.attention = Attention(dim, heads, c.attention_dropout, dim // c.num_attention_heads)
        self.dropout = nn.Dropout(c.hidden_dropout)
        self.layer_norm = nn.LayerNorm(dim, eps=c.layer_norm_eps)
        self.feed_forward = FeedForward(dim, ffn_dim, c.hidden_act, c.activation_dropout, c.hidden_dropout)
        self.final_layer_norm = nn.LayerNorm(dim, eps=c.layer_norm_eps)
        self.layer_norm_first = c.layer_norm_first

    def forward(self, x, key_mask=None):  # (B, T, C)
        if self.layer_norm_first:
            x = x + self.dropout(self.attention(self.layer_norm(x), key_mask))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.dropout(self.attention(x, key_mask)))
        return self.final_layer_norm(x + self.feed_forward(x))


class Encoder(nn.Module):
    """Positional conv, then the transformer layers, with fairseq's placement of the outer LayerNorm."""
    def __init__(self, c: Wav2Vec2Config):
        super().__init__()
        self.pos_conv_embed = PositionalConvEmbedding(c)
        self.layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout)
        heads = c.num_heads_per_layer or (c.num_attention_heads,) * c.num_hidden_layers
        widths = c.intermediate_sizes or (c.intermediate_size,) * c.num_hidden_layers
        self.layers = nn.ModuleList(EncoderLayer(c, h, f) for h, f in zip(heads, widths, strict=True))
        self.layer_norm_first, self.layerdrop = c.layer_norm_first, c.layerdrop
        self.gradient_checkpointing = c.gradient_checkpointing

    def forward(self, x, padding_mask=None):  # x (B, T, C); padding_mask (B, T) True at padded frames
        key_mask = None if padding_mask is None else ~padding_mask[:, None, None, :]  # (B, 1, 1, T)
        if padding_mask is not None:  # padding must not leak into the positional conv
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + self.pos_conv_embed(x, padding_mask)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)
        drop = self.layerdrop if self.training else 0.0  # LayerDrop (Fan et al. 2019): skip whole blocks at random
        layers = [layer for layer in self.layers if not (drop > 0 and torch.rand(()) < drop)]
        if fast.packs_frames(x, padding_mask):  # fast.py: the blocks see only the valid frames, packed (N, C)
            x = fast.run_packed(layers, x, padding_mask, self.run)
        else:
            for layer in layers:
                x = self.run(layer, x, key_mask)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x if padding_mask is None else x.masked_fill(padding_mask.unsqueeze(-1), 0.0)  # padded frames: 0

    def run(self, fn, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)  # recompute in the backward
        return fn(*args)


# ------------------------------------------------------------------------------------------ SpecAugment (finetuning)
def compute_mask_indices(shape: tuple[int, int], lengths: torch.Tensor | None, mask_prob: float, mask_length: int,
                         min_masks: int = 0) -> torch.Tensor:
    """(B, T) bool: spans of `mask_length` over about `mask_prob` of each row's L valid positions, never beyond L.
    fairseq's as finetuning runs it (static, overlapping, require_same_masks): a row draws `int(mask_prob * L /
    mask_length + U[0,1))` (>= `min_masks`) distinct starts in [0, L - mask_length), then all rows are trimmed to the
    batch's fewest masked positions by unmasking random ones. `lengths` (B,), or None: L = T, one count for all."""
    B, T = shape
    sizes = [T] * B if lengths is None else [int(n) for n in lengths.tolist()]
    shared = int(mask_prob * T / mask_length + torch.rand(()).item())
    rows = []
    for size in sizes:
        n = max(min_masks, shared if lengths is None else int(mask_prob * size / mask_length + torch.rand(()).item()))
        room = size - mask_length if size - mask_length > n else n + 1  # fairseq's fallback for short rows
        starts = torch.randperm(room)[:n]
        idx = (starts[:, None] + torch.arange(mask_length)).flatten()
        rows.append(torch.unique(idx[idx < size]))
    fewest = min(len(idx) for idx in rows)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, idx in enumerate(rows):
        mask[b, idx[torch.randperm(len(idx))[:fewest]]] = True
    return mask


# ----------------------------------------------------------------------------------------------------------- The model
class Wav2Vec2ForCTC(nn.Module):
    """wav2vec 2.0 and a CTC head: model(wav, lengths) -> (logits, lengths); vocab_size 0: no head, hidden states."""
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        c = self.config = config
        self.feature_extractor = FeatureExtractor(c)
        self.feature_projection = FeatureProjection(c)
        self.masked_spec_embed = nn.Parameter(torch.empty(c.hidden_size).uniform_())  # fairseq mask_emb
        self.encoder = Encoder(c)
        self.final_dropout = nn.Dropout(c.final_dropout)
        self.route_config: RouteConfig | None = None
        self.set_vocab_size(c.vocab_size)

    def set_vocab_size(self, vocab_size: int):
        """A fresh CTC head with `vocab_size` outputs (0: none): xavier-uniform weight, zero bias (fairseq
        wav2vec2_asr.py `Linear()`), trained unless the route freezes it."""
        if vocab_size != self.config.vocab_size:
            self.config = replace(self.config, vocab_size=vocab_size)
        self.lm_head = nn.Linear(self.config.hidden_size, vocab_size) if vocab_size else None
        if self.lm_head is not None:
            nn.init.xavier_uniform_(self.lm_head.weight)
            nn.init.zeros_(self.lm_head.bias)
            self.lm_head.requires_grad_(self.route_config is None or self.route_config.trainable_proj)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frames from `lengths` samples through the valid (unpadded) strided convs: floor((L - k) / s) + 1 each."""
        for k, s in zip(self.config.conv_kernel, self.config.conv_stride, strict=True):
            lengths = torch.div(lengths - k, s, rounding_mode="floor") + 1
        return lengths.clamp(min=0)

    def freeze_feature_encoder(self):
        """Freeze the conv feature extractor (fairseq feature_grad_mult 0); it then runs without autograd."""
        self.feature_extractor.requires_grad_(False)

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor | None = None, detach_encoder: bool = False):
        """wav (B, S) 16 kHz; lengths (B,) valid samples or None -> out (B, T, V or C), out_lengths (B,).
        `detach_encoder`: no gradient reaches the encoder, only the head learns (freeze_finetune_updates)."""
        if wav.dim() != 2:
            raise ShapeError(f"expected a (batch, samples) waveform, got shape {tuple(wav.shape)}")
        if lengths is None:
            lengths = torch.full(wav.shape[:1], wav.shape[1], dtype=torch.long, device=wav.device)
        frozen = not any(p.requires_grad for p in self.feature_extractor.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            features = self.feature_extractor(wav, lengths)  # (B, T, 512)
        x = self.feature_projection(features)  # (B, T, C)
        out_lengths = self.output_lengths(lengths).clamp(max=x.shape[1])
        padding_mask = torch.arange(x.shape[1], device=x.device)[None, :] >= out_lengths[:, None]  # (B, T)
        padding_mask = padding_mask if bool(padding_mask.any()) else None
        if self.training and self.config.apply_spec_augment:
            x = self.spec_augment(x, None if padding_mask is None else out_lengths)
        x = self.encoder(x, padding_mask)  # (B, T, C)
        if detach_encoder:
            x = x.detach()
        out = x if self.lm_head is None else self.ctc_logits(self.lm_head(self.final_dropout(x)), padding_mask)
        return out, out_lengths

    def spec_augment(self, x, lengths):  # (B, T, C); lengths (B,) valid frames, None when none is padded
        """Time spans -> the learned mask embedding, then channel spans -> 0 (fairseq mask_channel_before False)."""
        c, (B, T, C) = self.config, x.shape
        if c.mask_time_prob > 0:
            m = compute_mask_indices((B, T), lengths, c.mask_time_prob, c.mask_time_length, min_masks=2)
            x = torch.where(m.to(x.device).unsqueeze(-1), self.masked_spec_embed.to(x.dtype), x)
        if c.mask_feature_prob > 0:  # one channel mask per utterance, the same for all its frames
            m = compute_mask_indices((B, C), None, c.mask_feature_prob, c.mask_feature_length, min_masks=0)
            x = x.masked_fill(m.to(x.device).unsqueeze(1), 0.0)
        return x

    def ctc_logits(self, logits, padding_mask):  # (B, T, V)
        """fairseq Wav2VecCtc.get_logits, read by the CTC loss and by decoding alike: `blank_weight` added to (or set
        as) the blank's (index 0) logit; padded frames made certain blanks (0 for the blank, -inf elsewhere)."""
        c, blank = self.config, logits[..., :1]
        if c.blank_weight != 0:
            blank = blank + c.blank_weight if c.blank_mode == "add" else torch.full_like(blank, c.blank_weight)
            logits = torch.cat([blank, logits[..., 1:]], dim=-1)
        if padding_mask is not None:
            certain_blank = torch.cat([logits.new_zeros(1), logits.new_full((logits.shape[-1] - 1,), float("-inf"))])
            logits = torch.where(padding_mask.unsqueeze(-1), certain_blank, logits)
        return logits

    def routable_layers(self, cfg: RouteConfig) -> dict[str, Routable]:
        """The layers `cfg` routes, by name: attention q/k/v/out and FFN fc1/fc2 unless fixed, others on request."""
        wanted = {".attention.": not cfg.fix_attn, ".feed_forward.": not cfg.fix_fc,
                  "feature_extractor.": cfg.route_feature_extractor, "encoder.pos_conv_embed.": cfg.route_pos_conv,
                  "feature_projection.": cfg.route_feature_projection}
        g = cfg.route_granularity  # a neuron (head) is routed where it leaves its block: see _groups
        inner = ("intermediate_dense",) * ("neuron" in g) + ("q_proj", "k_proj", "v_proj") * ("head" in g)
        return {name: m for name, m in self.named_modules() if isinstance(m, Routable) and not name.endswith(inner)
                and any(part in f".{name}" and on for part, on in wanted.items())}

    def route(self, cfg: RouteConfig, init_scores: bool = True) -> Wav2Vec2ForCTC:
        """Mask mode: scores for the routed layers, everything `cfg` does not train frozen. `init_scores=False` only
        makes score tensors (to be loaded); weight-based inits read the weights present now (load them first)."""
        layers = self.routable_layers(cfg)
        for name, module in layers.items():
            module.route(cfg.prune_rate, cfg.init_score if init_scores else "kaiming_uniform", cfg.score_scale,
                         *self._groups(name, module, cfg.route_granularity))
        for module in self.routed().values():  # routed before (an installed route), not by `cfg`: dense again
            if all(module is not m for m in layers.values()):
                module._init_routing()
        self.route_config = cfg
        for name, p in self.named_parameters():
            p.requires_grad_(self._trains_in_mask_mode(name, cfg))
        return self

    def _groups(self, name: str, module: Routable, g: str) -> tuple:
        """(granularity, view, extra) of Routable.route for one layer under route granularity `g`. A neuron (head) is
        masked at its fc2 column (out_proj columns) alone: that removes it exactly, and a dropped one still gets the
        gradient of putting it back, which masking its fc1 row too would zero (its activation would be act(0) = 0)."""
        block = self.get_submodule(name.rpartition(".")[0])
        if "neuron" in g and isinstance(block, FeedForward):
            fc1 = block.intermediate_dense  # its rows and bias belong to the neurons too (init from the group's |W|)
            return "column", None, (fc1.weight.abs().sum(1) + fc1.bias.abs(), fc1.in_features + 1)
        if "head" in g and isinstance(block, Attention):  # a head's q/k/v rows and biases belong to it too
            H, D = block.heads, module.in_features // block.heads
            qkv = (block.q_proj, block.k_proj, block.v_proj)
            sums = sum((p.weight.abs().sum(1) + p.bias.abs()).view(H, D).sum(1) for p in qkv)  # (H,)
            return "column", (module.out_features, H, D), (sums, 3 * D * (module.out_features + 1))
        return (g if g in ("row", "column") or ":" in g else "weight"), None, None

    def _trains_in_mask_mode(self, name: str, cfg: RouteConfig) -> bool:
        if name.endswith(".scores"):
            return True
        if name == "masked_spec_embed":  # upstream trains mask_emb as a side effect; only time masks use it
            return self.config.apply_spec_augment and self.config.mask_time_prob > 0
        if name.startswith("lm_head."):
            return cfg.trainable_proj
        if name.startswith("feature_extractor."):
            return False  # frozen in every upstream recipe (feature_grad_mult 0)
        return (cfg.co_train or (cfg.trainable_pos and name.startswith("encoder.pos_conv_embed."))
                or (cfg.trainable_feature_projection and name.startswith("feature_projection.projection."))
                or (cfg.trainable_layer_norm and "layer_norm" in name)
                or (cfg.trainable_bias and name.endswith(".bias")))

    def routed(self) -> dict[str, Routable]:
        return {name: m for name, m in self.named_modules() if isinstance(m, Routable) and m.scores is not None}

    def refresh_masks(self):
        """Tell the mask cache the scores moved: call after every `optimizer.step()` (train.py does). Without it the
        cache stays right with optimizers that bump the version counter, not with fused ones (Adam(fused=True))."""
        for module in self.routed().values():
            module._mask_cache.clear()

    def masks(self) -> dict[str, torch.Tensor]:
        """Boolean keep-mask of every routed layer, keyed by the layer's weight name (e.g. `...q_proj.weight`)."""
        return {f"{name}.weight": m.mask() for name, m in self.routed().items()}
