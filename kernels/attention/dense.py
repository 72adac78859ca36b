"""Triton attention over a preallocated KV store (FlashAttention-style, GQA-packed, split-KV).

Public entry point: :func:`attention_over_store`. Semantics (visibility rule, shapes) are the
ones of :mod:`kvpass.kernels.attention.reference`, which is the ground truth in the tests.

Design
------
* **Rows = (query, head-in-group).** For GQA with ``group = Hq // Hkv`` query heads per kv head,
  one program owns one ``(batch, kv head)`` pair and a block of ``BLOCK_M`` *rows*, where row
  ``r = i * group + g`` is query ``i`` of query head ``kv_head * group + g``. Every K/V tile is
  then loaded once for the whole group (for decode, ``Lq = 1``, the group *is* the row block) and
  ``tl.dot`` gets a useful M dimension even when ``Lq = 1``.
* **Online softmax** over key tiles of ``BLOCK_N`` slots, in the exp2 domain, accumulators in
  fp32. Rows whose keys are all masked keep ``m = -inf``; the kernel substitutes 0 for that max
  so no ``inf - inf`` NaN appears, and divides by ``l = 0`` -> 1, so such rows output exactly 0.
* **Tile skipping.** Without ``mask``, each program computes the key range ``[lo, hi)`` any of
  its rows can see (causal upper bound, sliding-window lower bound) and only iterates over those
  tiles. With ``mask`` (which can allow any key) it visits all of ``[0, kv_len)``.
* **Optional inputs** are constexpr-specialized: ``valid=None`` and ``mask=None`` pass ``None``
  pointers (no tensor is allocated) and compile the loads and tests away.
* **Masking before the products.** K and V tiles are loaded with ``other=0`` for slots that are
  past the range or invalid, and scores are ``tl.where``-ed to ``-inf``: garbage (even NaN) in
  invalid or unused store slots never reaches the PV product (``0 * NaN`` would be NaN). Slots
  hidden by ``mask`` alone are loaded (the mask is per row, a V tile is shared by all rows), so
  they must hold finite values.
* **Split-KV (flash-decoding).** When there are few programs (decode: few rows, small batch)
  but many keys, the key range of each row block is cut into ``num_splits`` chunks, each done by
  its own program, which writes fp32 partials ``(m, l, acc)``; ``_combine_kernel`` merges them,
  one program per row loading every chunk at once.
* **Decode writes its own token.** Given ``new_k``/``new_v`` (one query, its slot on the device),
  the launch writes them into the store and attends them from registers, so a captured decode
  step has one launch per layer where a copy of K, a copy of V and the attention were three.
* **Log-sum-exp.** With ``return_lse`` the program (or the combine) also writes each row's
  natural-log logsumexp ``ln(2) * (m + log2(l))``, -inf for rows with nothing visible.
* **Shared with other stores.** Everything but the K/V tile loads lives in public @triton.jit
  helpers (rows, key range, scores, visibility, online-softmax step, epilogue) and in the host
  function :func:`launch_attention`; ``kvpass.kernels.coded_attention`` builds its kernel from them.

Precision
---------
When q, k and v share a 16-bit dtype, both ``tl.dot``\\ s take 16-bit operands (the softmax
probabilities are rounded to that dtype before the PV product) and accumulate in fp32: expect a
relative (Frobenius) error of a few 1e-4 (fp16) to ~5e-3 (bf16, mostly the bf16 rounding of the
output itself) vs the fp32 reference; tested at <= 1e-2. Otherwise (fp32 anywhere, e.g. fp32
queries over an fp16 store) the tiles are upcast to fp32 in registers and the dots run with
``input_precision="ieee"`` (no TF32; FMA units, so slower than 16-bit tensor-core dots): error
~1e-7 with an fp32 output, tested at <= 1e-3 (<= 1e-2 when q, hence the output, is 16-bit).
Softmax, scaling and soft-capping are always fp32.

Block sizes and launch parameters below follow simple rules and were **not tuned on a GPU yet**;
they were only checked to compile for sm_90a without register spills (Triton on CPU + ptxas).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .reference import check_attention_inputs, check_new_token

__all__ = ["attention_over_store", "choose_num_splits"]

_LOG2E = 1.4426950408889634

# --- launch rules (NOT TUNED YET: picked by rule of thumb, to revisit on H100/H200) -------------
# Split-KV only pays off when the dense grid leaves SMs idle *and* there are enough keys to share.
_SPLIT_MIN_KEYS = 2048            # not tuned: below this many keys per row block, never split
_SPLIT_MIN_KEYS_PER_SPLIT = 512   # not tuned: each split gets at least this many keys
_SPLIT_MAX = 64                   # not tuned: bounds the partial buffers and the combine loop
_PROGRAMS_PER_SM = 2              # the grid's bound: this many programs per SM (measured at B8 32K, H100)
_DEFAULT_SM_COUNT = 132           # H100 SXM; used when the device cannot be asked (CPU interpreter)


def _launch_config(rows: int, block_d: int, fp32_dots: bool):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the attention kernel. NOT TUNED YET.

    Chosen so that ptxas (sm_90a) reports no register spills for head dims 64..256, checked by
    compiling on CPU; speed was never measured. rows = Lq * group; block_d = max(BLOCK_D, BLOCK_DV).
    * 16-bit dots: BLOCK_M 16/32/64 as rows need (tl.dot needs M >= 16; a larger M reuses each
      K/V tile for more rows); BLOCK_N 64, or 32 for d = 256 to bound registers and shared memory.
    * fp32 dots (fp32 or mixed inputs) run on FMA units with both operands in registers, so
      tiles are smaller: BLOCK_M <= 32 (16 for d = 256), BLOCK_N 32 (16 for d = 256).
    """
    num_stages = 2 if block_d >= 256 else 3   # fewer stages so d = 256 tiles fit in shared memory
    if fp32_dots:
        block_m = 16 if (rows <= 16 or block_d >= 256) else 32
        block_n = 32 if block_d <= 128 else 16
        num_warps = 4 if block_d <= 64 else 8
    else:
        block_m = 16 if rows <= 16 else (32 if rows <= 32 else 64)
        block_n = 64 if block_d <= 128 else 32
        num_warps = 8 if (block_m >= 64 and block_d >= 128) else 4
    return block_m, block_n, num_warps, num_stages


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(programs: int, keys: int, sm_count: int = _DEFAULT_SM_COUNT) -> int:
    """How many key chunks (split-KV) to use; 1 means the plain (dense) kernel.

    programs: number of programs of the dense grid (batch * kv heads * row blocks);
    keys: number of key slots one row block spans (kv_len, or about the window).
    Split when the dense grid fills fewer than ``_PROGRAMS_PER_SM * sm_count`` programs and
    there are at least ``_SPLIT_MIN_KEYS`` keys, into as many chunks as keep the grid within that many
    programs (one wave: a second, part-filled wave of equal chunks costs a whole chunk's time); never
    give a split fewer than ``_SPLIT_MIN_KEYS_PER_SPLIT`` keys nor use more than ``_SPLIT_MAX`` splits.
    Measured on an H100 (B8 32K, Llama-3-8B heads, 64 programs unsplit, the captured step's launch): 4 splits
    (256 programs) 359 us, 5 splits (320) 461 us (log benchmarks/results/probe-decode-kernel-variants-20261207-h100.txt).
    """
    target = _PROGRAMS_PER_SM * sm_count
    if keys < _SPLIT_MIN_KEYS or programs >= target:
        return 1
    return max(1, min(target // programs, keys // _SPLIT_MIN_KEYS_PER_SPLIT, _SPLIT_MAX))


# --- @triton.jit building blocks shared by every attention kernel (dense here, coded in
# kvpass.kernels.coded_attention): they only differ in how a K/V tile is produced. -------------

@triton.jit
def _mma(a, b, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation; UPCAST: multiply as fp32 ("ieee", no TF32) instead of a/b's dtype."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def program_rows(pid_m, pid_bh, Hkv, group, Lq, BLOCK_M: tl.constexpr):
    """The rows of program (pid_m, pid_bh): row r = i * group + g is query i of head hkv * group + g.

    Returns b, hkv (int64 scalars: batch/head offsets into a large store overflow int32),
    R = Lq * group, and (BLOCK_M,) rows, row_ok (r < R), qi (query index), head (query head, int64).
    """
    b = (pid_bh // Hkv).to(tl.int64)
    hkv = (pid_bh % Hkv).to(tl.int64)
    R = Lq * group
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return b, hkv, R, rows, rows < R, rows // group, hkv * group + rows % group


@triton.jit
def key_range(pid_m, pid_s, R, group, q_start, kv_len, window, num_splits,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IS_SPLIT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi): the key slots at least one row of row block pid_m may see (tile skipping), cut to
    key chunk pid_s of num_splits in split mode. lo is a multiple of BLOCK_N; a chunk may be empty."""
    r_first = pid_m * BLOCK_M
    r_last = tl.minimum(r_first + BLOCK_M, R) - 1
    p_lo = q_start + r_first // group       # rows are query-major, so slots grow with r
    p_hi = q_start + r_last // group
    hi = kv_len
    if CAUSAL:
        hi = p_hi + 1                       # nothing after the last query's own slot
    lo = tl.full([], 0, tl.int32)
    if HAS_WINDOW:
        lo = tl.maximum(p_lo - window + 1, 0)   # nothing before the first query's window
    lo = (lo // BLOCK_N) * BLOCK_N
    if IS_SPLIT:
        tiles_per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), num_splits)
        lo = lo + pid_s * tiles_per_split * BLOCK_N
        hi = tl.minimum(hi, lo + tiles_per_split * BLOCK_N)
    return lo, hi


@triton.jit
def query_slots(q_start, kv_len, Lq, Q_START_ON_DEVICE: tl.constexpr):
    """(q_start, kv_len) of this launch. With Q_START_ON_DEVICE, q_start is a pointer to one int64 slot
    index read now (a captured decode step replays one launch while the position moves: the host cannot
    pass it), and kv_len = q_start + Lq; otherwise both are the ints the host passed."""
    if Q_START_ON_DEVICE:
        start = tl.load(q_start).to(tl.int32)
        return start, start + Lq
    else:
        return q_start, kv_len


@triton.jit
def load_q(Q, b, head, qi, row_ok, sqb, sqh, sql, sqd, D, BLOCK_D: tl.constexpr):
    """The (BLOCK_M, BLOCK_D) queries of the rows, 0 past D and for rows >= R."""
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + b * sqb + head[:, None] * sqh + qi[:, None] * sql + offs_d[None, :] * sqd
    return tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def keys_ok(VALID, valid_row, svals, offs_n, hi, HAS_VALID: tl.constexpr):
    """(BLOCK_N,) whether key slots offs_n are < hi and hold a real token (VALID[b, j] != 0, read
    only if HAS_VALID; valid_row = b * (batch stride))."""
    ok = offs_n < hi
    if HAS_VALID:
        ok = ok & (tl.load(VALID + valid_row + offs_n.to(tl.int64) * svals, mask=ok, other=0) != 0)
    return ok


@triton.jit
def soft_capped(qk, qk_scale, softcap_scale, HAS_SOFTCAP: tl.constexpr):
    """Raw dot products qk scaled: ``qk * qk_scale``, or with HAS_SOFTCAP ``softcap_scale * tanh(x)``
    where qk_scale = 2 log2(e) scale / softcap folds x = qk * scale / softcap into t = 2 x log2(e):
    tanh|x| = (1 - 2^-|t|) / (1 + 2^-|t|), which never overflows. softcap_scale = softcap (natural-log
    scores) or softcap * log2(e) (log2-domain scores)."""
    if HAS_SOFTCAP:
        t = qk * qk_scale
        e = tl.exp2(-tl.abs(t))
        th = (1.0 - e) / (1.0 + e)
        return tl.where(t < 0, -th, th) * softcap_scale
    else:
        return qk * qk_scale


@triton.jit
def scores(q, k, qk_scale, softcap_log2, HAS_SOFTCAP: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 scores of q (BLOCK_M, BLOCK_D) and k (BLOCK_N, BLOCK_D), scaled,
    soft-capped if HAS_SOFTCAP, in the log2 domain (times log2(e))."""
    return soft_capped(_mma(q, tl.trans(k), UPCAST_DOT), qk_scale, softcap_log2, HAS_SOFTCAP)


@triton.jit
def visible(MASK, mask_rows, smj, row_ok, key_ok, offs_n, q_pos, window,
            CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr):
    """(BLOCK_M, BLOCK_N) visibility rule of reference.py: mask, or causal + window.

    mask_rows: (BLOCK_M,) int64 offsets of the rows' mask rows (MASK is read only if HAS_MASK);
    q_pos: (BLOCK_M,) store slots of the rows' queries.
    """
    j = offs_n[None, :]
    p = q_pos[:, None]
    vis = row_ok[:, None] & key_ok[None, :]
    if HAS_MASK:
        # int64: a mask may be a view with a large key stride
        vis = vis & (tl.load(MASK + mask_rows[:, None] + j.to(tl.int64) * smj, mask=vis, other=0) != 0)
    if HAS_WINDOW:
        vis = vis & (j > p - window)
    if CAUSAL:
        vis = vis & (j <= p)
    return vis


@triton.jit
def softmax_step(m_i, l_i, acc, s, vis, v, DOT_FP32: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """One online-softmax update with the scores s (log2 domain) of a key tile and its values v.

    m_i (running max), l_i (sum of exponentials): (BLOCK_M,) fp32; acc: (BLOCK_M, BLOCK_DV) fp32;
    s, vis: (BLOCK_M, BLOCK_N); v: (BLOCK_N, BLOCK_DV), 0 for slots no row may see. Returns the
    updated (m_i, l_i, acc). DOT_FP32: p stays fp32; otherwise p is rounded to v's 16-bit dtype.
    """
    s = tl.where(vis, s, float("-inf"))
    # m_safe avoids (-inf) - (-inf) for rows with nothing visible yet.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if not DOT_FP32:
        p = p.to(v.dtype)       # 16-bit PV operands, as FlashAttention does
    acc = acc * alpha[:, None] + _mma(p, v, UPCAST_DOT)
    return m_new, l_i, acc


@triton.jit
def _store_rows(OUT, LSE, acc, m_i, l_i, b, head, qi, row_ok, DV, sob, soh, sol, sod, slb, slh, sll,
                HAS_LSE: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Write finished rows: OUT[b, head, qi] = acc / l_i (exactly 0 where l_i = 0, no visible key)
    and, if HAS_LSE, LSE[b, head, qi] = natural-log logsumexp of the scores (-inf where l_i = 0).
    m_i is the running max of the log2-domain scores, so lse = ln(2) * (m_i + log2(l_i))."""
    offs_dv = tl.arange(0, BLOCK_DV)
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ptrs = OUT + b * sob + head[:, None] * soh + qi[:, None] * sol + offs_dv[None, :] * sod
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < DV)[None, :])
    if HAS_LSE:
        lse = tl.where(l_i > 0.0, (m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        tl.store(LSE + b * slb + head * slh + qi * sll, lse, mask=row_ok)


@triton.jit
def finish_rows(OUT, M_PART, L_PART, LSE, acc, m_i, l_i, pid_bh, pid_s, num_splits,
                b, head, qi, rows, row_ok, R, DV, sob, soh, sol, sod, slb, slh, sll,
                HAS_LSE: tl.constexpr, IS_SPLIT: tl.constexpr, BLOCK_DV: tl.constexpr):
    """End of an attention program. Dense mode: write OUT (and LSE) as :func:`_store_rows`. Split
    mode: write the fp32 partials of key chunk pid_s, OUT = acc (B*Hkv, num_splits, R, Dv)
    unnormalized, M_PART / L_PART (B*Hkv, num_splits, R) = m_i / l_i, for _combine_kernel."""
    if IS_SPLIT:
        offs_dv = tl.arange(0, BLOCK_DV)
        part = (pid_bh * num_splits + pid_s).to(tl.int64) * R + rows     # (BLOCK_M,) row ids
        tl.store(M_PART + part, m_i, mask=row_ok)
        tl.store(L_PART + part, l_i, mask=row_ok)
        tl.store(OUT + part[:, None] * DV + offs_dv[None, :], acc,
                 mask=row_ok[:, None] & (offs_dv < DV)[None, :])
    else:
        _store_rows(OUT, LSE, acc, m_i, l_i, b, head, qi, row_ok, DV, sob, soh, sol, sod,
                    slb, slh, sll, HAS_LSE, BLOCK_DV)


@triton.jit
def _attn_fwd_kernel(
    Q, VALID, MASK, OUT, M_PART, L_PART, LSE,
    sqb, sqh, sql, sqd,
    svalb, svals,
    smb, smh, smi, smj,
    sob, soh, sol, sod,
    slb, slh, sll,
    Hkv, group, Lq, q_start, kv_len, window, num_splits, D, DV,
    qk_scale,        # scale * log2(e) without soft-cap, 2 * log2(e) * scale / softcap with it
    softcap_log2,    # softcap * log2(e) (unused without soft-cap)
    K, V,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    K_NEW, V_NEW,
    sknb, sknh, sknd,
    svnb, svnh, svnd,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_VALID: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_LSE: tl.constexpr, IS_SPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
    UPCAST_DOT: tl.constexpr, Q_START_ON_DEVICE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    APPEND: tl.constexpr,
):
    """One program: rows [pid_m*BLOCK_M, +BLOCK_M) of (batch, kv head) pid_bh, key chunk pid_s.

    Grid: (cdiv(Lq * group, BLOCK_M), B * Hkv, num_splits). The parameters before K and the
    constexprs are those :func:`launch_attention` passes to every attention kernel; K (B, Hkv, S, D)
    and V (B, Hkv, S, Dv) with their strides are this kernel's store. Dense mode (IS_SPLIT=False)
    writes the normalized output into OUT (B, Hq, Lq, Dv) and, if HAS_LSE, LSE (B, Hq, Lq); split
    mode writes partials (see :func:`finish_rows`).
    VALID (B, S) uint8 is read iff HAS_VALID; MASK (B, Hq, Lq, kv_len) uint8 (broadcast dims with
    stride 0) iff HAS_MASK, and then CAUSAL and HAS_WINDOW must be False (the mask decides).
    DOT_FP32: fp32 semantics for mixed/fp32 inputs (p stays fp32); otherwise p is rounded to v's
    16-bit dtype. UPCAST_DOT: the tl.dot multiplies run on fp32 copies of their operands.
    Q_START_ON_DEVICE: q_start is a pointer to the slot of the first query (see :func:`query_slots`).
    APPEND (decode, Lq = 1): the new token's K_NEW (B, Hkv, 1, D) and V_NEW (B, Hkv, 1, Dv) go into the store at
    slot q_start in this launch (program (0, bh, 0) writes them), so no program reads that slot from the store:
    the key range stops before it and the last key chunk attends the new token from K_NEW / V_NEW, rounded to the
    store's dtype as a read of the slot would give them. One launch instead of two copies and an attention.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b, hkv, R, rows, row_ok, qi, head = program_rows(pid_m, pid_bh, Hkv, group, Lq, BLOCK_M)
    q = load_q(Q, b, head, qi, row_ok, sqb, sqh, sql, sqd, D, BLOCK_D)
    q_start, kv_len = query_slots(q_start, kv_len, Lq, Q_START_ON_DEVICE)
    q_pos = q_start + qi
    if APPEND:
        # The store loop stops before the new token's slot (this launch writes it); one query, so shifting its
        # slot back by one moves the causal end there; the window start moves one slot earlier, harmless since
        # visibility is still tested at the true slot.
        lo, hi = key_range(pid_m, pid_s, R, group, q_start - 1, kv_len - 1, window, num_splits,
                           CAUSAL, HAS_WINDOW, IS_SPLIT, BLOCK_M, BLOCK_N)
    else:
        lo, hi = key_range(pid_m, pid_s, R, group, q_start, kv_len, window, num_splits,
                           CAUSAL, HAS_WINDOW, IS_SPLIT, BLOCK_M, BLOCK_N)
    mask_rows = b * smb + head * smh + qi.to(tl.int64) * smi   # int64: B*Hq*Lq*kv_len may exceed int32

    # ---- key tiles: a scalar base pointer per tensor, advanced by BLOCK_N slots per iteration,
    # plus loop-invariant int32 offsets within a tile. (Carrying whole tiles of 64-bit pointers
    # through the loop costs 2 registers per element and made ptxas spill.)
    offs_t = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    lo64 = lo.to(tl.int64)
    k_base = K + b * skb + hkv * skh + lo64 * sks
    v_base = V + b * svb + hkv * svh + lo64 * svs
    k_offs = offs_t[:, None] * sks + offs_d[None, :] * skd
    v_offs = offs_t[:, None] * svs + offs_dv[None, :] * svd

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + offs_t
        key_ok = keys_ok(VALID, b * svalb, svals, offs_n, hi, HAS_VALID)
        # Invalid / out-of-range slots are loaded as 0: their garbage (maybe NaN) never enters a dot.
        k = tl.load(k_base + k_offs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        s = scores(q, k, qk_scale, softcap_log2, HAS_SOFTCAP, UPCAST_DOT)
        vis = visible(MASK, mask_rows, smj, row_ok, key_ok, offs_n, q_pos, window,
                      CAUSAL, HAS_WINDOW, HAS_MASK)
        v = tl.load(v_base + v_offs, mask=key_ok[:, None] & dv_ok[None, :], other=0.0)
        m_i, l_i, acc = softmax_step(m_i, l_i, acc, s, vis, v, DOT_FP32, UPCAST_DOT)
        k_base += BLOCK_N * sks
        v_base += BLOCK_N * svs

    if APPEND:
        is_last_chunk = pid_s == num_splits - 1
        is_writer = (pid_m == 0) & (pid_s == 0)
        if is_last_chunk | is_writer:
            # The new token as a key tile whose row 0 is K_NEW / V_NEW (the other rows masked), rounded to the
            # store's dtype, through the same scores and softmax step as a tile read from the store. Only the
            # programs that attend it (the last key chunk) or write it (one per (batch, KV head)) load it.
            first = (offs_t == 0)[:, None]
            new_k_offs = (offs_t[:, None] * 0 + offs_d[None, :])
            new_v_offs = (offs_t[:, None] * 0 + offs_dv[None, :])
            k_new = tl.load(K_NEW + b * sknb + hkv * sknh + new_k_offs * sknd, mask=first & d_ok[None, :],
                            other=0.0).to(K.dtype.element_ty)
            v_new = tl.load(V_NEW + b * svnb + hkv * svnh + new_v_offs * svnd, mask=first & dv_ok[None, :],
                            other=0.0).to(V.dtype.element_ty)
            if is_last_chunk:
                new_ok = keys_ok(VALID, b * svalb, svals, q_start + offs_t, q_start + 1, HAS_VALID)
                k_tile = tl.where(new_ok[:, None], k_new, 0.0).to(k_new.dtype)
                v_tile = tl.where(new_ok[:, None], v_new, 0.0).to(v_new.dtype)
                s = scores(q, k_tile, qk_scale, softcap_log2, HAS_SOFTCAP, UPCAST_DOT)
                vis = visible(MASK, mask_rows, smj, row_ok, new_ok, q_start + offs_t, q_pos, window,
                              CAUSAL, HAS_WINDOW, HAS_MASK)
                m_i, l_i, acc = softmax_step(m_i, l_i, acc, s, vis, v_tile, DOT_FP32, UPCAST_DOT)
            if is_writer:
                slot = q_start.to(tl.int64)
                tl.store(K + b * skb + hkv * skh + slot * sks + new_k_offs * skd, k_new, mask=first & d_ok[None, :])
                tl.store(V + b * svb + hkv * svh + slot * svs + new_v_offs * svd, v_new,
                         mask=first & dv_ok[None, :])

    finish_rows(OUT, M_PART, L_PART, LSE, acc, m_i, l_i, pid_bh, pid_s, num_splits,
                b, head, qi, rows, row_ok, R, DV, sob, soh, sol, sod, slb, slh, sll,
                HAS_LSE, IS_SPLIT, BLOCK_DV)


@triton.jit
def _combine_kernel(
    ACC, M_PART, L_PART, OUT, LSE,
    sob, soh, sol, sod, slb, slh, sll,
    Hkv, group, Lq, num_splits, DV,
    HAS_LSE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Merge split-KV partials. Grid: (R, B * Hkv), R = Lq * group: one program per row, which loads every
    chunk's partials at once (BLOCK_S >= num_splits) instead of one chunk after another: a chain of dependent
    loads is what made this launch cost more than the memory it reads.

    ACC: (B*Hkv, num_splits, R, Dv) fp32; M_PART, L_PART: (B*Hkv, num_splits, R) fp32;
    OUT: (B, Hq, Lq, Dv) in q's dtype; LSE: (B, Hq, Lq) fp32, written iff HAS_LSE.
    """
    row = tl.program_id(0)
    pid_bh = tl.program_id(1)
    R = Lq * group
    b = (pid_bh // Hkv).to(tl.int64)
    head = (pid_bh % Hkv).to(tl.int64) * group + row % group
    qi = row // group
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < num_splits
    part = (pid_bh * num_splits + offs_s).to(tl.int64) * R + row      # (BLOCK_S,) partial ids
    m_s = tl.load(M_PART + part, mask=s_ok, other=float("-inf"))
    l_s = tl.load(L_PART + part, mask=s_ok, other=0.0)
    a_s = tl.load(ACC + part[:, None] * DV + offs_dv[None, :], mask=s_ok[:, None] & (offs_dv < DV)[None, :],
                  other=0.0)
    m = tl.max(m_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)      # every chunk empty: the row sees nothing
    w = tl.exp2(m_s - m_safe)                          # empty chunks (m = -inf) weigh 0
    l_sum = tl.sum(l_s * w, 0)
    acc = tl.sum(a_s * w[:, None], 0)
    out = acc / tl.where(l_sum > 0.0, l_sum, 1.0)
    tl.store(OUT + b * sob + head * soh + qi * sol + offs_dv * sod, out.to(OUT.dtype.element_ty), mask=offs_dv < DV)
    if HAS_LSE:
        lse = tl.where(l_sum > 0.0, (m + tl.log2(tl.where(l_sum > 0.0, l_sum, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        tl.store(LSE + b * slb + head * slh + qi * sll, lse)


def _check_device(caller: str, inputs: dict) -> torch.device:
    """The one device of the tensors in inputs (name -> tensor or None); raises if they are on
    several, or on a CPU without the Triton interpreter."""
    tensors = {name: t for name, t in inputs.items() if t is not None}
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError("all inputs must be on one device, got "
                         + ", ".join(f"{n}: {t.device}" for n, t in tensors.items()))
    device = devices.pop()
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{caller} needs CUDA tensors "
                           "(or TRITON_INTERPRET=1 set before triton is imported, for CPU)")
    return device


def launch_attention(kernel, store_args, store_meta, store, q, valid, mask, dims, *, scale, causal,
                     window, softcap, num_splits, return_lse, caller, launch_config=_launch_config,
                     q_start_on_device=None):
    """Host side shared by the attention kernels: launch plan, outputs, split-KV and its combine.

    kernel: a @triton.jit kernel taking the parameters of :func:`_attn_fwd_kernel` up to
        softcap_log2, then ``store_args``, and the common constexprs plus ``store_meta``
        (constexpr name -> value).
    store: name -> every tensor of the KV store (for the device check; their floating-point dtypes
        and q's decide between 16-bit and fp32 dots).
    dims: what :func:`check_attention_inputs` returned for these inputs (already checked).
    launch_config: (rows, block_d, fp32_dots) -> (BLOCK_M, BLOCK_N, num_warps, num_stages), as
        :func:`_launch_config`, the dense kernel's rule.
    q_start_on_device: None, or a (1,) int64 tensor on q's device holding the first query's slot, read by
        the kernel (dims then carry the largest q_start the store allows, which sizes the launch).
    Other arguments as in :func:`attention_over_store`; caller names the function in errors.
    Returns out (B, Hq, Lq, Dv) in q's dtype, or (out, lse (B, Hq, Lq) fp32) if return_lse.
    """
    B, Hq, Hkv, Lq, _, D, Dv, q_start, kv_len = dims
    device = _check_device(caller, {"q": q, **store, "valid": valid, "mask": mask})
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or num_splits < 1):
        raise ValueError(f"num_splits must be None or a positive int, got {num_splits!r}")

    out = torch.empty((B, Hq, Lq, Dv), dtype=q.dtype, device=device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=device) if return_lse else None
    result = (out, lse) if return_lse else out
    if B * Hq * Lq == 0:
        return result

    group = Hq // Hkv
    R = Lq * group
    # 16-bit operands only when everything shares that dtype; otherwise fp32 ("ieee") dots.
    dtypes = {q.dtype} | {t.dtype for t in store.values() if t.is_floating_point()}
    dot_fp32 = not (len(dtypes) == 1 and q.dtype in (torch.float16, torch.bfloat16))
    # Triton's CPU interpreter multiplies bf16 tl.dot operands as their raw uint16 bits (numpy has
    # no bf16), so there the (already bf16-rounded) operands are multiplied as fp32 instead: same
    # rounding of q, k, p, v as on the GPU; only the accumulation order differs.
    upcast_dot = dot_fp32 or (device.type != "cuda" and q.dtype == torch.bfloat16)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_DV = max(16, triton.next_power_of_2(Dv))
    BLOCK_M, BLOCK_N, num_warps, num_stages = launch_config(R, max(BLOCK_D, BLOCK_DV), dot_fp32)
    row_blocks = triton.cdiv(R, BLOCK_M)

    # A mask replaces causal and window: the kernel then neither applies them nor skips tiles.
    causal = bool(causal) and mask is None
    has_window = window > 0 and mask is None
    if num_splits is None:
        span = min(kv_len, window + Lq) if has_window else kv_len
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else _DEFAULT_SM_COUNT
        num_splits = choose_num_splits(B * Hkv * row_blocks, span, sms)
    num_splits = max(1, min(num_splits, triton.cdiv(kv_len, BLOCK_N)))

    if softcap > 0:
        qk_scale, softcap_log2 = 2.0 * _LOG2E * float(scale) / float(softcap), float(softcap) * _LOG2E
    else:
        qk_scale, softcap_log2 = float(scale) * _LOG2E, 0.0

    # Bool tensors are passed as uint8 views (same storage, no copy; bool pointers are awkward);
    # an absent tensor is a None pointer (a constexpr: its loads are compiled out) with zero strides.
    if valid is not None:
        valid_u8, valid_strides = valid.view(torch.uint8), valid.stride()
    else:
        valid_u8, valid_strides = None, (0, 0)
    if mask is not None:
        mask_u8 = mask.view(torch.uint8).expand(B, Hq, Lq, kv_len)   # broadcast dims get stride 0
        mask_strides = mask_u8.stride()
    else:
        mask_u8, mask_strides = None, (0, 0, 0, 0)
    lse_strides = lse.stride() if return_lse else (0, 0, 0)

    is_split = num_splits > 1
    if is_split:
        acc_part = torch.empty((B * Hkv, num_splits, R, Dv), dtype=torch.float32, device=device)
        m_part = torch.empty((B * Hkv, num_splits, R), dtype=torch.float32, device=device)
        l_part = torch.empty_like(m_part)
        dst = acc_part
    else:
        m_part = l_part = dst = out

    grid = (row_blocks, B * Hkv, num_splits)
    kernel[grid](
        q, valid_u8, mask_u8, dst, m_part, l_part, lse,
        *q.stride(), *valid_strides, *mask_strides, *out.stride(), *lse_strides,
        Hkv, group, Lq, q_start if q_start_on_device is None else q_start_on_device, kv_len, window,
        num_splits, D, Dv,
        qk_scale, softcap_log2,
        *store_args,
        CAUSAL=causal, HAS_WINDOW=has_window, HAS_VALID=valid is not None, HAS_MASK=mask is not None,
        HAS_SOFTCAP=softcap > 0, HAS_LSE=return_lse, IS_SPLIT=is_split, DOT_FP32=dot_fp32,
        UPCAST_DOT=upcast_dot, Q_START_ON_DEVICE=q_start_on_device is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
        **store_meta, num_warps=num_warps, num_stages=num_stages,
    )
    if is_split:
        block_s = max(2, triton.next_power_of_2(num_splits))
        _combine_kernel[(R, B * Hkv)](
            acc_part, m_part, l_part, out, lse, *out.stride(), *lse_strides,
            Hkv, group, Lq, num_splits, Dv,
            HAS_LSE=return_lse, BLOCK_S=block_s, BLOCK_DV=BLOCK_DV,
            num_warps=8 if block_s * BLOCK_DV > 8192 else 4,   # <= 32 fp32 partials per thread
        )
    return result


def attention_over_store(q, k, v, valid=None, q_start=None, *, scale, causal=True, window=0,
                         softcap=0.0, mask=None, num_splits=None, return_lse=False, new_k=None, new_v=None):
    """Attention of new queries over a KV store (Triton).

    q: (B, Hq, Lq, D) fp16/bf16/fp32, any strides; the queries sit in store slots
       q_start .. q_start + Lq - 1.
    k: (B, Hkv, S, D), v: (B, Hkv, S, Dv): views of the store (capacity S >= q_start + Lq), any
       strides and a dtype that may differ from q's; Hq % Hkv == 0 (GQA).
    valid: (B, S) bool, whether each slot holds a real token (left padding -> False); None: all
       slots are valid (then every slot below kv_len must hold finite values).
    q_start: python int, or None for S - Lq (the queries are the last Lq slots of the store);
       kv_len = q_start + Lq keys are attended. Or a (1,) int64 tensor on q's device, read by the kernel
       (what a captured decode step needs: its position moves between replays of one launch); then
       mask must be None, and the launch (split-KV) is planned for the whole store.
    scale: score multiplier. causal / window (0 = none) / softcap (0 = off): see reference.py.
    mask: (1|B, 1|Hq, Lq, kv_len) bool over all keys (past + new), any strides, e.g. Hugging
       Face's attention mask; when given it replaces causal and window (see reference.py).
    num_splits: None = automatic (see :func:`choose_num_splits`), 1 = dense kernel, n > 1 = force
       split-KV with n chunks (clamped to the number of key tiles).
    return_lse: also return lse (B, Hq, Lq) fp32, the natural-log logsumexp of each row's visible
       (scaled, soft-capped) scores, -inf for rows with no visible key.
    new_k: (B, Hkv, 1, D), new_v: (B, Hkv, 1, Dv), or None: one decode query's own key and value, written
       into the store at slot q_start by the same launch (cast to the store's dtype), as if copied there
       before the call (a decode step's cache write and attention in one launch). Needs Lq = 1, no mask.

    Returns a new contiguous (B, Hq, Lq, Dv) tensor of q's dtype (and lse if return_lse); rows
    with no visible key are 0.
    """
    on_device = q_start if isinstance(q_start, torch.Tensor) else None
    if on_device is not None:
        check_device_q_start(on_device, q, mask)
    dims = check_attention_inputs(q, k, v, valid, None if on_device is not None else q_start, scale=scale,
                                  window=window, softcap=softcap, mask=mask)
    append = check_new_token(new_k, new_v, q, k, v, mask)
    new_args = (new_k, new_v, *new_k.stride()[:2], new_k.stride(3), *new_v.stride()[:2], new_v.stride(3)) \
        if append else (None, None, 0, 0, 0, 0, 0, 0)
    return launch_attention(
        _attn_fwd_kernel, (k, v, *k.stride(), *v.stride(), *new_args), {"APPEND": append},
        {"k": k, "v": v}, q, valid, mask,
        dims, scale=scale, causal=causal, window=window, softcap=softcap, num_splits=num_splits,
        return_lse=return_lse, caller="attention_over_store", q_start_on_device=on_device,
    )


def check_device_q_start(q_start: torch.Tensor, q: torch.Tensor, mask) -> None:
    """A q_start tensor must be one int64 on q's device, and comes without a mask (a mask sized for one
    position cannot serve a launch whose position moves)."""
    if q_start.shape != (1,) or q_start.dtype != torch.int64 or q_start.device != q.device:
        raise ValueError(f"q_start as a tensor must be (1,) int64 on {q.device}, got {tuple(q_start.shape)} "
                         f"{q_start.dtype} on {q_start.device}")
    if mask is not None:
        raise ValueError("q_start as a tensor takes no mask: visibility comes from causal, window and valid")
