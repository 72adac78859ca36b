"""Triton kernels of RetroInfer's tripartite decode attention over a clustered KV cache.

Public entry points: :func:`score_clusters`, :func:`cluster_attention`, :func:`estimate_clusters`
and :func:`merge_partials`. Their semantics, shapes and the split rule are those of
:mod:`kvpass.kernels.wave_attention.reference`, the ground truth in the tests.

Design
------
* **Rows = the query heads of a GQA group** (cluster attention, estimate). As in
  :mod:`kvpass.kernels.attention.dense` (whose @triton.jit helpers these kernels reuse), a program
  owns one ``(batch, kv head)`` and a block of ``BLOCK_M >= 16`` rows, row ``g`` being query head
  ``kv_head * group + g`` (decode: one query per head), so every key / value / value-mean tile is
  loaded once for the whole group and ``tl.dot`` has M >= 16. Padded rows read zeros and are
  never written.
* **score_clusters** parallelises over clusters (decode at batch 1 has only B * Hkv programs per
  cluster block): kernel 1, grid ``(cdiv(C, BLOCK_C), B * Hkv)``, loads a block of centroids
  once, computes the logits of each of the group's heads in turn (a GEMV: no tl.dot, see
  :func:`_centroid_logits_kernel`), writes them and each head's (max, sum of exp) over the block.
  Kernel 2 (its own, larger cluster blocks) merges those partials into each head's lse, re-reads
  the logits and writes ``sum_g exp(logit - lse)``.
* **cluster_attention**: grid ``(row blocks, B * Hkv, num_splits)``; a program walks its split's
  selected clusters in list order, ``BLOCK_G = 8`` at a time: it loads the group's (start, size),
  lays the group's tokens end to end and runs over them in tiles of ``BLOCK_N = 32`` (a tile may
  span clusters; each slot's row comes from the prefix sums of the sizes, and slots past the group's
  tokens are masked *at the load*, ``other=0``, so whatever lies between clusters, even NaN, never
  enters a dot). A walk per cluster chained one load round trip per cluster (a split of ~5 clusters
  took 15 us at 128K); a group needs one. One
  online softmax (exp2 domain, as the dense kernel) across all tiles of all its clusters. The rows
  are read directly from (B, Hkv, N, D) keys / values or, with a page table (constexpr
  ``HAS_TABLE``: the direct path has no table loads), from (S, P, D) page pools, row r being row
  ``r % P`` of slot ``table[r // P]`` (one table load per token of a tile). Only the addresses
  differ between the two paths: same tiles, same operations in the same order, hence bit-identical
  results for the same rows (the store's offload mode relies on it).
* **estimate_clusters**: grid ``(row blocks, B * Hkv, num_splits)``, tiles of ``BLOCK_E``
  selected clusters: gathers the logits (one per head and cluster) and value means, and runs the
  online softmax over pseudo-tokens weighted by the cluster sizes (``size * exp(logit)`` weighs
  the mean in the numerator and counts in the normalizer). Without ``count`` (constexpr
  ``HAS_COUNT``) all entries of ``selected`` are used and no count is read.
* **Splits** (cluster attention, estimate): the list of each (batch, kv head) is cut in-kernel by
  the rule of :func:`~kvpass.kernels.wave_attention.reference.split_bounds` (chunk = cdiv(n,
  num_splits) entries, n = R for cluster attention, count or E for the estimate); every split
  writes its normalized partial (out, lse), 0 / -inf if empty. There is no combine step:
  :func:`merge_partials` (grid ``(B * Hq,)``) merges any number of partials.
* **lse** is written as in the dense kernel: ``ln(2) * (m + log2(l))``, -inf when nothing is seen.

Precision
---------
Softmax, scaling and soft-capping are fp32. cluster_attention uses 16-bit ``tl.dot`` operands
(probabilities rounded to that dtype before the PV product, fp32 accumulation) when q, keys and
values share a 16-bit dtype, fp32 operands with ``input_precision="ieee"`` otherwise. Centroid
logits are fp32 products and sums, estimation uses fp32 "ieee" dots (value means are read as
fp32). As in the dense kernel, under the CPU interpreter bf16 dot operands are multiplied as fp32
(numpy has no bf16).

Speed
-----
Block sizes and warps follow simple rules; cluster_attention's ``BLOCK_G`` and ``BLOCK_N`` were **not tuned
on a GPU**. The automatic split counts come from one sweep (benchmarks/probes/wave_splits.py, see
reference.py), the scoring's block and warps from another (benchmarks/probes/wave_score_blocks.py: every
setting tried was within 15 %). In the store's decode step at 128K on an H100 (Triton 3.6, B = 1, Hkv = 8,
group = 4, D = Dv = 128, fp16, 148 retrieved and 1,901 estimated clusters per kv head;
benchmarks/probes/wave_profile.py, benchmarks/results/probe-wave-profile-20261123.txt) the profiler shows
the centroid logits 13.1 us (16.7 MB at 1.3 TB/s), cluster_attention 12.5 us (64 splits), estimate_clusters
9.4 us (30 splits), the scores with the select's first level 6.9 us and merge_partials 5.5 us.
An offline sm_90a compile with Triton 3.9 (no GPU) showed small spills (<= 40 bytes) in a few configurations of
cluster_attention (fp32 or paged 16-bit operands, before its grouped walk) and of estimate_clusters, not
investigated.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention.dense import (
    _check_device,
    _launch_config,
    _store_rows,
    load_q,
    program_rows,
    scores,
    soft_capped,
    softmax_step,
)
from ..cluster_select.kernel import count_top_level, new_histogram
from .reference import (
    CLUSTER_SPLIT_TOKENS,
    TOKENS_PER_CLUSTER,
    check_cluster_inputs,
    check_estimate_inputs,
    check_merge_inputs,
    check_score_inputs,
    resolve_num_splits,
)

__all__ = ["cluster_attention", "estimate_clusters", "merge_partials", "score_clusters"]

_LOG2E = tl.constexpr(1.4426950408889634)   # a constexpr: the kernels read it too

# --- launch parameters (NOT TUNED on a GPU) -----------------------------------------------------
_SCORE_BLOCK_C = 64       # centroids per program of kernel 1 (32..64 were best on an H100 with fp32 centroids)
_SCORE_WARPS = 4          # warps of kernel 1
_SCORE_BLOCK_M = 16       # query heads per step of kernel 2
_SCORE_REDUCE_BLOCK_C = 256   # clusters per program of kernel 2: fewer programs re-reduce the partials
_SCORE_BLOCK_B = 64       # block partials merged per step in kernel 2
_MERGE_BLOCK_S = 64       # partials per step of merge_partials (a 128K step has ~95: two steps, not six)
# cluster_attention walks its clusters in groups of _CLUSTER_BLOCK_G, their tokens end to end in tiles of
# _CLUSTER_BLOCK_N (a tile may span clusters): one dependent load chain per group, not one per cluster (clusters
# hold ~16 tokens on average, often 1..60; at two clusters per split a group is one or two tiles). NOT TUNED.
_CLUSTER_BLOCK_G = 8
_CLUSTER_BLOCK_N = 32


def _score_scales(scale, softcap, log2_domain):
    """(qk_scale, softcap factor) for dense.scores and dense.soft_capped: scores come out in the log2
    domain (times log2(e)) if log2_domain, else in the natural-log domain. With soft-capping,
    qk_scale = 2 log2(e) scale / softcap either way (the tanh is computed with exp2)."""
    unit = _LOG2E.value if log2_domain else 1.0
    if softcap > 0:
        return 2.0 * _LOG2E.value * float(scale) / float(softcap), float(softcap) * unit
    return float(scale) * unit, 0.0


def _dot_modes(q, others, device):
    """(DOT_FP32, UPCAST_DOT) as in the dense kernel: 16-bit operands iff q and others share a
    16-bit dtype; under the interpreter, bf16 operands are multiplied as fp32."""
    dtypes = {q.dtype} | {t.dtype for t in others}
    dot_fp32 = not (len(dtypes) == 1 and q.dtype in (torch.float16, torch.bfloat16))
    return dot_fp32, dot_fp32 or (device.type != "cuda" and q.dtype == torch.bfloat16)


@triton.jit
def _split_range(n, pid_s, num_splits):
    """[lo, hi): the entries of split pid_s of a list of n used entries, by reference.split_bounds:
    chunk = cdiv(n, num_splits), lo = pid_s * chunk, hi = min(lo + chunk, n) (lo >= hi: empty)."""
    chunk = tl.cdiv(n, num_splits)
    lo = pid_s * chunk
    return lo, tl.minimum(lo + chunk, n)


# --- score_clusters ----------------------------------------------------------------------------

@triton.jit
def _centroid_logits_kernel(
    Q, CENT, LOGITS, M_PART, L_PART,
    sqb, sqh, sqd, scb, sch, scc, scd, slb, slh, slc,
    Hkv, group, C, D, num_blocks, qk_scale, softcap_scale,
    HAS_SOFTCAP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Logits of centroids [pid_c * BLOCK_C, +BLOCK_C) of (batch, kv head) pid_bh, for all its query heads.

    Grid: (cdiv(C, BLOCK_C), B * Hkv). Q (B, Hq, 1, D); CENT (B, Hkv, Ccap, D); writes LOGITS
    (B, Hq, C) fp32 and, per head, the block's max logit and sum of exp(logit - max) into M_PART
    and L_PART (B * Hq, num_blocks) fp32. Every block holds at least one cluster, so both are finite.
    The centroid tile is loaded once; each head's logits are a product-and-sum over D (a GEMV: a
    tl.dot would pad the group to 16 rows and run fp32 on FMA units, 4.6x slower on an H100).
    """
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)     # int64: batch/head offsets of a large cache overflow int32
    hkv = (pid_bh % Hkv).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    # Centroids past C may be garbage: loaded as 0, their logits are masked below.
    cent = tl.load(CENT + b * scb + hkv * sch + offs_c[:, None].to(tl.int64) * scc + offs_d[None, :] * scd,
                   mask=c_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    for g in range(group):
        head = hkv * group + g
        q = tl.load(Q + b * sqb + head * sqh + offs_d * sqd, mask=d_ok, other=0.0).to(tl.float32)
        logit = soft_capped(tl.sum(cent * q[None, :], 1), qk_scale, softcap_scale, HAS_SOFTCAP)
        tl.store(LOGITS + b * slb + head * slh + offs_c * slc, logit, mask=c_ok)
        logit = tl.where(c_ok, logit, float("-inf"))
        m = tl.max(logit, 0)
        part = (b * Hkv * group + head) * num_blocks + pid_c
        tl.store(M_PART + part, m)
        tl.store(L_PART + part, tl.sum(tl.exp(logit - m), 0))


@triton.jit
def _cluster_scores_kernel(
    LOGITS, M_PART, L_PART, SCORES, SIZES, HIST,
    slb, slh, slc, ssb, ssh, ssc, szb, szh, szc,
    Hkv, group, C, num_blocks,
    HAS_HIST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Scores of clusters [pid_c * BLOCK_C, +BLOCK_C) of (batch, kv head) pid_bh.

    Grid: (cdiv(C, BLOCK_C), B * Hkv). Merges each head's block partials (M_PART, L_PART, see
    _centroid_logits_kernel) into its lse, then writes SCORES (B, Hkv, C) fp32 =
    sum over the group's heads of exp(LOGITS - lse). With HAS_HIST it also counts the cluster selection's
    first level (SIZES (B, Hkv, Ccap) int, HIST a cluster_select histogram, row pid_bh), saving that pass.
    """
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hkv = (pid_bh % Hkv).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    score = tl.zeros([BLOCK_C], tl.float32)
    for r0 in range(0, group, BLOCK_M):
        g = r0 + tl.arange(0, BLOCK_M)
        row_ok = g < group
        head = hkv * group + g
        part_row = (b * Hkv * group + head) * num_blocks
        m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_run = tl.zeros([BLOCK_M], tl.float32)
        for j0 in range(0, num_blocks, BLOCK_B):
            j = j0 + tl.arange(0, BLOCK_B)
            ok = row_ok[:, None] & (j < num_blocks)[None, :]
            m = tl.load(M_PART + part_row[:, None] + j[None, :], mask=ok, other=float("-inf"))
            l_blk = tl.load(L_PART + part_row[:, None] + j[None, :], mask=ok, other=0.0)
            m_new = tl.maximum(m_run, tl.max(m, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # padded rows stay -inf
            l_run = l_run * tl.exp(m_run - m_safe) + tl.sum(l_blk * tl.exp(m - m_safe[:, None]), 1)
            m_run = m_new
        # lse is finite for real rows (cluster 0 is in block 0); padded rows get +inf, so their
        # logits (loaded as -inf) give exp(-inf) = 0 with no inf - inf.
        lse = tl.where(row_ok, m_run + tl.log(tl.where(row_ok, l_run, 1.0)), float("inf"))
        logit = tl.load(LOGITS + b * slb + head[:, None] * slh + offs_c[None, :] * slc,
                        mask=row_ok[:, None] & c_ok[None, :], other=float("-inf"))
        score += tl.sum(tl.exp(logit - lse[:, None]), 0)
    tl.store(SCORES + b * ssb + hkv * ssh + offs_c * ssc, score, mask=c_ok)
    if HAS_HIST:
        size = tl.load(SIZES + b * szb + hkv * szh + offs_c * szc, mask=c_ok, other=0).to(tl.int32)
        count_top_level(HIST, pid_bh, score, size, c_ok)


def score_clusters(q, centroids, clusters, *, scale, softcap=0.0, select_sizes=None):
    """Centroid logits and cluster scores (Triton).

    q: (B, Hq, 1, D) fp16/bf16/fp32, any strides; centroids: (B, Hkv, Ccap, D) (fp32; any float
    dtype is read as fp32), any strides; only the first ``clusters`` (python int, 1 <= clusters <=
    Ccap) are read. scale / softcap (0 = off): as in the attention kernel.
    Returns (logits (B, Hq, clusters), scores (B, Hkv, clusters)), new contiguous fp32 tensors:
    logits = softcap(scale * q.c); scores = sum over a kv head's query heads of their softmax over
    the clusters. With select_sizes ((B, Hkv, >= clusters) int32/int64, the clusters' sizes) also a third
    tensor: the cluster selection's histogram with its first level counted, for
    ``cluster_select.select_clusters(..., top_level=)`` on these scores and sizes.
    """
    B, Hq, Hkv, D, C = check_score_inputs(q, centroids, clusters, scale=scale, softcap=softcap)
    device = _check_device("score_clusters", {"q": q, "centroids": centroids, "select_sizes": select_sizes})
    if select_sizes is not None and (select_sizes.dim() != 3 or tuple(select_sizes.shape[:2]) != (B, Hkv)
                                     or select_sizes.shape[2] < C
                                     or select_sizes.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"select_sizes must be a ({B}, {Hkv}, >= {C}) int32/int64 tensor, got "
                         f"{tuple(select_sizes.shape)} {select_sizes.dtype}")
    logits = torch.empty((B, Hq, C), dtype=torch.float32, device=device)
    scores_out = torch.empty((B, Hkv, C), dtype=torch.float32, device=device)
    hist = None if select_sizes is None else new_histogram(B * Hkv, device)
    if B > 0:
        group = Hq // Hkv
        num_blocks = triton.cdiv(C, _SCORE_BLOCK_C)
        m_part = torch.empty((B * Hq, num_blocks), dtype=torch.float32, device=device)
        l_part = torch.empty_like(m_part)
        BLOCK_D = max(16, triton.next_power_of_2(D))
        qk_scale, softcap_scale = _score_scales(scale, softcap, log2_domain=False)
        _centroid_logits_kernel[(num_blocks, B * Hkv)](
            q, centroids, logits, m_part, l_part,
            q.stride(0), q.stride(1), q.stride(3), *centroids.stride(), *logits.stride(),
            Hkv, group, C, D, num_blocks, qk_scale, softcap_scale,
            HAS_SOFTCAP=softcap > 0, BLOCK_C=_SCORE_BLOCK_C, BLOCK_D=BLOCK_D, num_warps=_SCORE_WARPS,
        )
        size_strides = (0, 0, 0) if select_sizes is None else select_sizes.stride()
        _cluster_scores_kernel[(triton.cdiv(C, _SCORE_REDUCE_BLOCK_C), B * Hkv)](
            logits, m_part, l_part, scores_out, select_sizes, hist, *logits.stride(), *scores_out.stride(),
            *size_strides, Hkv, group, C, num_blocks, HAS_HIST=hist is not None,
            BLOCK_M=_SCORE_BLOCK_M, BLOCK_C=_SCORE_REDUCE_BLOCK_C, BLOCK_B=_SCORE_BLOCK_B, num_warps=4,
        )
    return (logits, scores_out) if hist is None else (logits, scores_out, hist)


# --- cluster_attention -------------------------------------------------------------------------

@triton.jit
def _cluster_attention_kernel(
    Q, K, V, STARTS, SIZES, SEL, TABLE, OUT, LSE,
    sqb, sqh, sqd, sk0, sk1, skr, skd, sv0, sv1, svr, svd,
    stb, sth, stc, szb, szh, szc, seb, seh, see, spb, sph, spj,
    sos, sob, soh, sod, sls, slb, slh,
    Hkv, group, R, num_splits, D, DV, qk_scale, softcap_log2,
    HAS_TABLE: tl.constexpr, PAGE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr,
    UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program: rows [pid_m * BLOCK_M, +BLOCK_M) of (batch, kv head) pid_bh, split pid_s of its
    selected clusters.

    Grid: (cdiv(group, BLOCK_M), B * Hkv, num_splits). Q (B, Hq, 1, D); STARTS, SIZES (B, Hkv, Ccap)
    int32; SEL (B, Hkv, R) int32/int64, all R entries used. Without HAS_TABLE, K (B, Hkv, N, D) and
    V (B, Hkv, N, Dv) with strides (sk0, sk1, skr, skd) = (batch, head, row, dim); with HAS_TABLE,
    K (S, PAGE, D) / V (S, PAGE, Dv) page pools with strides (sk0, -, skr, skd) = (slot, unused, row in
    page, dim) and TABLE (B, Hkv, Pcap) int32: row r of (b, h) is row r % PAGE of slot TABLE[b, h, r // PAGE].
    Writes OUT (num_splits, B, Hq, Dv) and LSE (num_splits, B, Hq) fp32, normalized per split.

    Both paths run the same tiles in the same order (the selected clusters in list order, BLOCK_G at a
    time, the group's tokens end to end in tiles of BLOCK_N): only the tile addresses differ, so they give
    bit-identical results for the same rows. Slots past the group's tokens are masked at the load
    (other=0): what lies between clusters (even NaN) never enters a product, and no table entry of it is read.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b, hkv, _, _, row_ok, qi, head = program_rows(pid_m, pid_bh, Hkv, group, 1, BLOCK_M)
    q = load_q(Q, b, head, qi, row_ok, sqb, sqh, 0, sqd, D, BLOCK_D)
    lo, hi = _split_range(R, pid_s, num_splits)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    sel_row = SEL + b * seb + hkv * seh
    starts_row = STARTS + b * stb + hkv * sth
    sizes_row = SIZES + b * szb + hkv * szh
    if HAS_TABLE:
        page_list = TABLE + b * spb + hkv * sph
    else:
        K = K + b * sk0 + hkv * sk1
        V = V + b * sv0 + hkv * sv1

    offs_g = tl.arange(0, BLOCK_G)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for g0 in range(lo, hi, BLOCK_G):
        # A group of BLOCK_G clusters, its tokens laid end to end: slot t of the group is row start_c + t - begin_c
        # of the cluster c with begin_c <= t < end_c. Every tile's loads depend only on the group's (start, size).
        j = g0 + offs_g
        c = tl.load(sel_row + j * see, mask=j < hi, other=0).to(tl.int64)
        size = tl.maximum(tl.load(sizes_row + c * szc, mask=j < hi, other=0), 0)
        start = tl.load(starts_row + c * stc, mask=size > 0, other=0).to(tl.int64)
        end = tl.cumsum(size, 0)
        begin = end - size
        for t0 in range(0, tl.sum(size, 0), BLOCK_N):
            t = t0 + offs_n
            inside = (t[:, None] >= begin[None, :]) & (t[:, None] < end[None, :])    # (BLOCK_N, BLOCK_G)
            tok_ok = tl.sum(inside.to(tl.int32), 1) > 0
            # int64: rows of a large cache overflow int32
            row = tl.sum(tl.where(inside, start[None, :] + (t[:, None] - begin[None, :]), 0), 1)
            if HAS_TABLE:
                slot = tl.load(page_list + (row // PAGE) * spj, mask=tok_ok, other=0).to(tl.int64)
                k_ptrs = K + slot[:, None] * sk0 + (row % PAGE)[:, None] * skr
                v_ptrs = V + slot[:, None] * sv0 + (row % PAGE)[:, None] * svr
            else:
                k_ptrs = K + row[:, None] * skr
                v_ptrs = V + row[:, None] * svr
            # Slots past the group's tokens are loaded as 0 (never what lies between clusters).
            k = tl.load(k_ptrs + offs_d[None, :] * skd, mask=tok_ok[:, None] & d_ok[None, :], other=0.0)
            s = scores(q, k, qk_scale, softcap_log2, HAS_SOFTCAP, UPCAST_DOT)
            v = tl.load(v_ptrs + offs_dv[None, :] * svd, mask=tok_ok[:, None] & dv_ok[None, :], other=0.0)
            m_i, l_i, acc = softmax_step(m_i, l_i, acc, s, row_ok[:, None] & tok_ok[None, :], v,
                                         DOT_FP32, UPCAST_DOT)

    split = pid_s.to(tl.int64)
    _store_rows(OUT + split * sos, LSE + split * sls, acc, m_i, l_i, b, head, qi, row_ok, DV,
                sob, soh, 0, sod, slb, slh, 0, True, BLOCK_DV)


def cluster_attention(q, keys, values, starts, sizes, selected, *, scale, softcap=0.0, page_table=None,
                      num_splits=None):
    """Exact attention of each decode query over the tokens of its kv head's selected clusters (Triton),
    as split partials.

    q: (B, Hq, 1, D) fp16/bf16/fp32, any strides.
    starts, sizes: (B, Hkv, Ccap) int32: cluster c of (b, h) holds the rows [starts[b, h, c],
       starts[b, h, c] + sizes[b, h, c]) of (b, h) (a size <= 0 cluster holds none; its start is not read).
    selected: (B, Hkv, R) int32/int64 cluster ids, all R entries used.
    keys / values: page_table None: (B, Hkv, N, D) / (B, Hkv, N, Dv), the rows of each (b, h). With
       page_table (B, Hkv, Pcap) int32: page pools (S, P, D) / (S, P, Dv), P a power of 2 <= 128; row r of
       (b, h) is row r % P of slot page_table[b, h, r // P] (entries of pages no selected cluster
       covers are never read). Any strides and float dtypes (16-bit dots only when q, keys and values
       share a 16-bit dtype). Rows outside the selected clusters are never read into a product,
       whatever they hold. Both layouts give bit-identical results for the same rows.
    scale / softcap (0 = off): as in the attention kernel.
    num_splits: None = automatic (:func:`~kvpass.kernels.wave_attention.reference.choose_num_splits`
       over B * Hkv programs and TOKENS_PER_CLUSTER * R tokens; NOT TUNED), or a positive int, honoured
       exactly.

    Returns (out (num_splits, B, Hq, Dv), lse (num_splits, B, Hq)), new contiguous fp32 tensors:
    split s attends to the tokens of its chunk of the cluster list (reference.split_bounds with count
    R); a split that sees no token has out 0 and lse -inf. Merge with :func:`merge_partials`.
    """
    B, Hq, Hkv, D, Dv, R, P = check_cluster_inputs(q, keys, values, starts, sizes, selected, page_table,
                                                   scale=scale, softcap=softcap, num_splits=num_splits)
    device = _check_device("cluster_attention", {"q": q, "keys": keys, "values": values, "starts": starts,
                                                 "sizes": sizes, "selected": selected, "page_table": page_table})
    num_splits = resolve_num_splits(num_splits, B * Hkv, TOKENS_PER_CLUSTER * R, R, device, CLUSTER_SPLIT_TOKENS)
    out = torch.empty((num_splits, B, Hq, Dv), dtype=torch.float32, device=device)
    lse = torch.empty((num_splits, B, Hq), dtype=torch.float32, device=device)
    if B == 0:
        return out, lse
    group = Hq // Hkv
    dot_fp32, upcast_dot = _dot_modes(q, (keys, values), device)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_DV = max(16, triton.next_power_of_2(Dv))
    BLOCK_M, _, num_warps, num_stages = _launch_config(group, max(BLOCK_D, BLOCK_DV), dot_fp32)
    if page_table is None:
        k_strides, v_strides, table_strides = keys.stride(), values.stride(), (0, 0, 0)
    else:   # (slot, -, row in page, dim): the batch/head stride slot is unused
        k_strides = (keys.stride(0), 0, keys.stride(1), keys.stride(2))
        v_strides = (values.stride(0), 0, values.stride(1), values.stride(2))
        table_strides = page_table.stride()
    qk_scale, softcap_log2 = _score_scales(scale, softcap, log2_domain=True)
    _cluster_attention_kernel[(triton.cdiv(group, BLOCK_M), B * Hkv, num_splits)](
        q, keys, values, starts, sizes, selected, page_table, out, lse,
        q.stride(0), q.stride(1), q.stride(3), *k_strides, *v_strides,
        *starts.stride(), *sizes.stride(), *selected.stride(), *table_strides, *out.stride(), *lse.stride(),
        Hkv, group, R, num_splits, D, Dv, qk_scale, softcap_log2,
        HAS_TABLE=page_table is not None, PAGE=max(P, 1), HAS_SOFTCAP=softcap > 0, DOT_FP32=dot_fp32,
        UPCAST_DOT=upcast_dot, BLOCK_M=BLOCK_M, BLOCK_N=_CLUSTER_BLOCK_N, BLOCK_G=_CLUSTER_BLOCK_G, BLOCK_D=BLOCK_D,
        BLOCK_DV=BLOCK_DV,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


# --- estimate_clusters -------------------------------------------------------------------------

@triton.jit
def _estimate_clusters_kernel(
    LOGITS, VM, SIZES, SEL, COUNT, OUT, LSE,
    sgb, sgh, sgc, svb, svh, svc, svd, szb, szh, szc, seb, seh, see, scb, sch,
    sos, sob, soh, sod, sls, slb, slh,
    Hkv, group, E, num_splits, DV,
    HAS_COUNT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program: rows [pid_m * BLOCK_M, +BLOCK_M) of (batch, kv head) pid_bh, split pid_s of its
    selected clusters.

    Grid: (cdiv(group, BLOCK_M), B * Hkv, num_splits). LOGITS (B, Hq, C) fp32; VM (B, Hkv, Ccap,
    Dv) value means; SIZES (B, Hkv, Ccap) int32; SEL (B, Hkv, E) int32/int64; COUNT (B, Hkv) int32
    iff HAS_COUNT (else all E entries are used). Writes OUT (num_splits, B, Hq, Dv) and LSE
    (num_splits, B, Hq) fp32. Online softmax in the exp2 domain over pseudo-tokens weighted by
    their sizes: w = size * 2^(logit log2e - m); the normalizer sums w, the accumulator w * value_mean.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b, hkv, _, _, row_ok, qi, head = program_rows(pid_m, pid_bh, Hkv, group, 1, BLOCK_M)
    if HAS_COUNT:
        n = tl.minimum(tl.maximum(tl.load(COUNT + b * scb + hkv * sch), 0), E)
    else:
        n = E
    lo, hi = _split_range(n, pid_s, num_splits)
    offs_e = tl.arange(0, BLOCK_E)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV
    sel_row = SEL + b * seb + hkv * seh
    logit_rows = LOGITS + b * sgb + head * sgh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(lo, hi, BLOCK_E):
        e = start + offs_e
        used = e < hi
        c = tl.load(sel_row + e * see, mask=used, other=0).to(tl.int64)
        size = tl.load(SIZES + b * szb + hkv * szh + c * szc, mask=used, other=0)
        ok = used & (size > 0)        # empty clusters contribute nothing, whatever their value means
        s = tl.load(logit_rows[:, None] + c[None, :] * sgc, mask=row_ok[:, None] & ok[None, :],
                    other=float("-inf")) * _LOG2E
        vm = tl.load(VM + b * svb + hkv * svh + c[:, None] * svc + offs_dv[None, :] * svd,
                     mask=ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # no (-inf) - (-inf) before the first cluster
        alpha = tl.exp2(m_i - m_safe)
        w = tl.exp2(s - m_safe[:, None]) * size.to(tl.float32)[None, :]   # 0 where not ok (size 0 or s -inf)
        l_i = l_i * alpha + tl.sum(w, 1)
        acc = acc * alpha[:, None] + tl.dot(w, vm, input_precision="ieee")
        m_i = m_new

    split = pid_s.to(tl.int64)
    _store_rows(OUT + split * sos, LSE + split * sls, acc, m_i, l_i, b, head, qi, row_ok, DV,
                sob, soh, 0, sod, slb, slh, 0, True, BLOCK_DV)


def estimate_clusters(logits, value_means, sizes, selected, count=None, *, num_splits=None):
    """Centroid estimate of the selected clusters (Triton), as split partials.

    logits: (B, Hq, C) fp32 centroid logits (from :func:`score_clusters`); value_means: (B, Hkv,
    Ccap, Dv), Ccap >= C, the mean of each cluster's values (any float dtype, read as fp32); sizes:
    (B, Hkv, Ccap) int32, its token count; selected: (B, Hkv, E) int32/int64 cluster ids < C; count:
    None (all E entries are used) or (B, Hkv) int32, clamped to [0, E]: the first count[b, h] entries
    of selected[b, h] are used, later ones are never read. All any strides. num_splits: None =
    automatic (choose_num_splits over B * Hkv programs and E clusters; NOT TUNED), or a positive
    int, honoured exactly.

    Returns (out (num_splits, B, Hq, Dv), lse (num_splits, B, Hq)), new contiguous fp32 tensors;
    per split, over its used clusters of size > 0 (0 / -inf if none; the value means of the others
    are not read): lse = log(sum_c size_c exp(logit_c)), out = sum_c size_c exp(logit_c)
    value_means_c / sum_c size_c exp(logit_c). Merge with :func:`merge_partials`.
    """
    B, Hq, Hkv, _, Dv, E = check_estimate_inputs(logits, value_means, sizes, selected, count,
                                                 num_splits=num_splits)
    device = _check_device("estimate_clusters", {"logits": logits, "value_means": value_means, "sizes": sizes,
                                                 "selected": selected, "count": count})
    num_splits = resolve_num_splits(num_splits, B * Hkv, E, E, device)
    out = torch.empty((num_splits, B, Hq, Dv), dtype=torch.float32, device=device)
    lse = torch.empty((num_splits, B, Hq), dtype=torch.float32, device=device)
    if B == 0:
        return out, lse
    group = Hq // Hkv
    BLOCK_DV = max(16, triton.next_power_of_2(Dv))
    # fp32 "ieee" dots as the dense kernel's fp32 path: BLOCK_E clusters play the role of BLOCK_N keys.
    BLOCK_M, BLOCK_E, num_warps, num_stages = _launch_config(group, BLOCK_DV, True)
    count_strides = (0, 0) if count is None else count.stride()
    _estimate_clusters_kernel[(triton.cdiv(group, BLOCK_M), B * Hkv, num_splits)](
        logits, value_means, sizes, selected, count, out, lse,
        *logits.stride(), *value_means.stride(), *sizes.stride(), *selected.stride(), *count_strides,
        *out.stride(), *lse.stride(),
        Hkv, group, E, num_splits, Dv,
        HAS_COUNT=count is not None, BLOCK_M=BLOCK_M, BLOCK_E=BLOCK_E, BLOCK_DV=BLOCK_DV,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


# --- merge_partials ----------------------------------------------------------------------------

@triton.jit
def _merge_source(m_run, l_run, acc, PART, PART_LSE, sps, spb, sph, spd, sls, slb, slh, b, h, num_parts, DV,
                  BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Fold the num_parts partials of one source (PART (S, B, Hq, Dv) any float dtype, PART_LSE (S, B, Hq) fp32)
    of (b, h) into the running (max lse, sum of weights, weighted sum of outs), online over blocks of BLOCK_S."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV
    for s0 in range(0, num_parts, BLOCK_S):
        s = (s0 + offs_s).to(tl.int64)
        lse = tl.load(PART_LSE + s * sls + b * slb + h * slh, mask=s < num_parts, other=float("-inf"))
        seen = lse > float("-inf")
        part = tl.load(PART + s[:, None] * sps + b * spb + h * sph + offs_dv[None, :] * spd,
                       mask=seen[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
        m_new = tl.maximum(m_run, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # no (-inf) - (-inf) while all are empty
        alpha = tl.exp(m_run - m_safe)
        w = tl.exp(lse - m_safe)
        l_run = l_run * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(w[:, None] * part, 0)
        m_run = m_new
    return m_run, l_run, acc


@triton.jit
def _merge_partials_kernel(
    P0, L0, P1, L1, P2, L2, OUT, LSE,
    sp0s, sp0b, sp0h, sp0d, sl0s, sl0b, sl0h, sp1s, sp1b, sp1h, sp1d, sl1s, sl1b, sl1h,
    sp2s, sp2b, sp2h, sp2d, sl2s, sl2b, sl2h, sob, soh, sod, smb, smh,
    Hq, S0, S1, S2, DV,
    HAS_LSE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program per (batch, query head) pid: OUT (B, Hq, 1, Dv) = sum_s exp(lse_s - L) PART_s,
    L = logsumexp_s lse_s over the partials of up to three sources (Pi (Si, B, Hq, Dv) any float dtype,
    Li (Si, B, Hq) fp32; Si = 0: unused), read in place (no concatenation); LSE (B, Hq, 1) = L iff HAS_LSE.

    Grid: (B * Hq,). Partials with lse -inf are not read; a row without any other is 0 with L = -inf.
    """
    pid = tl.program_id(0)
    b = (pid // Hq).to(tl.int64)
    h = (pid % Hq).to(tl.int64)
    m_run = tl.full([], float("-inf"), tl.float32)
    l_run = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    m_run, l_run, acc = _merge_source(m_run, l_run, acc, P0, L0, sp0s, sp0b, sp0h, sp0d, sl0s, sl0b, sl0h, b, h,
                                      S0, DV, BLOCK_S, BLOCK_DV)
    m_run, l_run, acc = _merge_source(m_run, l_run, acc, P1, L1, sp1s, sp1b, sp1h, sp1d, sl1s, sl1b, sl1h, b, h,
                                      S1, DV, BLOCK_S, BLOCK_DV)
    m_run, l_run, acc = _merge_source(m_run, l_run, acc, P2, L2, sp2s, sp2b, sp2h, sp2d, sl2s, sl2b, sl2h, b, h,
                                      S2, DV, BLOCK_S, BLOCK_DV)
    offs_dv = tl.arange(0, BLOCK_DV)
    out = acc / tl.where(l_run > 0.0, l_run, 1.0)
    tl.store(OUT + b * sob + h * soh + offs_dv * sod, out.to(OUT.dtype.element_ty), mask=offs_dv < DV)
    if HAS_LSE:
        tl.store(LSE + b * smb + h * smh,
                 tl.where(l_run > 0.0, m_run + tl.log(tl.where(l_run > 0.0, l_run, 1.0)), float("-inf")))


_MERGE_SOURCES = 3   # partial sources _merge_partials_kernel reads in place (the wave step has three)


def merge_partials(outs, lses, dtype, *, return_lse=False):
    """Log-sum-exp-weighted combination of attention partials (Triton).

    outs: list of (S_i, B, Hq, Dv) float tensors (or (B, Hq, Dv): S_i = 1; fp16/bf16 partials are read as
    fp32), any strides; lses: the matching (S_i, B, Hq) (or (B, Hq)) fp32 natural-log log-sum-exps, e.g. from
    :func:`cluster_attention` and :func:`estimate_clusters`. A partial with lse -inf is ignored
    (its out is not read). dtype: the output dtype (fp16/bf16/fp32).
    Returns a new contiguous out (B, Hq, 1, Dv) of ``dtype``: sum_i exp(lse_i - L) out_i with L =
    logsumexp of every lse_i, exactly 0 where every lse is -inf; with return_lse also L (B, Hq, 1)
    fp32 (-inf there).
    """
    parts, part_lses, (B, Hq, Dv) = check_merge_inputs(outs, lses, dtype)
    device = _check_device("merge_partials", {**{f"outs[{i}]": t for i, t in enumerate(parts)},
                                              **{f"lses[{i}]": t for i, t in enumerate(part_lses)}})
    if len(parts) > _MERGE_SOURCES:   # one launch reads up to three sources in place; more are concatenated first
        parts = [torch.cat([p.float() for p in parts])]
        part_lses = [torch.cat(part_lses)]
    out = torch.empty((B, Hq, 1, Dv), dtype=dtype, device=device)
    lse = torch.empty((B, Hq, 1), dtype=torch.float32, device=device) if return_lse else None
    if B * Hq > 0:
        BLOCK_DV = max(16, triton.next_power_of_2(Dv))
        lse_strides = (lse.stride(0), lse.stride(1)) if return_lse else (0, 0)
        unused = _MERGE_SOURCES - len(parts)
        sources = [(p, l, p.shape[0]) for p, l in zip(parts, part_lses)] + [(parts[0], part_lses[0], 0)] * unused
        pointers = [t for p, l, _ in sources for t in (p, l)]
        strides = [x for p, l, _ in sources for x in (*p.stride(), *l.stride())]
        _merge_partials_kernel[(B * Hq,)](
            *pointers, out, lse, *strides, out.stride(0), out.stride(1), out.stride(3), *lse_strides,
            Hq, *(n for _, _, n in sources), Dv,
            HAS_LSE=return_lse, BLOCK_S=_MERGE_BLOCK_S, BLOCK_DV=BLOCK_DV, num_warps=4,
        )
    return (out, lse) if return_lse else out
