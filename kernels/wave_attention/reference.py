"""Plain PyTorch references for RetroInfer's tripartite decode attention, the shared input checks
and the split rule.

RetroInfer ("wave index") clusters each kv head's cached tokens and answers a decode query in three
parts: the clusters whose centroids score highest are attended **exactly** (their tokens, kept in
cluster-contiguous rows, are gathered), the next ones are **estimated** (each cluster acts as one
pseudo-token with its centroid as key, the mean of its values as value and its size as weight), and
the rest are dropped. The partial results are merged by their log-sum-exps. Decode only: one query
token per sequence (Lq = 1).

Functions (the Triton kernels of ``kernel.py`` have the same signatures and semantics):

* :func:`score_clusters_reference`: centroid logits of every query head, and per kv head the sum
  over its query heads of their softmax over the clusters (what selects the clusters).
* :func:`cluster_attention_reference`: exact attention over the tokens of a list of clusters, read
  from cluster-contiguous rows either directly or through a page table into a pool of pages (the
  wave buffer), as ``num_splits`` partials (out, lse) over contiguous chunks of each cluster list.
* :func:`estimate_clusters_reference`: the centroid estimate of a list of clusters, as partials
  over chunks of the list, like the gather.
* :func:`merge_partials_reference`: the log-sum-exp-weighted combination of any partials.

Notation: B batch, Hq query heads, Hkv kv heads, group = Hq // Hkv (query head h reads kv head
h // group), D key head dim, Dv value head dim. Scores are ``scale * q.k``, then soft-capped to
``softcap * tanh(s / softcap)`` if softcap > 0. lse is the natural-log log-sum-exp; a row (or a
split) that sees nothing has out 0 and lse -inf.

Split rule (:func:`split_bounds`, shared by references and kernels): split s of a list of n used
entries takes entries ``[s * c, min((s + 1) * c, n))`` with ``c = cdiv(n, num_splits)``; splits
past the end are empty. The chunk depends on each (batch, kv head)'s own n, so the splits of a
list are balanced whatever its length. ``num_splits=None`` picks a count with
:func:`choose_num_splits` from static shapes only (no device sync).

These references materialize every (head, token) score in fp32: ground truth for the tests and
for short caches only.
"""
from __future__ import annotations

import math

import torch

from ..anchor_scores.reference import attention_scores

