"""Triton cluster selection of the wave index: :func:`select_clusters`, with the semantics of
:func:`~kvpass.kernels.cluster_select.reference.select_clusters_reference` (the ground truth in the tests).

Design
------
A radix select on the 31-bit ranking key in three levels (the top 11 bits, then 10, then 10), with
every row (one (batch, kv head)) cut into chunks of ``BLOCK`` clusters, one program per chunk, so a
batch-1 step fills the GPU instead of ``B * Hkv`` SMs. Both selections are done at once: the
``t``-th largest key for ``t1 = retrieved`` and for ``t2 = retrieved + estimated``. Four kernels,
all on the grid ``(chunks, rows)``; the kernel boundaries are the only cross-program
synchronisation, and the counts go through int32 atomics into a zeroed histogram of ``_ROW`` bins
per row: the top level (2,048 bins), then per target the middle and the low level (1,024 each), then
8 slots of ranks (below).

1. ``_top_level_kernel``: every key adds one to its top-level bin.
2. ``_middle_level_kernel``: each program finds, from the top level, the bin holding the ``t``-th
   largest key (for t1 and t2) and counts the middle 10 bits of its keys in that bin.
3. ``_low_level_kernel``: the same one level down (keys matching the top 21 bits).
4. ``_write_kernel``: each program derives both exact thresholds ``T`` and how many keys equal to
   ``T`` are still taken (``need``), counts the larger and the equal keys of the chunks before its
   own (in tiles of 4,096 keys: one or two tiles for the 8,192 clusters of a 128K context), then
   places its selected clusters by prefix sums: cluster order within each part, ties at ``T`` taken
   from the lowest index. With ``counts`` it also adds the selected clusters' sizes (int64 atomics).

Each level's rank (its bin and the keys above it) is found once per kernel and recorded in the row's
histogram by chunk 0 for the kernels after it, so every kernel ranks one level only.

The levels only count (integer atomics: any order gives the same counts) and nothing is sorted, so
the output is deterministic.

The wave scoring kernel can count the first level while it writes the scores (:func:`count_top_level`,
``top_level=``), which saves the first kernel.

Speed (H100, Triton 3.6, CUDA-graph replay, ``benchmarks/probes/cluster_select.py``; output in
``benchmarks/results/probe-cluster-select-20261123-ranked.txt``): 8 rows of 8,192 clusters (a 128K context at
batch 1) 30 us against ``torch.topk``'s 66 us; 8 x 32,768 88 us against 126; 64 x 8,192 57 us against 73. In
the 128K decode step (``probe-wave-profile-20261123.txt``): middle level 6.3 us, low level 3.9, write 9.8.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention.dense import _check_device
from .reference import check_select_inputs

__all__ = ["count_top_level", "new_histogram", "select_clusters"]

# A row's histogram: the top level (11 key bits: 2,048 bins), then the middle and low levels (10 bits each) of
# target 1 and of target 2, then the ranks found so far (_RANKS: top bin and keys above it, middle bin and keys
# above it, for target 1 then target 2), so each kernel ranks only its own level. Globals read by @triton.jit code
# must be constexpr.
_MID1: tl.constexpr = tl.constexpr(2048)
_MID2: tl.constexpr = tl.constexpr(3072)
_LOW1: tl.constexpr = tl.constexpr(4096)
_LOW2: tl.constexpr = tl.constexpr(5120)
_RANKS: tl.constexpr = tl.constexpr(6144)
_ROW: tl.constexpr = tl.constexpr(6152)
_PREFIX_TILE: tl.constexpr = tl.constexpr(4096)   # keys per step of _write_kernel's prefix count (>= _MAX_BLOCK)
_MAX_CHUNKS = 16     # programs per row up to 64K clusters (_MAX_BLOCK each); longer rows get more chunks
_MIN_BLOCK = 64
_MAX_BLOCK = 4096
_MAX_SCORE_BITS: tl.constexpr = tl.constexpr(0x7F800000)


@triton.jit
def _rank_key(score, size):
    """int32 ranking key of fp32 scores: clamp(bits(score), 0, bits(+inf)) + 1, 0 for an empty cluster."""
    bits = score.to(tl.int32, bitcast=True)
    return tl.where(size == 0, 0, tl.minimum(tl.maximum(bits, 0), _MAX_SCORE_BITS) + 1)


@triton.jit
def _chunk_keys(SCORES, SIZES, row_s, row_z, ssc, szc, offs, C):
    """(key, size) of clusters offs of one row (key -1 past C: never counted)."""
    ok = offs < C
    score = tl.load(SCORES + row_s + offs * ssc, mask=ok, other=0.0).to(tl.float32)
    size = tl.load(SIZES + row_z + offs * szc, mask=ok, other=0).to(tl.int32)
    return tl.where(ok, _rank_key(score, size), -1), size


@triton.jit
def _add_counts(HIST, bin_of, ok):
    """HIST[bin_of[i]] += 1 for every lane i where ok, one integer atomic per lane. Counting per program first
    (tl.histogram, then one atomic per non-empty bin) was slower on an H100 at 128K: 13.1 / 9.7 us for the middle
    / low level against 6.3 / 3.9, and 16.2 us for the scoring kernel with the top level against 6.9."""
    tl.atomic_add(HIST + bin_of, 1, mask=ok)


@triton.jit
def count_top_level(HIST, row, score, size, ok):
    """The select's first level, for a kernel that computes the scores (the wave scoring does): add the clusters
    ``ok`` of (fp32 score, int size) to row ``row`` of a :func:`new_histogram`; then call
    :func:`select_clusters` with ``top_level`` set."""
    _add_counts(HIST + row * _ROW, _rank_key(score, size) >> 20, ok)


@triton.jit
def _rank_bin(HIST, t, BINS: tl.constexpr):
    """For a histogram of BINS ascending bins at HIST: the bin holding the t-th largest key (t >= 1; the last
    bin if t == 0) and how many keys lie in higher bins."""
    bins = tl.arange(0, BINS)
    hist = tl.load(HIST + bins)
    at_or_above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
    b = tl.sum((at_or_above >= t).to(tl.int32), 0) - 1
    return b, tl.sum(tl.where(bins > b, hist, 0), 0)


@triton.jit
def _store_rank(slot, value):
    """One program per row (chunk 0) records a rank for the later kernels (every chunk computes the same)."""
    tl.store(slot, value, mask=tl.program_id(0) == 0)


@triton.jit
def _threshold(hist, t, ranks, LOW: tl.constexpr):
    """(T, need) for target t from a row's complete histogram, its top and middle ranks at ranks[0:4]: T the
    t-th largest key, need = t - (count of keys > T) the keys == T that are taken (the lowest cluster indices)."""
    top = tl.load(ranks)
    above = tl.load(ranks + 1) + tl.load(ranks + 3)
    low, above_low = _rank_bin(hist + LOW, t - above, 1024)
    return (top << 20) | (tl.load(ranks + 2) << 10) | low, t - above - above_low


@triton.jit
def _row_start(ssb, ssh, szb, szh, H):
    row = tl.program_id(1)
    b = (row // H).to(tl.int64)
    h = (row % H).to(tl.int64)
    return row, b * ssb + h * ssh, b * szb + h * szh


@triton.jit
def _top_level_kernel(SCORES, SIZES, HIST, ssb, ssh, ssc, szb, szh, szc, H, C, BLOCK: tl.constexpr):
    row, row_s, row_z = _row_start(ssb, ssh, szb, szh, H)
    key, _ = _chunk_keys(SCORES, SIZES, row_s, row_z, ssc, szc, tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), C)
    _add_counts(HIST + row * _ROW, key >> 20, key >= 0)


@triton.jit
def _middle_level_kernel(SCORES, SIZES, HIST, ssb, ssh, ssc, szb, szh, szc, H, C, t1, t2, BLOCK: tl.constexpr):
    row, row_s, row_z = _row_start(ssb, ssh, szb, szh, H)
    hist = HIST + row * _ROW
    top1, above1 = _rank_bin(hist, t1, 2048)
    top2, above2 = _rank_bin(hist, t2, 2048)
    _store_rank(hist + _RANKS, top1)
    _store_rank(hist + _RANKS + 1, above1)
    _store_rank(hist + _RANKS + 4, top2)
    _store_rank(hist + _RANKS + 5, above2)
    key, _ = _chunk_keys(SCORES, SIZES, row_s, row_z, ssc, szc, tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), C)
    mid = (key >> 10) & 1023
    _add_counts(hist + _MID1, mid, (key >= 0) & ((key >> 20) == top1))
    _add_counts(hist + _MID2, mid, (key >= 0) & ((key >> 20) == top2))


@triton.jit
def _low_level_kernel(SCORES, SIZES, HIST, ssb, ssh, ssc, szb, szh, szc, H, C, t1, t2, BLOCK: tl.constexpr):
    row, row_s, row_z = _row_start(ssb, ssh, szb, szh, H)
    hist = HIST + row * _ROW
    top1 = tl.load(hist + _RANKS)
    mid1, above_mid1 = _rank_bin(hist + _MID1, t1 - tl.load(hist + _RANKS + 1), 1024)
    top2 = tl.load(hist + _RANKS + 4)
    mid2, above_mid2 = _rank_bin(hist + _MID2, t2 - tl.load(hist + _RANKS + 5), 1024)
    _store_rank(hist + _RANKS + 2, mid1)
    _store_rank(hist + _RANKS + 3, above_mid1)
    _store_rank(hist + _RANKS + 6, mid2)
    _store_rank(hist + _RANKS + 7, above_mid2)
    key, _ = _chunk_keys(SCORES, SIZES, row_s, row_z, ssc, szc, tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), C)
    low = key & 1023
    _add_counts(hist + _LOW1, low, (key >= 0) & ((key >> 10) == ((top1 << 10) | mid1)))
    _add_counts(hist + _LOW2, low, (key >= 0) & ((key >> 10) == ((top2 << 10) | mid2)))


@triton.jit
def _write_kernel(SCORES, SIZES, HIST, TOP, COUNTS, ssb, ssh, ssc, szb, szh, szc, stb, sth, H, C, t1, t2,
                  HAS_COUNTS: tl.constexpr, BLOCK: tl.constexpr):
    row, row_s, row_z = _row_start(ssb, ssh, szb, szh, H)
    hist = HIST + row * _ROW
    T1, need1 = _threshold(hist, t1, hist + _RANKS, _LOW1)
    T2, need2 = _threshold(hist, t2, hist + _RANKS + 4, _LOW2)
    # Keys above / at each threshold in the chunks before this one (ranks are row-wide), counted in tiles of
    # _PREFIX_TILE keys: a loop over the preceding chunks one by one would chain their load latencies.
    pid = tl.program_id(0)
    end = pid * BLOCK
    zero = pid * 0      # an int32 scalar: loop-carried values keep one type
    above1, tied1, above2, tied2 = zero, zero, zero, zero
    for j in range(0, end, _PREFIX_TILE):
        offs = j + tl.arange(0, _PREFIX_TILE)
        key, _ = _chunk_keys(SCORES, SIZES, row_s, row_z, ssc, szc, offs, tl.minimum(end, C))
        above1 += tl.sum((key > T1).to(tl.int32), 0)
        tied1 += tl.sum((key == T1).to(tl.int32), 0)
        above2 += tl.sum((key > T2).to(tl.int32), 0)
        tied2 += tl.sum((key == T2).to(tl.int32), 0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    key, size = _chunk_keys(SCORES, SIZES, row_s, row_z, ssc, szc, offs, C)
    tie1 = (key == T1).to(tl.int32)
    tie2 = (key == T2).to(tl.int32)
    chosen1 = (key > T1) | ((tie1 == 1) & (tied1 + tl.cumsum(tie1, 0) - tie1 < need1))
    chosen2 = (key > T2) | ((tie2 == 1) & (tied2 + tl.cumsum(tie2, 0) - tie2 < need2))
    # chosen1 is a subset of chosen2 (T1 >= T2, and at T1 == T2, need1 <= need2): the estimated part is the rest.
    retrieved = chosen1.to(tl.int32)
    estimated = (chosen2 & ~chosen1).to(tl.int32)
    before1 = above1 + tl.minimum(tied1, need1)
    before_est = above2 + tl.minimum(tied2, need2) - before1
    row_t = TOP + (row // H).to(tl.int64) * stb + (row % H).to(tl.int64) * sth
    tl.store(row_t + before1 + tl.cumsum(retrieved, 0) - retrieved, offs, mask=retrieved == 1)
    tl.store(row_t + t1 + before_est + tl.cumsum(estimated, 0) - estimated, offs, mask=estimated == 1)
    if HAS_COUNTS:
        tl.atomic_add(COUNTS, tl.sum(size * retrieved, 0).to(tl.int64))
        tl.atomic_add(COUNTS + 1, tl.sum(size * estimated, 0).to(tl.int64))


def _block(clusters: int) -> int:
    """Chunk size: _MAX_CHUNKS chunks per row (enough programs at batch 1) in blocks of _MIN_BLOCK to
    _MAX_BLOCK clusters (a longer row gets more chunks)."""
    return min(_MAX_BLOCK, max(_MIN_BLOCK, triton.next_power_of_2(triton.cdiv(clusters, _MAX_CHUNKS))))


def new_histogram(rows: int, device) -> torch.Tensor:
    """A zeroed histogram for ``rows`` = B * H rows of a selection, for :func:`count_top_level`."""
    return torch.zeros((rows, _ROW.value), dtype=torch.int32, device=device)


def select_clusters(scores, sizes, clusters, retrieved, estimated, counts=None, top_level=None):
    """The wave index's cluster selection (Triton): (B, H, retrieved + estimated) int32, retrieved clusters
    then estimated ones, each in cluster order; scores (B, H, >= clusters) float and sizes (B, H, >=
    clusters) int32/int64, any strides; counts: None or (2,) int64 to which the selected sizes are added;
    top_level: None, or a :func:`new_histogram` of B * H rows whose first level the kernel that wrote these
    scores already counted (:func:`count_top_level`); it is used up. Same result as the reference."""
    B, H, C = check_select_inputs(scores, sizes, clusters, retrieved, estimated, counts)
    device = _check_device("select_clusters", {"scores": scores, "sizes": sizes, "counts": counts,
                                               "top_level": top_level})
    if top_level is not None and (tuple(top_level.shape) != (B * H, _ROW.value) or top_level.dtype != torch.int32
                                  or not top_level.is_contiguous()):
        raise ValueError(f"top_level must be new_histogram({B * H}) (({B * H}, {_ROW.value}) int32, contiguous), "
                         f"got {tuple(top_level.shape)} {top_level.dtype}")
    top = torch.empty((B, H, retrieved + estimated), dtype=torch.int32, device=device)
    if B * H == 0 or retrieved + estimated == 0:
        return top
    block = _block(C)
    grid = (triton.cdiv(C, block), B * H)
    strides = (*scores.stride(), *sizes.stride())
    t1, t2 = retrieved, retrieved + estimated
    hist = top_level
    if hist is None:
        hist = new_histogram(B * H, device)
        _top_level_kernel[grid](scores, sizes, hist, *strides, H, C, BLOCK=block)
    _middle_level_kernel[grid](scores, sizes, hist, *strides, H, C, t1, t2, BLOCK=block)
    _low_level_kernel[grid](scores, sizes, hist, *strides, H, C, t1, t2, BLOCK=block)
    _write_kernel[grid](scores, sizes, hist, top, top if counts is None else counts, *strides, *top.stride()[:2],
                        H, C, t1, t2, HAS_COUNTS=counts is not None, BLOCK=block)
    return top
