"""wav2vec 2.0 (XLS-R, data2vec-audio, HuBERT) with S3-Router's score-masked layers: S3-Router's
core, then the encoder in the order a waveform (B, S) meets it (fairseq's names right; the
configurations, Wav2Vec2Config and RouteConfig, are in config.py):

    FeatureExtractor   7 strided convs, 320x down   ConvFeatureExtractionModel
    FeatureProjection  LayerNorm + Linear 512 -> C  layer_norm + post_extract_proj
    spec_augment       time / channel span masks    apply_mask (specaugment.py)
    Encoder            positional conv + N blocks   TransformerEncoder (post-LN base, pre-LN large)
    lm_head            CTC logits                   Wav2VecEncoder.proj, Wav2VecCtc

Numerics follow fairseq, module names Hugging Face (checkpoint.py maps fairseq's keys and config
names). data2vec-audio differs in its positional conv (a stack of 5), HuBERT in having no LayerNorm
before the projection. S3-Router (Fu et al., NeurIPS 2022, Sec. 3; upstream `operation_st.py`)
keeps each pretrained weight W frozen and learns `scores` of its shape: the forward pass uses
W * mask, the mask keeping the `kept_count` largest |scores|; the backward pass takes the hard
top-k as the identity (straight-through). structured.py extends it to scores for groups of
weights, an extension the core below does not read.
This file is the reference, in plain PyTorch. Where a CPU forward runs faster code, the branch
reads `if fast....` beside the plain code; `S3R_REFERENCE=1` turns them all off (see fast.py).
"""
from __future__ import annotations

import math
from dataclasses import replace
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from . import fast, structured
from .config import INIT_SCORES, RouteConfig, Wav2Vec2Config
from .errors import ConfigError, ShapeError
from .specaugment import compute_mask_indices


# ------------------------------------------------------------ S3-Router: the score-masked layers
def kept_count(numel: int, prune_rate: float) -> int:
    """How many of `numel` entries a mask keeps, by upstream GetSubnet's formula."""
    return numel - int((1 - prune_rate) * numel)


