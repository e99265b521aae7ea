"""Speed paths for s3r/model.py: each piece computes what one reference function there computes, only faster.

| piece                 | replaces (model.py)                     | applies when                                       |
|-----------------------|-----------------------------------------|----------------------------------------------------|
| MaskCache             | topk_mask in Routable.mask              | always: a selection once per change of the scores  |
|                       |                                         | (CPU: banded k-th value search; CUDA: one sort)    |
| extract_features      | FeatureExtractor.forward (ConvLayer)    | CPU (autograd on or off; in place when off)        |
| grouped_conv1d        | MaskedConv1d.forward (F.conv1d)         | CPU, autograd on, grouped stride-1 convs (pos conv)|
| ValidFrames           | padded (B, T, C) blocks in Encoder.forward | CPU, padded batches                             |

Turn every one of them off with `S3R_REFERENCE=1` in the environment (read at each call) or with
`s3r.fast.set_enabled(False)` (`set_enabled(None)` follows the environment again). tests/test_fast.py holds each
equal to the reference (1e-5) for every model variant, forward and backward. On CUDA only the mask cache applies:
cuDNN convolutions and flash attention are already fast there, and the CPU tricks would cost a host sync or a
Python loop per utterance. Dropout draws differ between packed (N, C) and padded (B, T, C) tensors, so with
dropout on the two paths are equal in distribution, not draw for draw.

Not worth a speed path: the frozen positional conv's weight-norm product (the fused `torch._weight_norm` takes
2.6 ms a forward at base width, ~0.1% of an evaluation step).
This module imports nothing from s3r: model.py calls it, and it reads the modules it is handed by attribute.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

_enabled: bool | None = None  # None: follow S3R_REFERENCE


def enabled() -> bool:
    """Whether the speed paths run: `set_enabled`'s value, else True unless S3R_REFERENCE is set (and not 0)."""
    if _enabled is not None:
        return _enabled
    return os.environ.get("S3R_REFERENCE", "0") in ("", "0")


def set_enabled(flag: bool | None) -> None:
    """Turn the speed paths on (True) or off (False), or let S3R_REFERENCE decide again (None)."""
    global _enabled
    _enabled = flag


# ---------------------------------------------------------------------------------------------- mask selection


