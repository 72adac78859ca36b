"""Plain PyTorch reference of the wave index's cluster selection, the shared input checks and the
ranking key both implementations use.

A decode step of the wave index keeps, per (batch, kv head), the ``retrieved`` clusters of highest
score for exact attention and the next ``estimated`` ones for centroid estimation. ``torch.topk``
does it exactly but as one single-block radix select per row plus a sort of the winners: at batch 1
only ``B * Hkv`` SMs work (61 us for 8 x 8,192 clusters on an H100). The Triton kernel spreads each
row over many programs with a three-level radix select on an integer ranking key; this reference
ranks by the same key, so both select the same clusters.

Ranking key (:func:`rank_keys`): scores are non-negative (sums of softmax probabilities), so the
fp32 bit pattern read as an int32 is order-preserving; the key is those bits plus 1, so the order is
the exact fp32 order. Empty clusters (size 0, which k-means can leave) get key 0 and never outrank
a real one. Negative scores (never produced) rank as 0.0, NaN as +inf. Equal keys are ranked by
cluster index, lower first: the selection is deterministic and equals ``torch.topk`` wherever the
scores are distinct.

Output: ``(B, H, retrieved + estimated)`` int32: the retrieved clusters, then the estimated ones,
each part in increasing cluster order (the consumers do not need the score order, and cluster order
keeps their summation order fixed).
"""
from __future__ import annotations

import torch

__all__ = ["check_select_inputs", "rank_keys", "select_clusters_reference", "MAX_SCORE_BITS"]

MAX_SCORE_BITS = 0x7F800000   # +inf: larger bit patterns (NaN) rank as +inf, so every key fits in 31 bits


def check_select_inputs(scores, sizes, clusters, retrieved, estimated, counts):
    """Validate and return (B, H, C). scores: (B, H, >= C) float; sizes: (B, H, >= C) int; clusters,
    retrieved, estimated: python ints with retrieved + estimated <= clusters; counts: None or (2,)
    int64 on the scores' device."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 3 or not scores.dtype.is_floating_point:
        raise ValueError(f"scores must be a 3-D float tensor (B, H, C), got {_describe(scores)}")
    if not isinstance(sizes, torch.Tensor) or sizes.dim() != 3 or sizes.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"sizes must be a 3-D int32/int64 tensor (B, H, Ccap), got {_describe(sizes)}")
    B, H = scores.shape[:2]
    if tuple(sizes.shape[:2]) != (B, H):
        raise ValueError(f"sizes {tuple(sizes.shape)} and scores {tuple(scores.shape)} differ in (B, H)")
    for name, value in (("clusters", clusters), ("retrieved", retrieved), ("estimated", estimated)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if not 1 <= clusters <= min(scores.shape[2], sizes.shape[2]):
        raise ValueError(f"clusters={clusters} must be in [1, {min(scores.shape[2], sizes.shape[2])}] "
                         f"(the scores' and sizes' last dims)")
    if retrieved + estimated > clusters:
        raise ValueError(f"retrieved + estimated = {retrieved} + {estimated} exceeds clusters={clusters}")
    if counts is not None and (not isinstance(counts, torch.Tensor) or tuple(counts.shape) != (2,)
                               or counts.dtype != torch.int64 or counts.device != scores.device):
        raise ValueError(f"counts must be None or a (2,) int64 tensor on {scores.device}, got {_describe(counts)}")
    return B, H, clusters


def _describe(t):
    return (tuple(t.shape), t.dtype, str(t.device)) if isinstance(t, torch.Tensor) else type(t).__name__


def rank_keys(scores: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """int32 keys of the same shape: clamp(bits(fp32 score), 0, bits(+inf)) + 1, and 0 where size == 0 (see
    the module docstring)."""
    bits = scores.float().contiguous().view(torch.int32)
    return (bits.clamp(0, MAX_SCORE_BITS) + 1).masked_fill(sizes == 0, 0)


def select_clusters_reference(scores, sizes, clusters, retrieved, estimated, counts=None):
    """The selection (see the module docstring) of the first ``clusters`` of scores (B, H, >= C) with sizes
    (B, H, >= C): (B, H, retrieved + estimated) int32. If counts (2,) int64 is given, adds the summed sizes
    of the retrieved clusters to counts[0] and of the estimated ones to counts[1] (over all rows)."""
    B, H, C = check_select_inputs(scores, sizes, clusters, retrieved, estimated, counts)
    sizes = sizes[:, :, :C]
    keys = rank_keys(scores[:, :, :C], sizes).long()
    index = torch.arange(C, device=scores.device)
    order = (keys * C + (C - 1 - index)).topk(retrieved + estimated, dim=-1, sorted=True).indices
    parts = [order[..., :retrieved].sort(dim=-1).values, order[..., retrieved:].sort(dim=-1).values]
    if counts is not None:
        counts += torch.stack([sizes.gather(-1, part).long().sum() for part in parts])
    return torch.cat(parts, dim=-1).to(torch.int32)