def topk_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly the k largest entries of `values`; ties: the first by position."""
    flat = values.detach().flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.argsort(descending=True, stable=True)[:k]] = True
    return mask.view_as(values)


class StraightThrough(torch.autograd.Function):
    """W * mask forward; the backward takes the hard top-k as the identity: dL/ds = dL/dW_eff * W
    * sign(s) (as upstream: d|s|/ds = sign(s), so a score at exactly 0 stays there)."""
    @staticmethod
    def forward(ctx, scores, weight, mask, revive=False):
        ctx.save_for_backward(scores, weight, mask)
        ctx.revive = revive
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        scores, weight, mask = ctx.saved_tensors
        grad_scores = grad_weight = None
        if ctx.needs_input_grad[0]:  # summed over the weights a score covers (structured.py)
            grad_scores = (grad * weight).sum_to_size(scores.shape) * scores.sign()
        if ctx.needs_input_grad[1]:  # co_train: W learns where kept; revive (PARP): all of it
            grad_weight = grad if ctx.revive else grad * mask
        return grad_scores, grad_weight, None, None


def initial_scores(weight: torch.Tensor, prune_rate: float, init_score: str = "weight_rank",
                   scale: float = 1.0) -> torch.Tensor:
    """fp32 scores for `weight` by upstream's init_score: kaiming_uniform (nn.Linear's init),
    weight_rank (those reordered so that the first mask is magnitude pruning), W / scale, or
    weight_magnitude (1 kept, 0 pruned: a 0 never gets a gradient, so the mask never changes)."""
    if init_score == "weight_magnitude_with_scale":
        return weight / scale
    if init_score == "weight_magnitude":
        return topk_mask(weight.abs(), kept_count(weight.numel(), prune_rate)).float()
    if init_score not in ("kaiming_uniform", "weight_rank"):
        raise ConfigError(f"unknown init_score {init_score!r}; choose from {INIT_SCORES}")
    scores = nn.init.kaiming_uniform_(torch.empty_like(weight), a=math.sqrt(5))
    if init_score == "weight_rank":  # rank(|s|) == rank(|W|), ties by position
        flat = scores.view(-1)
        flat[weight.abs().flatten().argsort(stable=True)] = flat[flat.abs().argsort(stable=True)]
    return scores


class Routable:
    """Mixin for nn.Linear and nn.Conv1d: a weight S3-Router can mask, dense until add_scores()."""
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # the torch layer's own arguments and init
        self._mask_cache = fast.MaskCache()
        self.drop_scores()

    def drop_scores(self):  # dense: no scores, the whole weight
        self.register_parameter("scores", None)
        self.prune_rate = 1.0
        self.revive = False  # prune.py (PARP): pruned weights learn too, so they can grow back
        self._mask_cache.clear()

    def dense_weight(self) -> torch.Tensor:
        return self.weight

    @torch.no_grad()
    def add_scores(self, prune_rate: float, init_score: str = "weight_rank", scale: float = 1.0):
        """Mask mode: an fp32 score per weight; the mask keeps `prune_rate` of the weights."""
        scores = initial_scores(self.dense_weight().detach().float(), prune_rate, init_score, scale)
        self.drop_scores()
        self.scores, self.prune_rate = nn.Parameter(scores), prune_rate

    def mask(self) -> torch.Tensor:
        """The boolean keep-mask: the kept_count(numel, prune_rate) largest |scores|."""
        if self.scores is None:
            return torch.ones_like(self.dense_weight(), dtype=torch.bool)
        k = kept_count(self.scores.numel(), self.prune_rate)
        if fast.enabled():  # fast.py: a selection once per optimizer step, not per forward
            return self._mask_cache.get(self.scores, k)
        return topk_mask(self.scores.abs(), k)

    def routed_weight(self) -> torch.Tensor:
        weight = self.dense_weight()
        return weight if self.scores is None else self.apply_mask(weight)

    def apply_mask(self, weight: torch.Tensor) -> torch.Tensor:
        return StraightThrough.apply(self.scores, weight, self.mask(), self.revive)


# GroupScores (structured.py): scores for groups of weights; with one per weight it does nothing
class MaskedLinear(structured.GroupScores, Routable, nn.Linear):
    """nn.Linear whose weight S3-Router can mask; `weight` and `bias`, plus `scores` once routed."""
    def forward(self, x):
        return F.linear(x, self.routed_weight(), self.bias)


class MaskedConv1d(structured.GroupScores, Routable, nn.Conv1d):
    """nn.Conv1d whose weight S3-Router can mask."""
    def forward(self, x):  # (B, C_in, T) -> (B, C_out, T')
        weight = self.routed_weight()
        if fast.conv_applies(self, x):  # fast.py: pos conv backward, extractor convs (CPU)
            return fast.conv1d(self, x, weight)
        return self._conv_forward(x, weight, self.bias)


# --------------------------- feature extractor: waveform (B, S) -> (B, T, 512), 49 frames a second
def group_norm_over_valid(x: torch.Tensor, lengths: torch.Tensor | None,
                          norm: nn.GroupNorm) -> torch.Tensor:
    """`norm` (nn.GroupNorm(C, C): each channel over time) of x (B, C, T), every utterance's
    statistics taken over its own `lengths` (B,) valid frames, so that padding never changes a
    result (s3r; fairseq and HF include the padding: a padded batch gives other numbers than each
    utterance alone). Frames past the end are normalised with the same statistics; nothing valid
    reads them (the later convs are valid convolutions)."""
    if lengths is None or bool((lengths >= x.shape[-1]).all()):
        return norm(x)
    frames = torch.arange(x.shape[-1], device=x.device)
    valid = (frames < lengths[:, None]).unsqueeze(1)  # (B, 1, T)
    n = lengths.clamp(min=1)[:, None, None].to(x.dtype)
    mean = x.masked_fill(~valid, 0.0).sum(-1, keepdim=True) / n  # (B, C, 1)
    var = (x - mean).masked_fill(~valid, 0.0).square().sum(-1, keepdim=True) / n
    x = (x - mean) * torch.rsqrt(var + norm.eps)
    return x * norm.weight[:, None] + norm.bias[:, None]


class ConvLayer(nn.Module):
    """Conv1d -> optional norm -> GELU. `norm`: 'group' (each channel over time), 'layer' (each
    frame over the channels) or None."""
    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int, bias: bool,
                 norm: str | None):
        super().__init__()
        self.conv = MaskedConv1d(in_dim, out_dim, kernel, stride=stride, bias=bias)
        self.norm = norm
        if norm == "group":
            self.layer_norm = nn.GroupNorm(out_dim, out_dim)  # HF names the group norm so too
        elif norm == "layer":
            self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x, lengths=None):  # (B, C_in, S), lengths (B,) valid output frames
        x = self.conv(x)  # (B, C_out, S')
        # fp32 statistics whatever the autocast dtype (fairseq Fp32GroupNorm / Fp32LayerNorm)
        if self.norm == "group":
            x = group_norm_over_valid(x.float(), lengths, self.layer_norm).type_as(x)
        elif self.norm == "layer":
            x = self.layer_norm(x.float().transpose(1, 2)).transpose(1, 2).type_as(x)
        return F.gelu(x)

    def output_lengths(self, lengths):  # valid frames of a valid conv: floor((L - k) / s) + 1
        k, s = self.conv.kernel_size[0], self.conv.stride[0]
        return torch.div(lengths - k, s, rounding_mode="floor") + 1


class FeatureExtractor(nn.Module):
    """fairseq ConvFeatureExtractionModel: base normalises conv 0 (group norm), large every conv."""
    def __init__(self, c: Wav2Vec2Config):
        super().__init__()
        shapes = zip((1, *c.conv_dim[:-1]), c.conv_dim, c.conv_kernel, c.conv_stride, strict=True)
        layers = []
        for n, (i, o, k, s) in enumerate(shapes):
            norm = c.feat_extract_norm if c.feat_extract_norm == "layer" or n == 0 else None
            layers.append(ConvLayer(i, o, k, s, c.conv_bias, norm))
        self.conv_layers = nn.ModuleList(layers)

    def forward(self, wav, lengths=None):  # (B, S), lengths (B,) or None -> (B, T, C)
        if fast.splits_utterances(wav, lengths):  # fast.py: each utterance alone, without padding
            return fast.each_utterance(self, wav, lengths)
        x = wav.unsqueeze(1)  # (B, 1, S)
        for layer in self.conv_layers:
            lengths = None if lengths is None else layer.output_lengths(lengths)
            x = layer(x, lengths)
        return x.transpose(1, 2)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frames from `lengths` samples through the valid strided convs."""
        for layer in self.conv_layers:
            lengths = layer.output_lengths(lengths)
        return lengths.clamp(min=0)


