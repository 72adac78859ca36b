"""Triton kernel for AnTKV anchor-score column statistics (FlashAttention-backward-style tiling).

Public entry point: :func:`anchor_scores`. Semantics (statistics, visibility, shapes) are those
of :mod:`kvpass.kernels.anchor_scores.reference`, the ground truth in the tests.

Design
------
* **One program per block of keys**, like the dK/dV loop of the FlashAttention backward: it
  holds the K tile of ``BLOCK_N`` keys of one ``(batch, kv head)`` in registers and loops over
  blocks of ``BLOCK_M`` rows, accumulating the four column sums. The attention matrix is
  recomputed tile by tile from q, k and the given ``lse``, never stored.
* **Rows = (query, head-in-group)** as in the attention kernel: row ``r = i * group + g`` is
  query ``i`` of query head ``kv_head * group + g``, so a K/V tile serves the whole GQA group.
* **Row skipping.** Without ``mask``, a key block only visits the rows that may see one of its
  keys: causal queries at or after its first key, window queries within ``window`` of its last
  key. With ``mask`` (which can show any key to any row) it visits all rows, unless a ``span``
  bounds them (AnTKV's prompts: then a block visits ``BLOCK_N + span`` queries, whatever Lq).
* **fp32 throughout.** Tiles are upcast on load and the score dot uses
  ``input_precision="ieee"`` (no TF32): this runs once per prefill, so accuracy beats speed.
* **Distances from differences.** ``||v_j - o_i||^2`` is summed from ``(o_i - v_j)^2`` over
  chunks of ``BLOCK_DC`` features (an (M, N, BLOCK_DC) broadcast; the V chunks are re-read, from
  cache, for every row block), not expanded as ``||v_j||^2 - 2 v_j.o_i + ||o_i||^2`` with a dot:
  that cancels where ``o_i ~ v_j`` (a row that sees one key has ``o_i = v_j``) and leaves
  ``~3e-4 ||v_j||`` instead of 0 in fp32, a 1e-3 relative error on keys that such rows dominate
  (seen in the tests); an fp64 ``tl.dot`` of the bf16-loaded tiles did not compile for sm_90
  (Triton 3.6). Cost: about twice the time of the statistics without ``o``.
* **Garbage stays out.** K/V of invalid or out-of-range keys are loaded as 0 and every
  per-pair term is ``tl.where``-ed to 0 where hidden, so NaN in those slots reaches no output.

Speed: NOT TUNED (see ``_launch_config``); the fp32 FMA dots and exact distances make this much
slower than the 16-bit attention kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention.dense import _check_device, scores, visible
from .reference import NUM_STATS, check_anchor_inputs

__all__ = ["anchor_scores"]

_LOG2E = tl.constexpr(1.4426950408889634)   # a constexpr: the kernel reads it too


def _launch_config(block_d: int, interpreted: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_DC, num_warps). NOT TUNED beyond one comparison on an H100.

    fp32 FMA dots hold both operands in registers (as the attention kernel's fp32 path), so
    tiles stay small (tl.dot needs >= 16) and wide heads get more warps; BLOCK_DC bounds the
    (BLOCK_M, BLOCK_N, BLOCK_DC) difference tile of the distances. At Lq = Lk = 4096, 32 query /
    8 kv heads, D = 128, bf16, causal, with o, an H100 (Triton 3.6) took 41-44 ms with
    (64, 32, 8, 8 warps) (16 ms without o; the bf16 attention kernel: 0.75 ms), 48 ms with
    (32, 32, 8, 8), 51 ms with (32, 64, 8, 8) and 72 ms with (64, 64, 8, 8); all of them spill
    registers (80-130 spills at 255 registers). The CPU interpreter pays per operation, not per
    element, so there BLOCK_DC is 32: fewer, larger chunks, still several per head so the chunk
    loop is tested.
    """
    return 64, 32, (32 if interpreted else 8), (4 if block_d <= 64 else 8)


@triton.jit
def _row_range(pid_n, Lq, Lk, group, q_start, key_start, window, span,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SPAN: tl.constexpr, BLOCK_N: tl.constexpr):
    """[r_lo, r_hi): the rows (query-major) that may see a key of block pid_n (causal and window only count
    without a mask; the span always does)."""
    i_lo = 0
    i_hi = Lq
    first_key = key_start + pid_n * BLOCK_N
    last_key = key_start + tl.minimum(pid_n * BLOCK_N + BLOCK_N, Lk) - 1
    if CAUSAL or HAS_SPAN:
        # Query i sees (or scores) key slot j only if j <= q_start + i: the block's first key bounds i below.
        i_lo = tl.maximum(first_key - q_start, 0)
    if HAS_WINDOW:
        # ... and only if j > q_start + i - window: the block's last key bounds i above.
        i_hi = tl.minimum(last_key + window - q_start, Lq)
    if HAS_SPAN:
        i_hi = tl.minimum(i_hi, last_key + span - q_start)
    i_hi = tl.maximum(i_hi, i_lo)
    return i_lo * group, i_hi * group