__all__ = [
    "check_estimate_inputs",
    "check_cluster_inputs",
    "check_merge_inputs",
    "check_score_inputs",
    "choose_num_splits",
    "estimate_clusters_reference",
    "cluster_attention_reference",
    "merge_partials_reference",
    "resolve_num_splits",
    "score_clusters_reference",
    "split_bounds",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
MAX_PAGE_SIZE = 128

# --- automatic split rule ------------------------------------------------------------------------
# A split's program walks its list serially (a cluster at a time in cluster_attention, a tile of clusters at a time
# in estimate_clusters): at batch 1 a decode step has only Hkv lists, so even short lists are cut. Measured on an
# H100 at 128K (benchmarks/probes/wave_splits.py: 8 lists of 148 retrieved / 1,901 estimated clusters):
# cluster_attention took 47.6 / 29.1 / 20.2 / 16.9 / 16.1 us at 8 / 16 / 32 / 64 / 128 splits (latency per
# cluster: the fewer per split the better), estimate_clusters 23.4 / 16.1 / 14.8 / 17.3 / 24.3 us (best at two tiles
# of 32 clusters per split; more splits cost more partials to merge).
_SPLIT_MIN_ITEMS = 256            # below this many tokens (clusters) per list, never split
_SPLIT_MIN_ITEMS_PER_SPLIT = 64   # default: each split gets at least about this many
_SPLIT_MAX = 64                   # bounds the partials merge_partials reads
_PROGRAMS_PER_SM = 4              # aim for this many programs per SM
DEFAULT_SM_COUNT = 132            # H100 SXM; used off CUDA (the CPU interpreter)


def choose_num_splits(programs: int, items: int, units: int, sm_count: int = DEFAULT_SM_COUNT,
                      per_split: int = _SPLIT_MIN_ITEMS_PER_SPLIT) -> int:
    """How many splits a list gets when ``num_splits`` is None (at least 1); thresholds from one H100
    profile (see the constants above).

    programs: programs of one split (B * Hkv); items: the longest list's work in tokens (cluster
    attention: TOKENS_PER_CLUSTER per cluster) or clusters (estimate: E); units: its entries (clusters),
    the finest a list can be cut; per_split: the fewest items a split should get. Split when programs
    fill fewer than ``4 * sm_count`` slots and ``items >= 256``, into enough splits to fill them, but no
    more than cdiv(items, per_split), 64, or the units.
    """
    target = _PROGRAMS_PER_SM * sm_count
    if items < _SPLIT_MIN_ITEMS or programs >= target:
        return 1
    return max(1, min(-(-target // programs), -(-items // per_split), _SPLIT_MAX, units))


def resolve_num_splits(num_splits, programs: int, items: int, units: int, device: torch.device,
                       per_split: int = _SPLIT_MIN_ITEMS_PER_SPLIT) -> int:
    """num_splits (already checked: None or a positive int), or the automatic count for that
    device's SM count if it is None (see :func:`choose_num_splits`)."""
    if num_splits is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" \
            else DEFAULT_SM_COUNT
        return choose_num_splits(programs, items, units, sms, per_split)
    return num_splits


def split_bounds(count: torch.Tensor, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi), each (num_splits, *count.shape) int64: split s of a list of ``count`` used entries
    takes entries lo <= j < hi, lo = s * c, hi = min(lo + c, count), c = cdiv(count, num_splits)
    (empty when lo >= count). count: int tensor, already clamped to [0, list length]."""
    count = count.long()
    chunk = (count + num_splits - 1) // num_splits
    s = torch.arange(num_splits, device=count.device).view(-1, *([1] * count.dim()))
    lo = s * chunk
    return lo, torch.minimum(lo + chunk, count)


# --- input checks (shared by kernels and references) ---------------------------------------------

def _describe(t):
    return (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_tensor(name, t, dims, dtypes, what):
    if not isinstance(t, torch.Tensor) or t.dim() != dims or t.dtype not in dtypes:
        raise ValueError(f"{name} must be a {dims}-D tensor {what} of dtype "
                         f"{'/'.join(str(d).removeprefix('torch.') for d in dtypes)}, got {_describe(t)}")


def _check_shape(name, t, shape, what):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {what} = {tuple(shape)}, got {tuple(t.shape)}")


def _check_num_splits(num_splits):
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or num_splits < 1):
        raise ValueError(f"num_splits must be None or a positive int, got {num_splits!r}")


def _check_query(q, Hkv, scale, softcap):
    """(B, Hq, D) of a decode query (B, Hq, 1, D) attending kv heads Hkv; checks scale and softcap."""
    _check_tensor("q", q, 4, _FLOAT_DTYPES, "(B, Hq, 1, D)")
    B, Hq, Lq, D = q.shape
    if Lq != 1:
        raise ValueError(f"q must hold one decode query per sequence (B, Hq, 1, D), got {tuple(q.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads Hq = {Hq} must be a multiple of kv heads Hkv = {Hkv} (GQA)")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    if not (float(softcap) >= 0.0):
        raise ValueError(f"softcap must be >= 0 (0 = off), got {softcap!r}")
    return B, Hq, D


def check_score_inputs(q, centroids, clusters, *, scale, softcap):
    """Validate the inputs of ``score_clusters``; returns (B, Hq, Hkv, D, clusters)."""
    _check_tensor("centroids", centroids, 4, _FLOAT_DTYPES, "(B, Hkv, Ccap, D)")
    B, Hkv, Ccap, Dc = centroids.shape
    Bq, Hq, D = _check_query(q, Hkv, scale, softcap)
    if (Bq, D) != (B, Dc):
        raise ValueError(f"q (B, Hq, 1, D) and centroids (B, Hkv, Ccap, D) disagree: q {tuple(q.shape)}, "
                         f"centroids {tuple(centroids.shape)}")
    if isinstance(clusters, bool) or not isinstance(clusters, int) or not 1 <= clusters <= Ccap:
        raise ValueError(f"clusters must be a python int in [1, Ccap = {Ccap}], got {clusters!r}")
    return B, Hq, Hkv, D, clusters


def check_cluster_inputs(q, keys, values, starts, sizes, selected, page_table, *, scale, softcap, num_splits):
    """Validate the inputs of ``cluster_attention``; returns (B, Hq, Hkv, D, Dv, R, P) (P = 0 without a
    page table)."""
    _check_num_splits(num_splits)
    _check_tensor("starts", starts, 3, (torch.int32,), "(B, Hkv, Ccap)")
    _check_tensor("sizes", sizes, 3, (torch.int32,), "(B, Hkv, Ccap)")
    _check_tensor("selected", selected, 3, _INDEX_DTYPES, "(B, Hkv, R)")
    B, Hkv, Ccap = starts.shape
    Bq, Hq, D = _check_query(q, Hkv, scale, softcap)
    if Bq != B:
        raise ValueError(f"q {tuple(q.shape)} and starts {tuple(starts.shape)} must have the same batch size")
    _check_shape("sizes", sizes, (B, Hkv, Ccap), "(B, Hkv, Ccap) like starts")
    R = selected.shape[2]
    _check_shape("selected", selected, (B, Hkv, R), "(B, Hkv, R)")
    if page_table is None:
        _check_tensor("keys", keys, 4, _FLOAT_DTYPES, "(B, Hkv, N, D)")
        _check_tensor("values", values, 4, _FLOAT_DTYPES, "(B, Hkv, N, Dv)")
        _check_shape("keys", keys, (B, Hkv, keys.shape[2], D), "(B, Hkv, N, D) with q's D")
        _check_shape("values", values, (B, Hkv, keys.shape[2], values.shape[3]), "(B, Hkv, N, Dv) like keys")
        return B, Hq, Hkv, D, values.shape[3], R, 0
    _check_tensor("page_table", page_table, 3, (torch.int32,), "(B, Hkv, Pcap)")
    _check_shape("page_table", page_table, (B, Hkv, page_table.shape[2]), "(B, Hkv, Pcap)")
    _check_tensor("keys", keys, 3, _FLOAT_DTYPES, "(S, P, D) page pool")
    _check_tensor("values", values, 3, _FLOAT_DTYPES, "(S, P, Dv) page pool")
    S, P = keys.shape[:2]
    _check_shape("keys", keys, (S, P, D), "(S, P, D) with q's D")
    _check_shape("values", values, (S, P, values.shape[2]), "(S, P, Dv) like keys")
    if P < 1 or P > MAX_PAGE_SIZE or P & (P - 1):
        raise ValueError(f"the page size P (keys.shape[1]) must be a power of 2 <= {MAX_PAGE_SIZE}, got {P}")
    return B, Hq, Hkv, D, values.shape[2], R, P


def check_estimate_inputs(logits, value_means, sizes, selected, count, *, num_splits):
    """Validate the inputs of ``estimate_clusters``; returns (B, Hq, Hkv, C, Dv, E)."""
    _check_num_splits(num_splits)
    _check_tensor("logits", logits, 3, (torch.float32,), "(B, Hq, C)")
    _check_tensor("value_means", value_means, 4, _FLOAT_DTYPES, "(B, Hkv, Ccap, Dv)")
    _check_tensor("sizes", sizes, 3, (torch.int32,), "(B, Hkv, Ccap)")
    _check_tensor("selected", selected, 3, _INDEX_DTYPES, "(B, Hkv, E)")
    B, Hq, C = logits.shape
    Bv, Hkv, Ccap, Dv = value_means.shape
    if Bv != B or Hkv == 0 or Hq % Hkv != 0 or Ccap < C:
        raise ValueError(f"logits (B, Hq, C) and value_means (B, Hkv, Ccap >= C, Dv) disagree (Hq must be a "
                         f"multiple of Hkv): logits {tuple(logits.shape)}, value_means {tuple(value_means.shape)}")
    _check_shape("sizes", sizes, (B, Hkv, Ccap), "(B, Hkv, Ccap)")
    E = selected.shape[2]
    _check_shape("selected", selected, (B, Hkv, E), "(B, Hkv, E)")
    if count is not None:
        _check_tensor("count", count, 2, (torch.int32,), "(B, Hkv)")
        _check_shape("count", count, (B, Hkv), "(B, Hkv)")
    return B, Hq, Hkv, C, Dv, E


def check_merge_inputs(outs, lses, dtype):
    """Validate the inputs of ``merge_partials``; returns them as lists of (S_i, B, Hq, Dv) and
    (S_i, B, Hq) views (a (B, Hq, Dv) / (B, Hq) partial gets S_i = 1) and (B, Hq, Dv)."""
    if not isinstance(outs, (list, tuple)) or not isinstance(lses, (list, tuple)) or not outs \
            or len(outs) != len(lses):
        raise ValueError("outs and lses must be non-empty lists of the same length, got "
                         f"{type(outs).__name__} / {type(lses).__name__}")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be float16/bfloat16/float32, got {dtype!r}")
    parts, part_lses = [], []
    for i, (out, lse) in enumerate(zip(outs, lses)):
        if isinstance(out, torch.Tensor) and out.dim() == 3:
            out = out[None]
        if isinstance(lse, torch.Tensor) and lse.dim() == 2:
            lse = lse[None]
        _check_tensor(f"outs[{i}]", out, 4, _FLOAT_DTYPES, "(S_i, B, Hq, Dv) or (B, Hq, Dv)")
        _check_tensor(f"lses[{i}]", lse, 3, (torch.float32,), "(S_i, B, Hq) or (B, Hq)")
        _check_shape(f"lses[{i}]", lse, out.shape[:3], "outs[i].shape[:3]")
        _check_shape(f"outs[{i}]", out, (out.shape[0], *parts[0].shape[1:]) if parts else out.shape,
                     "(S_i, B, Hq, Dv) with outs[0]'s B, Hq, Dv")
        parts.append(out)
        part_lses.append(lse)
    return parts, part_lses, tuple(parts[0].shape[1:])


# --- references ------------------------------------------------------------------------------

def score_clusters_reference(q, centroids, clusters, *, scale, softcap=0.0):
    """fp32 centroid logits and cluster scores.

    q: (B, Hq, 1, D) fp16/bf16/fp32; centroids: (B, Hkv, Ccap, D), only the first ``clusters``
    (python int, 1 <= clusters <= Ccap) are read (the rest may be garbage).
    Returns (logits (B, Hq, clusters), scores (B, Hkv, clusters)), both fp32: logits =
    softcap(scale * q.c); scores = the sum over a kv head's query heads of their softmax over the
    clusters (so each (b, kv head) row of scores sums to group).
    """
    B, Hq, Hkv, _, C = check_score_inputs(q, centroids, clusters, scale=scale, softcap=softcap)
    logits = attention_scores(q, centroids[:, :, :C], scale=scale, softcap=softcap)[:, :, 0]
    scores = torch.softmax(logits, dim=-1).view(B, Hkv, Hq // Hkv, C).sum(dim=2)
    return logits.contiguous(), scores


# Automatic splits of a cluster list count its work in tokens at the default 16 tokens per cluster: the sizes
# of the selected clusters are on the device, and reading them would cost a sync.
TOKENS_PER_CLUSTER = 16
CLUSTER_SPLIT_TOKENS = 2 * TOKENS_PER_CLUSTER   # cluster_attention: about two clusters per split


def cluster_rows(keys, values, starts, sizes, selected, page_table):
    """fp32 keys (B, Hkv, R, Lmax, D) and values (B, Hkv, R, Lmax, Dv) of the selected clusters' tokens, padded
    with zeros to the longest, and real (B, Hkv, R, Lmax) bool (a padding token is never real)."""
    B, Hkv, R = selected.shape
    cluster = selected.long()
    start = starts.long().gather(2, cluster)                                # (B, Hkv, R)
    size = sizes.long().gather(2, cluster).clamp_min(0)
    longest = int(size.max()) if size.numel() else 0
    t = torch.arange(longest, device=selected.device)
    real = t < size[..., None]                                             # (B, Hkv, R, Lmax)
    row = torch.where(real, start[..., None] + t, 0)
    if page_table is None:
        flat = row.flatten(2)                                              # (B, Hkv, R * Lmax)
        k = keys.gather(2, flat[..., None].expand(-1, -1, -1, keys.shape[-1]))
        v = values.gather(2, flat[..., None].expand(-1, -1, -1, values.shape[-1]))
    else:
        P = keys.shape[1]
        slot = page_table.long().gather(2, (row // P).flatten(2)).clamp_min(0)   # stale entries of unread pages
        slot = torch.where(real.flatten(2), slot, 0)
        k = keys[slot, row.flatten(2) % P]
        v = values[slot, row.flatten(2) % P]
    shape = (B, Hkv, R, longest)
    # Zero what is not real before any product: it may be NaN and 0 * NaN = NaN.
    # (Explicit head dims: with no token at all, view(..., -1) of 0 elements would be ambiguous.)
    k = k.float().view(*shape, keys.shape[-1]).masked_fill(~real[..., None], 0.0)
    v = v.float().view(*shape, values.shape[-1]).masked_fill(~real[..., None], 0.0)
    return k, v, real


def cluster_attention_reference(q, keys, values, starts, sizes, selected, *, scale, softcap=0.0, page_table=None,
                                num_splits=None):
    """fp32 exact attention of each decode query over the tokens of its kv head's selected clusters, as split
    partials.

    q: (B, Hq, 1, D) fp16/bf16/fp32. starts, sizes: (B, Hkv, Ccap) int32: cluster c of (b, h) holds the rows
    [starts[b, h, c], starts[b, h, c] + sizes[b, h, c]) of (b, h); selected: (B, Hkv, R) int32/int64 cluster ids,
    all used. Rows live in keys (B, Hkv, N, D) / values (B, Hkv, N, Dv) (page_table None), or with page_table
    (B, Hkv, Pcap) int32 in page pools keys (S, P, D) / values (S, P, Dv): row r of (b, h) is row r % P of slot
    page_table[b, h, r // P] (entries of pages no selected cluster covers are never read). Rows outside the
    selected clusters are never read into a product, whatever they hold.
    num_splits: None (automatic, :func:`choose_num_splits` at TOKENS_PER_CLUSTER tokens per cluster) or a
    positive int: the cluster list is cut by :func:`split_bounds`.
    Returns (out (num_splits, B, Hq, Dv), lse (num_splits, B, Hq)), fp32 (0 and -inf for a split without tokens).
    """
    B, Hq, Hkv, _, Dv, R, _ = check_cluster_inputs(q, keys, values, starts, sizes, selected, page_table,
                                                   scale=scale, softcap=softcap, num_splits=num_splits)
    num_splits = resolve_num_splits(num_splits, B * Hkv, TOKENS_PER_CLUSTER * R, R, q.device, CLUSTER_SPLIT_TOKENS)
    group = Hq // Hkv
    k, v, real = cluster_rows(keys, values, starts, sizes, selected, page_table)
    Lmax = real.shape[-1]
    s = attention_scores(q, k.flatten(2, 3), scale=scale, softcap=softcap)[:, :, 0]   # (B, Hq, R * Lmax)
    lo, hi = split_bounds(torch.full((B, Hkv), R, device=q.device), num_splits)        # (num_splits, B, Hkv)
    j = torch.arange(R, device=q.device)
    in_split = (j >= lo[..., None]) & (j < hi[..., None])                              # (num_splits, B, Hkv, R)
    vis = (in_split[..., None] & real).flatten(3, 4).repeat_interleave(group, dim=2)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1) if Lmax else torch.full(s.shape[:-1], float("-inf"), device=q.device)
    p = torch.where(vis, torch.exp(s - lse[..., None]), 0.0)
    out = torch.einsum("sbht,bhtd->sbhd", p, v.flatten(2, 3).repeat_interleave(group, dim=1))
    return out, lse


def estimate_clusters_reference(logits, value_means, sizes, selected, count=None, *, num_splits=None):
    """fp32 centroid estimate of the selected clusters, as split partials.

    logits: (B, Hq, C) fp32 centroid logits (from score_clusters); value_means: (B, Hkv, Ccap, Dv),
    Ccap >= C, the mean of each cluster's values (any float dtype); sizes: (B, Hkv, Ccap) int32, its token
    count; selected: (B, Hkv, E) int32/int64 cluster ids < C; count: None (all E entries are used) or
    (B, Hkv) int32, clamped to [0, E]: the first count[b, h] entries of selected[b, h] are used (later
    ones are never read).
    num_splits: None (automatic, :func:`choose_num_splits` over E) or a positive int; the list of
    selected clusters is cut by :func:`split_bounds`.

    Each used cluster c with size_c > 0 is one pseudo-token of score logit_c, weight size_c and
    value value_means_c. Per query head and split: lse = log(sum_c size_c exp(logit_c)) and
    out = sum_c size_c exp(logit_c) value_means_c / sum_c size_c exp(logit_c), the attention output the
    clusters' tokens would give if each had its centroid's score. Returns (out (num_splits, B, Hq,
    Dv), lse (num_splits, B, Hq)), fp32; a split with no such cluster has out 0 and lse -inf.
    """
    B, Hq, Hkv, _, Dv, E = check_estimate_inputs(logits, value_means, sizes, selected, count,
                                                 num_splits=num_splits)
    num_splits = resolve_num_splits(num_splits, B * Hkv, E, E, logits.device)
    group = Hq // Hkv
    n = torch.full((B, Hkv), E, device=logits.device) if count is None else count.long().clamp(0, E)
    e = torch.arange(E, device=logits.device)
    used = e < n[..., None]                                                # (B, Hkv, E)
    cluster = torch.where(used, selected.long(), 0)   # entries past count may be any value
    size = sizes.long().gather(2, cluster)
    ok = used & (size > 0)
    vs = value_means.float().gather(2, cluster[..., None].expand(-1, -1, -1, Dv)) * size[..., None]
    vs = vs.masked_fill(~ok[..., None], 0.0)                               # (B, Hkv, E, Dv) value sums
    lg = logits.gather(2, cluster.repeat_interleave(group, dim=1))         # (B, Hq, E)
    lo, hi = split_bounds(n, num_splits)
    vis = ((e >= lo[..., None]) & (e < hi[..., None]) & ok).repeat_interleave(group, dim=2)
    weighted = torch.where(vis, lg + size.float().log().repeat_interleave(group, dim=1), float("-inf"))
    lse = torch.logsumexp(weighted, dim=-1)                                # (num_splits, B, Hq)
    p = torch.where(vis, torch.exp(lg - lse[..., None]), 0.0)
    out = torch.einsum("sbhe,bhed->sbhd", p, vs.repeat_interleave(group, dim=1))
    return out, lse


def merge_partials_reference(outs, lses, dtype, *, return_lse=False):
    """Log-sum-exp-weighted combination of attention partials (fp32 math).

    outs: list of (S_i, B, Hq, Dv) float (or (B, Hq, Dv): S_i = 1; 16-bit ones are read as fp32); lses: the matching (S_i, B, Hq)
    (or (B, Hq)) fp32 natural-log log-sum-exps; a partial with lse -inf is ignored (its out is not
    read). Returns out (B, Hq, 1, Dv) in ``dtype`` = sum_i exp(lse_i - L) out_i with L the
    logsumexp of all lse_i (exactly 0 where every lse is -inf), and with return_lse also L
    (B, Hq, 1) fp32.
    """
    parts, part_lses, (B, Hq, Dv) = check_merge_inputs(outs, lses, dtype)
    lse = torch.cat(part_lses)                                 # (S, B, Hq)
    total = torch.logsumexp(lse, dim=0)                        # -inf where every partial is empty
    seen = lse > float("-inf")
    w = torch.where(seen, torch.exp(lse - total), 0.0)
    out = (w[..., None] * torch.cat([p.float() for p in parts]).masked_fill(~seen[..., None], 0.0)).sum(dim=0)
    out = out.view(B, Hq, 1, Dv).to(dtype)
    return (out, total.view(B, Hq, 1)) if return_lse else out