class FeatureProjection(nn.Module):
    """LayerNorm over the conv features, then a Linear to the model width (post_extract_proj)."""
    def __init__(self, c: Wav2Vec2Config):
        super().__init__()
        dim = c.conv_dim[-1]
        norm = nn.LayerNorm(dim, c.layer_norm_eps) if c.feat_proj_layer_norm else nn.Identity()
        self.layer_norm = norm
        self.projection = MaskedLinear(dim, c.hidden_size)
        self.dropout = nn.Dropout(c.feat_proj_dropout)

    def forward(self, x):  # (B, T, 512) -> (B, T, C)
        return self.dropout(self.projection(self.layer_norm(x)))


# -------------------------------------------------------------------------- transformer encoder
class WeightNormConv1d(MaskedConv1d):
    """The positional conv: g * v / ||v|| per kernel position; weight_g (1, 1, K), v (C, C/g, K)."""
    def __init__(self, channels: int, kernel_size: int, groups: int):
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=groups)
        v = self.weight.detach()
        del self.weight
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(v.norm(dim=(0, 1), keepdim=True))

    def dense_weight(self):
        # g * v / ||v||_(0,1), by the fused kernel torch.nn.utils.weight_norm runs (6x faster)
        return torch._weight_norm(self.weight_v, self.weight_g, dim=2)


