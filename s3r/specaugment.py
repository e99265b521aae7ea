"""SpecAugment's span masks as wav2vec 2.0 finetuning draws them (fairseq `compute_mask_indices`,
`fairseq/data/data_utils.py`): Wav2Vec2ForCTC.spec_augment replaces the time spans with its learned
mask embedding and zeroes the channel spans."""
from __future__ import annotations

import torch


def compute_mask_indices(shape: tuple[int, int], lengths: torch.Tensor | None, mask_prob: float,
                         mask_length: int, min_masks: int = 0) -> torch.Tensor:
    """(B, T) bool: spans of `mask_length` over about `mask_prob` of each row's L valid positions,
    never beyond L. fairseq's as finetuning runs it (static, overlapping, require_same_masks): a row
    draws `int(mask_prob * L / mask_length + U[0,1))` (>= `min_masks`) distinct starts in
    [0, L - mask_length), then all rows are trimmed to the batch's fewest masked positions by
    unmasking random ones. `lengths` (B,), or None: L = T, one count for all rows."""
    B, T = shape
    sizes = [T] * B if lengths is None else [int(n) for n in lengths.tolist()]
    shared = int(mask_prob * T / mask_length + torch.rand(()).item())
    rows = []
    for size in sizes:
        if lengths is None:
            n = shared
        else:
            n = int(mask_prob * size / mask_length + torch.rand(()).item())
        n = max(min_masks, n)
        room = size - mask_length if size - mask_length > n else n + 1  # fairseq's short-row fallback
        starts = torch.randperm(room)[:n]
        idx = (starts[:, None] + torch.arange(mask_length)).flatten()
        rows.append(torch.unique(idx[idx < size]))
    fewest = min(len(idx) for idx in rows)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, idx in enumerate(rows):
        mask[b, idx[torch.randperm(len(idx))[:fewest]]] = True
    return mask