class MaskCache:
    """Replaces `topk_mask(|scores|, k)` in Routable.mask() by a selection made once per change of the scores.

    The cached mask stays valid while the scores' version counter, storage and k are unchanged, or until
    `clear()` (Wav2Vec2ForCTC.refresh_masks, which train.py calls after every optimizer step: fused optimizers
    update in place without bumping the version counter). Gradient accumulation and evaluation then pay for one
    selection, not one per forward. On CPU the k-th largest |score| is searched first within a narrow band around
    last step's threshold (see `kth_largest`); on CUDA one stable sort, which needs no host sync.
    """

    def __init__(self):
        self.key, self.mask = None, None
        self.threshold: float | None = None
        self.band = 0.0

    def clear(self):
        self.key, self.mask = None, None

    def install(self, scores: torch.Tensor, k: int, mask: torch.Tensor):
        """Cache `mask` as the selection for these scores (route_format.fix_mask: a route's mask is known)."""
        self.key, self.mask = self._key(scores, k), mask

    @staticmethod
    def _key(scores, k):
        return scores._version, scores.data_ptr(), scores.device, k

    @torch.compiler.disable  # data-dependent selection and a cache: eager, once per optimizer step
    @torch.no_grad()
    def get(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        key = self._key(scores, k)
        if key != self.key:
            a = scores.detach().abs().flatten()
            if scores.is_cuda or k == 0 or k >= a.numel():
                mask = torch.zeros_like(a, dtype=torch.bool)
                mask[a.argsort(descending=True, stable=True)[:k]] = True  # = topk_mask, ties by position
            else:
                mask = self._select(a, k)
            self.mask, self.key = mask.view_as(scores), key
        return self.mask

    def _select(self, a: torch.Tensor, k: int) -> torch.Tensor:
        threshold = kth_largest(a, k, self.threshold, self.band)
        mask = a >= threshold
        surplus = int(torch.count_nonzero(mask)) - k  # (count_nonzero: 4x faster than a sum over bools)
        if surplus > 0:  # ties at the threshold: keep the first ones by position, as topk_mask does
            tied = torch.nonzero(a == threshold).squeeze(1)
            mask[tied[-surplus:]] = False
        if self.threshold is not None:  # next time look within 4x this move, or half the last band if that was wider
            self.band = max(4 * abs(threshold - self.threshold), self.band / 2, 1e-4 * abs(threshold))
        self.threshold = threshold
        return mask


def kth_largest(a: torch.Tensor, k: int, hint: float | None, band: float) -> float:
    """The k-th largest value of the 1-D tensor `a`, looked for first within `band` of `hint`.

    A full selection (`kthvalue`) over millions of scores is expensive, but after one optimizer step the threshold
    moves very little: if the k-th largest lies among the few values near last step's, select there; otherwise
    fall back to the full selection.
    """
    if hint is not None:
        lo, hi = hint - band, hint + band
        n_above = int(torch.count_nonzero(a > hi))
        if n_above < k:
            near = a[(a >= lo) & (a <= hi)]
            if n_above + near.numel() >= k:
                return near.kthvalue(near.numel() - (k - n_above) + 1).values.item()
    return a.kthvalue(a.numel() - k + 1).values.item()


# ------------------------------------------------------------------------------------------ feature extractor


@torch.compiler.disable  # per-utterance lengths vary every batch; the matrix products gain nothing from compiling
def extract_features(conv_layers, wav: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Replaces FeatureExtractor.forward on CPU: (B, S) -> (B, T, C), the padded frames of the output zero.

    Channels-last throughout (no transposes around the layer norms), each conv as matrix products
    (`strided_conv`), norms and GELU in place when autograd is off. A group norm's statistics are each utterance's
    own (model.group_norm_over_valid) and every other frame depends only on its own window of samples, so in a
    padded batch each utterance runs on its valid samples alone: padding is neither computed nor kept.
    """
    x = wav.unsqueeze(-1)  # (B, S, 1)
    shared = 0 if lengths is not None and not bool((lengths >= wav.shape[1]).all()) else len(conv_layers)
    for layer in conv_layers[:shared]:
        x = conv_layer(layer, x)
    rest = conv_layers[shared:]
    if lengths is None or not rest or bool((lengths >= wav.shape[1]).all()):
        for layer in rest:
            x = conv_layer(layer, x)
        return x
    valid, T = lengths.clone(), wav.shape[1]
    for n, layer in enumerate(conv_layers):  # frames of valid convolutions: floor((L - k) / s) + 1
        k, s = layer.conv.kernel_size[0], layer.conv.stride[0]
        if n < shared:
            valid = torch.div(valid - k, s, rounding_mode="floor") + 1
        T = (T - k) // s + 1
    out = x.new_zeros(x.shape[0], max(T, 0), conv_layers[-1].conv.out_channels)  # (B, T, C)
    for b, n in enumerate(valid.clamp(min=0).tolist()):
        y = x[b:b + 1, :n]
        for layer in rest:
            y = conv_layer(layer, y)
        out[b, : y.shape[1]] = y[0]
    return out


def conv_layer(layer, x: torch.Tensor) -> torch.Tensor:
    """ConvLayer.forward on channels-last frames, (B, S, C_in) -> (B, S', C_out)."""
    conv = layer.conv
    x = strided_conv(x, conv.routed_weight(), conv.bias, conv.stride[0])
    if layer.norm is not None:  # fp32 statistics, as the reference (fairseq Fp32GroupNorm / Fp32LayerNorm)
        norm = layer.layer_norm
        x = normalize(x.float(), 1 if layer.norm == "group" else 2, norm.weight, norm.bias, norm.eps).type_as(x)
    # in place without autograd: the early tensors are hundreds of MB, and the page faults of a fresh one cost
    # more than the GELU itself (torch has no public in-place GELU)
    return F.gelu(x) if torch.is_grad_enabled() else torch.ops.aten.gelu_(x)


def strided_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int) -> torch.Tensor:
    """A valid strided Conv1d on channels-last input, (B, S, C_in) -> (B, T, C_out), as matrix products.

    Output frame t reads input frames t*stride ... t*stride + K - 1: K*C_in consecutive numbers of x. Taken
    `stride` taps at a time, these windows are the rows of a strided view of x (one row every stride*C_in numbers),
    so each group of taps is one batched matrix product that reads x in place, with no im2col copy: about 10%
    faster than oneDNN's Conv1d for the extractor's shapes.
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
    """(x - mean) / sqrt(var + eps) over `dim` of (B, T, C), then the per-channel affine: nn.GroupNorm(C, C) over
    time (dim 1) or nn.LayerNorm(C) per frame (dim 2). Without autograd it works in place on x, the fresh output
    of a conv, bit for bit the same: a new tensor per operation would cost more than its arithmetic."""
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


# ----------------------------------------------------------------------------------------- positional conv


def grouped_conv_applies(conv, x: torch.Tensor) -> bool:
    """Where `grouped_conv1d` replaces MaskedConv1d's F.conv1d: CPU, autograd on, grouped, stride 1, undilated."""
    return (conv.groups > 1 and x.device.type == "cpu" and torch.is_grad_enabled() and enabled()
            and conv.stride == (1,) and conv.dilation == (1,) and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple))


def grouped_conv1d(x, weight, bias, padding: int, groups: int) -> torch.Tensor:
    return GroupedConv1d.apply(x, weight, bias, padding, groups)


class GroupedConv1d(torch.autograd.Function):
    """F.conv1d (stride 1, groups) whose backward computes both gradients as forward convolutions.

    For the positional conv's long grouped kernel (128 taps, 16 groups) oneDNN's backward kernels are much slower
    on CPU than its forward (fwd + bwd 0.63 s against 0.43 s this way, for 4 x 5 s of audio at base width), which
    is ~4% of a weight-finetuning step. Both gradients are convolutions themselves: dL/dx correlates dL/dy with the
    flipped kernel (inputs and outputs swapped per group), dL/dw correlates x with dL/dy (the batch taking the place
    of the channels).
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
        B, (C_out, I_g, K) = x.shape[0], weight.shape  # I_g: input channels per group
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # dL/dx[i, s] = sum_o,k w[o, i, k] dL/dy[o, s + P - k]
            w_t = weight.view(G, C_out // G, I_g, K).transpose(1, 2).flip(-1).reshape(G * I_g, C_out // G, K)
            grad_x = F.conv1d(grad, w_t.to(grad.dtype), padding=K - 1 - P, groups=G)  # (B, C_in, T)
        if ctx.needs_input_grad[1]:  # dL/dw[o, i, k] = sum_b,t dL/dy[b, o, t] x_padded[b, i, t + k]
            x_pad = F.pad(x, (P, P)).view(B, G, I_g, -1).permute(2, 1, 0, 3).reshape(I_g, G * B, -1)  # (I_g, G*B, T+2P)
            g = grad.view(B, G, C_out // G, -1).permute(1, 2, 0, 3).reshape(C_out, B, -1)  # (C_out, B, T_out)
            grad_w = F.conv1d(x_pad.to(grad.dtype), g, groups=G).transpose(0, 1)  # (I_g, C_out, K) -> (C_out, I_g, K)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2))
        return grad_x, grad_w, grad_b, None, None


# ------------------------------------------------------------------------------------------ valid-frame packing


def packs_frames(x: torch.Tensor, padding_mask: torch.Tensor | None) -> bool:
    """Where Encoder.forward runs its blocks on the valid frames, packed (N, C) by `ValidFrames`: CPU, with
    padded frames (the packing's nonzero() would sync on CUDA).

    Everything in a block but attention treats frames one by one, so the reference EncoderLayer.forward runs
    on the packed frames unchanged, and Attention.attend, handed the ValidFrames as its key mask, unpacks its
    queries, keys and values to (B, T) for the reference attention (`ValidFrames.attend`). Padding then costs
    no FFN or projection work."""
    return padding_mask is not None and x.device.type == "cpu" and enabled()


class ValidFrames:
    """The valid frames of a padded (B, T) batch as positions in B*T: pack (B, T, C) -> (N, C) and back."""

    def __init__(self, padding_mask: torch.Tensor):  # (B, T) True at padded frames
        self.B, self.T = padding_mask.shape
        self.index = (~padding_mask).flatten().nonzero().squeeze(1)  # (N,)
        self.key_mask = ~padding_mask[:, None, None, :]  # (B, 1, 1, T)

    def pack(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (N, C)
        return x.flatten(0, 1)[self.index]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:  # (N, C) -> (B, T, C), zero at the padded frames
        return x.new_zeros(self.B * self.T, x.shape[-1]).index_copy_(0, self.index, x).view(self.B, self.T, -1)

    def attend(self, attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention.attend on packed (N, C) queries, keys and values: they are unpacked to (B, T, C)
        (padded frames zero, and masked out as keys), attended by the reference, packed again."""
        q, k, v = (self.unpack(t) for t in (q, k, v))
        return self.pack(attend(q, k, v, self.key_mask))