class PositionalConvLayer(nn.Module):
    """One data2vec positional conv: Conv1d -> LayerNorm without affine -> GELU."""
    def __init__(self, channels: int, kernel: int, groups: int):
        super().__init__()
        self.conv = MaskedConv1d(channels, channels, kernel, padding=kernel // 2, groups=groups)
        self.layer_norm = nn.LayerNorm(channels, elementwise_affine=False)

    def forward(self, x):  # (B, C, T)
        x = self.conv(x)[..., : x.shape[-1]]  # an even kernel yields one extra frame (SamePad)
        x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        return F.gelu(x)


class PositionalConvEmbedding(nn.Module):
    """Relative position by convolution: one wide weight-normed conv, or a stack (data2vec)."""
    def __init__(self, c: Wav2Vec2Config):
        super().__init__()
        args = c.hidden_size, c.conv_pos_kernel, c.conv_pos_groups
        if c.conv_pos_depth == 1:
            self.conv = WeightNormConv1d(*args)
        else:
            self.layers = nn.ModuleList(PositionalConvLayer(*args) for _ in range(c.conv_pos_depth))

    def forward(self, x, padding_mask=None):  # (B, T, C), zero at padded frames; (B, T)
        x = x.transpose(1, 2)
        if hasattr(self, "conv"):
            x = F.gelu(self.conv(x)[..., : x.shape[-1]])  # SamePad, as in PositionalConvLayer
        else:
            for layer in self.layers:
                x = layer(x)
                if padding_mask is not None:  # zero past the end again, as each utterance alone
                    x = x.masked_fill(padding_mask[:, None, :], 0.0)  # (s3r; fairseq, HF: not)
        return x.transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention; padded frames are masked out as keys."""
    def __init__(self, dim: int, heads: int, dropout: float, head_dim: int | None = None):
        super().__init__()
        inner = heads * (head_dim or dim // heads)  # compact.py: fewer heads than dim // head_dim
        self.heads, self.dropout = heads, dropout
        self.q_proj, self.k_proj, self.v_proj = (MaskedLinear(dim, inner) for _ in range(3))
        self.out_proj = MaskedLinear(inner, dim)

    def forward(self, x, key_mask=None):  # (B, T, C); key_mask (B, 1, 1, T): True = attend
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.out_proj(self.attend(q, k, v, key_mask))

    def attend(self, q, k, v, key_mask):  # (B, T, C) each -> (B, T, C)
        if isinstance(key_mask, fast.ValidFrames):  # fast.py: packed (N, C) frames, unpacked here
            return key_mask.attend(self.attend, q, k, v)
        B, T, C = q.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout)
        return y.transpose(1, 2).reshape(B, T, C)  # (B, H, T, D) -> (B, T, C)


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "swish": F.silu, "silu": F.silu,
               # HF gelu_new is fairseq gelu_accurate
               "gelu_new": partial(F.gelu, approximate="tanh"),
               "gelu_accurate": partial(F.gelu, approximate="tanh")}


class FeedForward(nn.Module):
    """fc1 -> activation -> dropout -> fc2 -> dropout (HF intermediate_dense / output_dense)."""
    def __init__(self, dim: int, hidden: int, act: str, activation_dropout: float,
                 dropout: float):
        super().__init__()
        self.intermediate_dense = MaskedLinear(dim, hidden)
        self.act = ACTIVATIONS[act]
        self.intermediate_dropout = nn.Dropout(activation_dropout)
        self.output_dense = MaskedLinear(hidden, dim)
        self.output_dropout = nn.Dropout(dropout)

    def forward(self, x):
        x = self.intermediate_dropout(self.act(self.intermediate_dense(x)))
        return self.output_dropout(self.output_dense(x))


class EncoderLayer(nn.Module):
    """One transformer block, post-LN (base: norm after each residual) or pre-LN (large: norm
    before each branch). `heads`, `ffn_dim`: this layer's (compact.py may shrink them)."""
    def __init__(self, c: Wav2Vec2Config, heads: int, ffn_dim: int):
        super().__init__()
        dim = c.hidden_size
        head_dim = dim // c.num_attention_heads
        self.attention = Attention(dim, heads, c.attention_dropout, head_dim)
        self.dropout = nn.Dropout(c.hidden_dropout)
        self.layer_norm = nn.LayerNorm(dim, eps=c.layer_norm_eps)
        self.feed_forward = FeedForward(dim, ffn_dim, c.hidden_act, c.activation_dropout,
                                        c.hidden_dropout)
        self.final_layer_norm = nn.LayerNorm(dim, eps=c.layer_norm_eps)
        self.layer_norm_first = c.layer_norm_first

    def forward(self, x, key_mask=None):  # (B, T, C), or (N, C) packed by fast.py
        if self.layer_norm_first:
            x = x + self.dropout(self.attention(self.layer_norm(x), key_mask))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.dropout(self.attention(x, key_mask)))
        return self.final_layer_norm(x + self.feed_forward(x))


