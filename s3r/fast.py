"""Speed paths for s3r/model.py: each piece computes what one reference function there computes, only faster.

| piece                 | replaces (model.py)                     | applies when                                       |
|-----------------------|-----------------------------------------|----------------------------------------------------|
| MaskCache             | topk_mask in Routable.mask              | always: a selection once per change of the scores  |
|                       |                                         | (CPU: banded k-th value search; CUDA: one sort)    |
| each_utterance        | a padded batch in FeatureExtractor.forward | CPU, padded batches                             |
| conv1d: GroupedConv1d | MaskedConv1d.forward (F.conv1d)         | CPU, autograd on, grouped stride-1 convs (pos conv)|
| conv1d: strided_conv  | MaskedConv1d.forward (F.conv1d)         | CPU, strided convs on channels-last input          |
| ValidFrames           | padded (B, T, C) blocks in Encoder.forward | CPU, padded batches                             |

Each changes only how something is computed and calls back into model.py for what: `each_utterance` runs
FeatureExtractor.forward itself, once per utterance; packed frames run EncoderLayer.forward itself and are unpacked
for Attention.attend; `conv1d` is F.conv1d computed otherwise (the positional conv's backward as forward
convolutions, an extractor conv as matrix products); the mask cache selects topk_mask's entries. No block of
model.py is written here a second time.

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


def splits_utterances(wav: torch.Tensor, lengths: torch.Tensor | None) -> bool:
    """Where FeatureExtractor.forward runs each utterance of a batch alone (`each_utterance`): CPU, a padded batch."""
    return lengths is not None and wav.device.type == "cpu" and enabled() and bool((lengths < wav.shape[1]).any())


@torch.compiler.disable  # one call per utterance, whose lengths vary every batch
def each_utterance(extractor, wav: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """FeatureExtractor.forward of a padded batch, (B, S) -> (B, T, C), as the reference forward of each utterance
    on its own valid samples; the frames past an utterance's end are zero.

    Every valid frame depends on its own window of samples and, through conv 0's group norm (base), on its own
    utterance's statistics (model.group_norm_over_valid), so it is the same either way. Alone, an utterance has no
    padding to convolve and its group norm is plain nn.GroupNorm instead of masked sums over the padded batch: at
    base width, 4 utterances of 5 / 4.3 / 3.6 / 3 s, the extractor takes 1.36 s of CPU this way against 3.3 s.
    """
    T = int(extractor.output_lengths(torch.tensor(wav.shape[1])))
    channels = extractor.conv_layers[-1].conv.out_channels
    frames = extractor.output_lengths(lengths).tolist()
    outs = {b: extractor(wav[b:b + 1, :n])  # (1, T_b, C), the reference forward
            for b, (n, t) in enumerate(zip(lengths.tolist(), frames, strict=True))
            if t > 0}  # an utterance too short for one frame is all padding
    dtype = next(iter(outs.values())).dtype if outs else wav.dtype
    out = wav.new_zeros(wav.shape[0], T, channels, dtype=dtype)
    for b, y in outs.items():
        out[b, : y.shape[1]] = y[0]
    return out


# ------------------------------------------------------------------------------------------------ convolutions


def conv_applies(conv, x: torch.Tensor) -> bool:
    """Where MaskedConv1d.forward hands its F.conv1d to `conv1d`: CPU, and `grouped_conv1d` or `strided_conv` fits."""
    return x.device.type == "cpu" and enabled() and (grouped_conv_applies(conv) or strided_conv_applies(conv, x))


def conv1d(conv, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.conv1d(x, weight, conv.bias) with conv's stride, padding and groups, (B, C_in, S) -> (B, C_out, T)."""
    if grouped_conv_applies(conv):
        return GroupedConv1d.apply(x, weight, conv.bias, conv.padding[0], conv.groups)
    return strided_conv(x.transpose(1, 2), weight, conv.bias, conv.stride[0]).transpose(1, 2)


def grouped_conv_applies(conv) -> bool:
    """The positional conv while training: autograd on, grouped, stride 1, undilated."""
    return (conv.groups > 1 and torch.is_grad_enabled() and conv.stride == (1,) and conv.dilation == (1,)
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple))


def strided_conv_applies(conv, x: torch.Tensor) -> bool:
    """An extractor conv (valid, strided, ungrouped) whose input lies channels-last in memory, as a layer norm's
    transposed output leaves it (every conv but the first of a large or data2vec extractor). The large extractor,
    4 utterances of 5 / 4.3 / 3.6 / 3 s one at a time, no autograd: 1.43 s of CPU against 1.84 s with nn.Conv1d."""
    return (conv.groups == 1 and conv.stride[0] > 1 and conv.padding == (0,) and conv.dilation == (1,)
            and x.shape[1] > 1 and x.transpose(1, 2).is_contiguous())


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