@triton.jit
def _squared_distances(o_rows, sod, v_keys, svd, row_ok, key_ok, DV,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DC: tl.constexpr):
    """(M, N) fp32 ||o_i - v_j||^2, summed from the differences (see the module doc).

    o_rows: (M,) pointers to the rows' o vectors (feature stride sod); v_keys: (N,) pointers to
    the keys' v vectors (stride svd). Masked-out rows and keys read as zero vectors.
    """
    offs = tl.arange(0, BLOCK_DC)
    dist_sq = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for d0 in range(0, DV, BLOCK_DC):
        d_ok = d0 + offs < DV
        o = tl.load(o_rows[:, None] + (d0 + offs)[None, :] * sod, mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        v = tl.load(v_keys[:, None] + (d0 + offs)[None, :] * svd, mask=key_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        diff = o[:, None, :] - v[None, :, :]
        dist_sq += tl.sum(diff * diff, 2)
    return dist_sq


@triton.jit
def _anchor_scores_kernel(
    Q, K, V, LSE, O, VALID, MASK, OUT,
    sqb, sqh, sql, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    slb, slh, sll,
    sob, soh, sol, sod,
    svalb, svals,
    smb, smh, smi, smj,
    sts, stb, sth, stn,
    Hkv, group, Lq, Lk, q_start, key_start, window, span, D, DV,
    qk_scale, softcap_log2,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SPAN: tl.constexpr, HAS_VALID: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_O: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr,
):
    """One program: scored keys [pid_n * BLOCK_N, +BLOCK_N) of (batch, kv head) pid_bh.

    Grid: (cdiv(Lk, BLOCK_N), B * Hkv). Q (B, Hq, Lq, D); K (B, Hkv, Lk, D); V (B, Hkv, Lk, Dv);
    LSE (B, Hq, Lq) fp32; O (B, Hq, Lq, Dv) iff HAS_O; VALID (B, S) uint8 iff HAS_VALID; MASK
    (B, Hq, Lq, kv_len) uint8 (broadcast dims with stride 0) iff HAS_MASK, and then CAUSAL and
    HAS_WINDOW are False. Writes OUT (4, B, Hkv, Lk) fp32.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)    # int64: batch/head offsets into a large store overflow int32
    hkv = (pid_bh % Hkv).to(tl.int64)

    # ---- this program's keys, kept for the whole row loop ------------------------------------
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)     # index among the scored keys
    key_pos = key_start + offs_n                         # store slot
    key_ok = offs_n < Lk
    if HAS_VALID:
        key_ok = key_ok & (tl.load(VALID + b * svalb + key_pos * svals, mask=key_ok, other=0) != 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    # Invalid / out-of-range keys are loaded as 0: their garbage (maybe NaN) never enters a dot.
    k = tl.load(K + b * skb + hkv * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=key_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    v_keys = V + b * svb + hkv * svh + offs_n * svn

    # Per-pair sums, reduced over the rows once after the loop (a reduction over rows every
    # iteration would cross warps four times per tile).
    mass = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    jacobian = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    sensitivity = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    pairs = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)

    r_lo, r_hi = _row_range(pid_n, Lq, Lk, group, q_start, key_start, window, span,
                            CAUSAL, HAS_WINDOW, HAS_SPAN, BLOCK_N)
    for start in range(r_lo, r_hi, BLOCK_M):
        # ---- rows r = (query i, head-in-group g) ----------------------------------------------
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < r_hi
        qi = (rows // group).to(tl.int64)
        head = hkv * group + rows % group
        q = tl.load(Q + b * sqb + head[:, None] * sqh + qi[:, None] * sql + offs_d[None, :] * sqd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        lse_log2 = tl.load(LSE + b * slb + head * slh + qi * sll, mask=row_ok,
                           other=float("-inf")) * _LOG2E

        s = scores(q, k, qk_scale, softcap_log2, HAS_SOFTCAP, True)     # fp32 "ieee" dots
        vis = visible(MASK, b * smb + head * smh + qi * smi, smj, row_ok & (lse_log2 > float("-inf")),
                      key_ok, key_pos, q_start + qi, window, CAUSAL, HAS_WINDOW, HAS_MASK)
        if HAS_SPAN:   # only the span's queries score a key: key slot <= query slot < key slot + span
            behind = (q_start + qi)[:, None] - key_pos[None, :]
            vis = vis & (behind >= 0) & (behind < span)
        # -inf where hidden: rows with lse = -inf would give exp2(+inf) there.
        a = tl.exp2(tl.where(vis, s - lse_log2[:, None], float("-inf")))
        mass += a
        jacobian += a * (1.0 - a)
        pairs += vis.to(tl.float32)
        if HAS_O:
            dist = tl.sqrt(_squared_distances(O + b * sob + head * soh + qi * sol, sod, v_keys, svd,
                                              row_ok, key_ok, DV, BLOCK_M, BLOCK_N, BLOCK_DC))
            q_norm = tl.sqrt(tl.sum(q * q, 1))
            # a is 0 where hidden, and every factor is finite: hidden pairs add exactly 0.
            sensitivity += a * q_norm[:, None] * dist

    out = OUT + b * stb + hkv * sth + offs_n * stn
    n_ok = offs_n < Lk
    tl.store(out, tl.sum(mass, 0), mask=n_ok)
    tl.store(out + sts, tl.sum(jacobian, 0), mask=n_ok)
    tl.store(out + 2 * sts, tl.sum(sensitivity, 0), mask=n_ok)
    tl.store(out + 3 * sts, tl.sum(pairs, 0), mask=n_ok)


def anchor_scores(q, k, v, lse, o=None, valid=None, *, q_start, key_start, scale, causal=True,
                  window=0, softcap=0.0, mask=None, span=0):
    """AnTKV anchor-score column statistics of the keys k, v (Triton).

    q: (B, Hq, Lq, D) fp16/bf16/fp32, any strides; the queries sit at store slots
       q_start .. q_start + Lq - 1 (kv_len = q_start + Lq).
    k: (B, Hkv, Lk, D), v: (B, Hkv, Lk, Dv): the keys being scored, at store slots
       key_start .. key_start + Lk - 1 (key_start + Lk <= kv_len); Hq % Hkv == 0 (GQA).
    lse: (B, Hq, Lq) float32, each row's natural-log logsumexp over ALL its visible keys, scored
       or not (-inf: the row sees nothing and contributes nothing).
    o: None or (B, Hq, Lq, Dv), each row's attention output (None: statistic 2 is 0).
    valid: None (all valid) or (B, S) bool with S >= kv_len; invalid slots may hold garbage.
    mask: None or (1|B, 1|Hq, Lq, kv_len) bool over all keys; when given it replaces causal and
       window. scale / causal / window / softcap: as in the attention kernel.
    span: 0, or only the pairs of a key and the span queries from its own slot on count (key slot <= query
       slot < key slot + span), on top of the visibility; each key block then visits only those rows, so a
       prompt's statistics cost O(Lk * span), not O(Lk * Lq).

    Returns a new contiguous (4, B, Hkv, Lk) float32 tensor: per scored key, sums over its
    visible (query, query head) pairs of [A, A (1 - A), A ||q|| ||v - o||, 1], computed in fp32
    (see reference.py); invalid keys get zeros.
    """
    B, Hq, Hkv, Lq, Lk, D, Dv, _ = check_anchor_inputs(
        q, k, v, lse, o, valid, q_start=q_start, key_start=key_start, scale=scale, window=window,
        softcap=softcap, mask=mask, span=span,
    )
    _check_device("anchor_scores", {"q": q, "k": k, "v": v, "lse": lse, "o": o, "valid": valid, "mask": mask})
    out = torch.empty((NUM_STATS, B, Hkv, Lk), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out

    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_M, BLOCK_N, BLOCK_DC, num_warps = _launch_config(BLOCK_D, q.device.type != "cuda")
    if softcap > 0:
        qk_scale, softcap_log2 = 2.0 * _LOG2E.value * float(scale) / float(softcap), float(softcap) * _LOG2E.value
    else:
        qk_scale, softcap_log2 = float(scale) * _LOG2E.value, 0.0
    # Bool tensors go in as uint8 views (no copy); an absent input is a None pointer (a constexpr:
    # its loads are compiled out) with zero strides.
    valid_u8, valid_strides = (valid.view(torch.uint8), valid.stride()) if valid is not None else (None, (0, 0))
    if mask is not None:
        mask_u8 = mask.view(torch.uint8).expand(B, Hq, Lq, mask.shape[-1])   # broadcast dims: stride 0
        mask_strides = mask_u8.stride()
    else:
        mask_u8, mask_strides = None, (0, 0, 0, 0)
    o_strides = o.stride() if o is not None else (0, 0, 0, 0)

    grid = (triton.cdiv(Lk, BLOCK_N), B * Hkv)
    _anchor_scores_kernel[grid](
        q, k, v, lse, o, valid_u8, mask_u8, out,
        *q.stride(), *k.stride(), *v.stride(), *lse.stride(), *o_strides, *valid_strides,
        *mask_strides, *out.stride(),
        Hkv, Hq // Hkv, Lq, Lk, q_start, key_start, window, span, D, Dv,
        qk_scale, softcap_log2,
        # A mask replaces causal and window: the kernel then neither applies them nor skips rows.
        CAUSAL=bool(causal) and mask is None, HAS_WINDOW=window > 0 and mask is None, HAS_SPAN=span > 0,
        HAS_VALID=valid is not None, HAS_MASK=mask is not None, HAS_SOFTCAP=softcap > 0,
        HAS_O=o is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DC=BLOCK_DC, num_warps=num_warps,
    )
    return out