class Encoder(nn.Module):
    """Positional conv, then the transformer layers, with fairseq's place for the outer norm."""
    def __init__(self, c: Wav2Vec2Config):
        super().__init__()
        self.pos_conv_embed = PositionalConvEmbedding(c)
        self.layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout)
        heads = c.num_heads_per_layer or (c.num_attention_heads,) * c.num_hidden_layers
        widths = c.intermediate_sizes or (c.intermediate_size,) * c.num_hidden_layers
        layers = (EncoderLayer(c, h, f) for h, f in zip(heads, widths, strict=True))
        self.layers = nn.ModuleList(layers)
        self.layer_norm_first, self.layerdrop = c.layer_norm_first, c.layerdrop
        self.gradient_checkpointing = c.gradient_checkpointing

    def forward(self, x, padding_mask=None, hidden_states=None):  # x (B, T, C); padding_mask
        """padding_mask (B, T): True = padded. hidden_states: a list to collect each block's input
        and the last block's output in (HF output_hidden_states)."""
        key_mask = None
        if padding_mask is not None:  # padding must not leak into the positional conv
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
            key_mask = ~padding_mask[:, None, None, :]  # (B, 1, 1, T)
        x = x + self.pos_conv_embed(x, padding_mask)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)
        drop = self.layerdrop if self.training else 0.0
        # LayerDrop (Fan et al. 2019): skip whole blocks at random
        layers = [layer for layer in self.layers if not (drop > 0 and torch.rand(()) < drop)]
        if hidden_states is not None:  # every block's input, then the last block's output
            for layer in self.layers:  # (as transformers 5: before a pre-LN model's final norm)
                hidden_states.append(x)
                x = self.run(layer, x, key_mask) if any(layer is k for k in layers) else x
            hidden_states.append(x)
        elif fast.packs_frames(x, padding_mask):  # fast.py: the blocks see the valid frames only
            key_mask = fast.ValidFrames(padding_mask)
            x = key_mask.unpack(self.run_all(layers, key_mask.pack(x), key_mask))  # (N, C) inside
        else:
            x = self.run_all(layers, x, key_mask)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        if padding_mask is not None:  # padded frames: 0
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        return x

    def run_all(self, layers, x, key_mask):
        for layer in layers:
            x = self.run(layer, x, key_mask)
        return x

    def run(self, fn, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # recompute in the backward
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


# ------------------------------------------------------------------------------------- the model
class Wav2Vec2ForCTC(nn.Module):
    """wav2vec 2.0 and a CTC head: model(wav, lengths) -> (logits or hidden states, lengths)."""
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        c = self.config = config
        self.feature_extractor = FeatureExtractor(c)
        self.feature_projection = FeatureProjection(c)
        self.masked_spec_embed = nn.Parameter(torch.empty(c.hidden_size).uniform_())  # mask_emb
        self.encoder = Encoder(c)
        self.final_dropout = nn.Dropout(c.final_dropout)
        self.route_config: RouteConfig | None = None
        self.set_vocab_size(c.vocab_size)

    def set_vocab_size(self, vocab_size: int):
        """A fresh CTC head with `vocab_size` outputs (0: none): xavier-uniform weight, zero bias
        (fairseq wav2vec2_asr.py `Linear()`), trained unless the route freezes it."""
        if vocab_size != self.config.vocab_size:
            self.config = replace(self.config, vocab_size=vocab_size)
        self.lm_head = nn.Linear(self.config.hidden_size, vocab_size) if vocab_size else None
        if self.lm_head is not None:
            nn.init.xavier_uniform_(self.lm_head.weight)
            nn.init.zeros_(self.lm_head.bias)
            self.lm_head.requires_grad_(getattr(self.route_config, "trainable_proj", True))

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return self.feature_extractor.output_lengths(lengths)

    def freeze_feature_encoder(self):
        """Freeze the conv feature extractor (feature_grad_mult 0): it runs without autograd."""
        self.feature_extractor.requires_grad_(False)

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor | None = None,
                detach_encoder: bool = False):
        """wav (B, S) 16 kHz; lengths (B,) valid samples or None -> out (B, T, V or C),
        out_lengths (B,). `detach_encoder`: no gradient reaches the encoder, only the head learns
        (train.py, for --freeze-finetune-updates)."""
        x, out_lengths, padding_mask = self.embed(wav, lengths)
        if detach_encoder:
            x = x.detach()
        if self.lm_head is None:
            return x, out_lengths
        logits = self.lm_head(self.final_dropout(x))
        return self.ctc_logits(logits, padding_mask), out_lengths

    def embed(self, wav: torch.Tensor, lengths: torch.Tensor | None = None,
              hidden_states: list | None = None):
        """The encoder without a head -> (B, T, C), out_lengths (B,), padding_mask (B, T) (True =
        padded) or None. hidden_states: see Encoder.forward (the classifiers of classify.py)."""
        if wav.dim() != 2:
            raise ShapeError(f"expected a (batch, samples) waveform, got shape {tuple(wav.shape)}")
        if lengths is None:
            lengths = torch.full(wav.shape[:1], wav.shape[1], dtype=torch.long, device=wav.device)
        frozen = not any(p.requires_grad for p in self.feature_extractor.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            features = self.feature_extractor(wav, lengths)  # (B, T, 512)
        x = self.feature_projection(features)  # (B, T, C)
        out_lengths = self.output_lengths(lengths).clamp(max=x.shape[1])
        frames = torch.arange(x.shape[1], device=x.device)
        padding_mask = frames[None, :] >= out_lengths[:, None]  # (B, T)
        if not bool(padding_mask.any()):
            padding_mask = None
        if self.training and self.config.apply_spec_augment:
            x = self.spec_augment(x, None if padding_mask is None else out_lengths)
        x = self.encoder(x, padding_mask, hidden_states)  # (B, T, C)
        return x, out_lengths, padding_mask

    def spec_augment(self, x, lengths):  # (B, T, C); lengths (B,) valid frames, None: no padding
        """Time spans -> the mask embedding, then channel spans -> 0 (mask_channel_before False)."""
        c, (B, T, C) = self.config, x.shape
        if c.mask_time_prob > 0:
            m = compute_mask_indices((B, T), lengths, c.mask_time_prob, c.mask_time_length, 2)
            x = torch.where(m.to(x.device)[..., None], self.masked_spec_embed.to(x.dtype), x)
        if c.mask_feature_prob > 0:  # one channel mask per utterance, the same for all its frames
            m = compute_mask_indices((B, C), None, c.mask_feature_prob, c.mask_feature_length)
            x = x.masked_fill(m.to(x.device)[:, None], 0.0)
        return x

    def ctc_logits(self, logits, padding_mask):  # (B, T, V)
        """fairseq Wav2VecCtc.get_logits, read by the CTC loss and by decoding alike: `blank_weight`
        added to (or set as) the blank's (index 0) logit; padded frames made certain blanks (0 for
        the blank, -inf elsewhere)."""
        c, blank = self.config, logits[..., :1]
        if c.blank_weight != 0:
            add = c.blank_mode == "add"
            blank = blank + c.blank_weight if add else torch.full_like(blank, c.blank_weight)
            logits = torch.cat([blank, logits[..., 1:]], dim=-1)
        if padding_mask is not None:
            others = logits.new_full((logits.shape[-1] - 1,), float("-inf"))
            certain_blank = torch.cat([logits.new_zeros(1), others])
            logits = torch.where(padding_mask.unsqueeze(-1), certain_blank, logits)
        return logits

    # -------------------------------------------------------------------------------- mask mode
    def routable_layers(self, cfg: RouteConfig) -> dict[str, Routable]:
        """The layers `cfg` routes, by name: attention and FFN unless fixed, others on request."""
        wanted = {".attention.": not cfg.fix_attn, ".feed_forward.": not cfg.fix_fc,
                  "feature_extractor.": cfg.route_feature_extractor,
                  "encoder.pos_conv_embed.": cfg.route_pos_conv,
                  "feature_projection.": cfg.route_feature_projection}
        dense = structured.dense_layers(cfg.route_granularity)
        layers = {}
        for name, module in self.named_modules():
            if not isinstance(module, Routable) or name.endswith(dense):
                continue
            if any(part in f".{name}" and on for part, on in wanted.items()):
                layers[name] = module
        return layers

    def route(self, cfg: RouteConfig, init_scores: bool = True) -> Wav2Vec2ForCTC:
        """Mask mode: scores for the routed layers, everything `cfg` does not train frozen.
        `init_scores=False` only makes score tensors (to be loaded); weight-based inits read the
        weights present now (load them first)."""
        init = cfg.init_score if init_scores else "kaiming_uniform"
        layers = self.routable_layers(cfg)
        for name, layer in layers.items():
            if cfg.route_granularity == "weight":
                layer.add_scores(cfg.prune_rate, init, cfg.score_scale)
            else:  # structured.py: scores for rows, columns, neurons, heads or n:m
                structured.route_layer(self, name, layer, cfg, init)
        for name, layer in self.routed().items():  # routed before (an installed route): dense again
            if name not in layers:
                layer.drop_scores()
        self.route_config = cfg
        for name, p in self.named_parameters():
            p.requires_grad_(self._trains_in_mask_mode(name, cfg))
        return self

    def _trains_in_mask_mode(self, name: str, cfg: RouteConfig) -> bool:
        if name.endswith(".scores"):
            return True
        if name == "masked_spec_embed":  # upstream trains it as a side effect; time masks use it
            return self.config.apply_spec_augment and self.config.mask_time_prob > 0
        if name.startswith("lm_head."):
            return cfg.trainable_proj
        if name.startswith("feature_extractor."):
            return False  # frozen in every upstream recipe (feature_grad_mult 0)
        return (cfg.co_train
                or (cfg.trainable_pos and name.startswith("encoder.pos_conv_embed."))
                or (cfg.trainable_feature_projection
                    and name.startswith("feature_projection.projection."))
                or (cfg.trainable_layer_norm and "layer_norm" in name)
                or (cfg.trainable_bias and name.endswith(".bias")))

    def routed(self) -> dict[str, Routable]:
        return {name: m for name, m in self.named_modules()
                if isinstance(m, Routable) and m.scores is not None}

    def refresh_masks(self):
        """Tell the mask cache the scores moved: call after every `optimizer.step()` (train.py
        does). Without it the cache stays right with optimizers that bump the version counter, not
        with fused ones (Adam(fused=True))."""
        for module in self.routed().values():
            module._mask_cache.clear()

    def masks(self) -> dict[str, torch.Tensor]:
        """Boolean keep-mask of every routed layer, keyed by the layer's weight name."""
        return {f"{name}.weight": m.mask() for name, m in self.routed().items()}
