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
  its own program, which writes fp32 partials ``(m, l, acc)``; ``_combine_kernel`` merges them.

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

from .reference import check_attention_inputs

__all__ = ["attention_over_store", "choose_num_splits"]

_LOG2E = 1.4426950408889634

# --- launch rules (NOT TUNED YET: picked by rule of thumb, to revisit on H100/H200) -------------
# Split-KV only pays off when the dense grid leaves SMs idle *and* there are enough keys to share.
_SPLIT_MIN_KEYS = 2048            # not tuned: below this many keys per row block, never split
_SPLIT_MIN_KEYS_PER_SPLIT = 512   # not tuned: each split gets at least this many keys
_SPLIT_MAX = 64                   # not tuned: bounds the partial buffers and the combine loop
_PROGRAMS_PER_SM = 2              # not tuned: aim for this many programs per SM
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


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(programs: int, keys: int, sm_count: int = _DEFAULT_SM_COUNT) -> int:
    """How many key chunks (split-KV) to use; 1 means the plain (dense) kernel.

    programs: number of programs of the dense grid (batch * kv heads * row blocks);
    keys: number of key slots one row block spans (kv_len, or about the window).
    Split when the dense grid fills fewer than ``_PROGRAMS_PER_SM * sm_count`` programs and
    there are at least ``_SPLIT_MIN_KEYS`` keys; never give a split fewer than
    ``_SPLIT_MIN_KEYS_PER_SPLIT`` keys nor use more than ``_SPLIT_MAX`` splits.
    """
    target = _PROGRAMS_PER_SM * sm_count
    if keys < _SPLIT_MIN_KEYS or programs >= target:
        return 1
    return max(1, min(triton.cdiv(target, programs), keys // _SPLIT_MIN_KEYS_PER_SPLIT, _SPLIT_MAX))


@triton.jit
def _mma(a, b, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation; UPCAST: multiply as fp32 ("ieee", no TF32) instead of a/b's dtype."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, VALID, MASK, OUT, M_PART, L_PART,
    sqb, sqh, sql, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    svalb, svals,
    smb, smh, smi, smj,
    sob, soh, sol, sod,
    Hkv, group, Lq, q_start, kv_len, window, num_splits, D, DV,
    qk_scale,        # scale * log2(e) without soft-cap, 2 * log2(e) * scale / softcap with it
    softcap_log2,    # softcap * log2(e) (unused without soft-cap)
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_VALID: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, IS_SPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program: rows [pid_m*BLOCK_M, +BLOCK_M) of (batch, kv head) pid_bh, key chunk pid_s.

    Grid: (cdiv(Lq * group, BLOCK_M), B * Hkv, num_splits). Dense mode (IS_SPLIT=False) writes the
    normalized output into OUT (B, Hq, Lq, Dv). Split mode writes fp32 partials for the rows:
    OUT = acc (B*Hkv, num_splits, R, Dv) unnormalized, M_PART / L_PART (B*Hkv, num_splits, R) with
    the running max (log2 domain) and the sum of exponentials, R = Lq * group.
    VALID (B, S) uint8 is read iff HAS_VALID; MASK (B, Hq, Lq, kv_len) uint8 (broadcast dims with
    stride 0) iff HAS_MASK, and then CAUSAL and HAS_WINDOW must be False (the mask decides).
    DOT_FP32: fp32 semantics for mixed/fp32 inputs (p stays fp32); otherwise p is rounded to v's
    16-bit dtype. UPCAST_DOT: the tl.dot multiplies run on fp32 copies of their operands.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // Hkv).to(tl.int64)    # int64: batch/head offsets into a large store overflow int32
    hkv = (pid_bh % Hkv).to(tl.int64)
    R = Lq * group

    # ---- the rows of this program: row r = (query i, head-in-group g) -------------------------
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    qi = rows // group                      # query index in [0, Lq)
    head = hkv * group + rows % group       # query head (int64)
    q_pos = q_start + qi                    # store slot of the query
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    q_ptrs = Q + b * sqb + head[:, None] * sqh + qi[:, None] * sql + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # ---- key range [lo, hi) that at least one row of the block may see (tile skipping) --------
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
        # Cut [lo, hi) into num_splits chunks of whole tiles; chunk pid_s may be empty.
        tiles_per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), num_splits)
        lo = lo + pid_s * tiles_per_split * BLOCK_N
        hi = tl.minimum(hi, lo + tiles_per_split * BLOCK_N)

    # ---- key tiles: a scalar base pointer per tensor, advanced by BLOCK_N slots per iteration,
    # plus loop-invariant int32 offsets within a tile. (Carrying whole tiles of 64-bit pointers
    # through the loop costs 2 registers per element and made ptxas spill.)
    offs_t = tl.arange(0, BLOCK_N)
    lo64 = lo.to(tl.int64)
    k_base = K + b * skb + hkv * skh + lo64 * sks
    v_base = V + b * svb + hkv * svh + lo64 * svs
    k_offs = offs_t[:, None] * sks + offs_d[None, :] * skd
    v_offs = offs_t[:, None] * svs + offs_dv[None, :] * svd
    if HAS_VALID:
        val_base = VALID + b * svalb + lo64 * svals
    if HAS_MASK:
        # One pointer per row (int64 row offsets: B * Hq * Lq * kv_len can exceed int32).
        mask_base = MASK + b * smb + head * smh + qi.to(tl.int64) * smi + lo64 * smj
        mask_offs = offs_t * smj

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    for start in range(lo, hi, BLOCK_N):
        offs_n = start + offs_t
        key_ok = offs_n < hi
        if HAS_VALID:
            key_ok = key_ok & (tl.load(val_base + offs_t * svals, mask=key_ok, other=0) != 0)
        # Invalid / out-of-range slots are loaded as 0: their garbage (maybe NaN) never enters a dot.
        k = tl.load(k_base + k_offs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        qk = _mma(q, tl.trans(k), UPCAST_DOT)
        if HAS_SOFTCAP:
            # softcap * tanh(x), x = qk * scale / softcap, with t = 2 x log2(e) (folded into
            # qk_scale): tanh|x| = (1 - 2^-|t|) / (1 + 2^-|t|), never overflows.
            t = qk * qk_scale
            e = tl.exp2(-tl.abs(t))
            th = (1.0 - e) / (1.0 + e)
            s = tl.where(t < 0, -th, th) * softcap_log2
        else:
            s = qk * qk_scale

        # Visibility rule (see reference.py): mask, or causal + window.
        j = offs_n[None, :]
        p = q_pos[:, None]
        vis = row_ok[:, None] & key_ok[None, :]
        if HAS_MASK:
            vis = vis & (tl.load(mask_base[:, None] + mask_offs[None, :], mask=vis, other=0) != 0)
        if HAS_WINDOW:
            vis = vis & (j > p - window)
        if CAUSAL:
            vis = vis & (j <= p)
        s = tl.where(vis, s, float("-inf"))

        # Online softmax; m_safe avoids (-inf) - (-inf) for rows with nothing visible yet.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        pexp = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(pexp, 1)
        v = tl.load(v_base + v_offs, mask=key_ok[:, None] & dv_ok[None, :], other=0.0)
        if not DOT_FP32:
            pexp = pexp.to(v.dtype)     # 16-bit PV operands, as FlashAttention does
        acc = acc * alpha[:, None] + _mma(pexp, v, UPCAST_DOT)
        m_i = m_new

        k_base += BLOCK_N * sks
        v_base += BLOCK_N * svs
        if HAS_VALID:
            val_base += BLOCK_N * svals
        if HAS_MASK:
            mask_base += BLOCK_N * smj

    if IS_SPLIT:
        part = (pid_bh * num_splits + pid_s).to(tl.int64) * R + rows     # (BLOCK_M,) row ids
        tl.store(M_PART + part, m_i, mask=row_ok)
        tl.store(L_PART + part, l_i, mask=row_ok)
        acc_ptrs = OUT + part[:, None] * DV + offs_dv[None, :]
        tl.store(acc_ptrs, acc, mask=row_ok[:, None] & dv_ok[None, :])
    else:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]   # empty rows: 0 / 1 = exactly 0
        o_ptrs = OUT + b * sob + head[:, None] * soh + qi[:, None] * sol + offs_dv[None, :] * sod
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])


@triton.jit
def _combine_kernel(
    ACC, M_PART, L_PART, OUT,
    sob, soh, sol, sod,
    Hkv, group, Lq, num_splits, DV,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Merge split-KV partials. Grid: (cdiv(R, BLOCK_M), B * Hkv), R = Lq * group.

    ACC: (B*Hkv, num_splits, R, Dv) fp32; M_PART, L_PART: (B*Hkv, num_splits, R) fp32;
    OUT: (B, Hq, Lq, Dv) in q's dtype.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hkv = (pid_bh % Hkv).to(tl.int64)
    R = Lq * group
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    offs_dv = tl.arange(0, BLOCK_DV)
    mask2 = row_ok[:, None] & (offs_dv[None, :] < DV)

    m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_run = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for s in range(0, num_splits):
        part = (pid_bh * num_splits + s).to(tl.int64) * R + rows
        m_s = tl.load(M_PART + part, mask=row_ok, other=float("-inf"))
        l_s = tl.load(L_PART + part, mask=row_ok, other=0.0)
        a_s = tl.load(ACC + part[:, None] * DV + offs_dv[None, :], mask=mask2, other=0.0)
        m_new = tl.maximum(m_run, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # empty chunks have m = -inf
        alpha = tl.exp2(m_run - m_safe)
        beta = tl.exp2(m_s - m_safe)
        l_run = l_run * alpha + l_s * beta
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        m_run = m_new

    out = acc / tl.where(l_run > 0.0, l_run, 1.0)[:, None]
    qi = rows // group
    head = hkv * group + rows % group
    o_ptrs = OUT + b * sob + head[:, None] * soh + qi[:, None] * sol + offs_dv[None, :] * sod
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=mask2)


def attention_over_store(q, k, v, valid=None, q_start=None, *, scale, causal=True, window=0,
                         softcap=0.0, mask=None, num_splits=None):
    """Attention of new queries over a KV store (Triton).

    q: (B, Hq, Lq, D) fp16/bf16/fp32, any strides; the queries sit in store slots
       q_start .. q_start + Lq - 1.
    k: (B, Hkv, S, D), v: (B, Hkv, S, Dv): views of the store (capacity S >= q_start + Lq), any
       strides and a dtype that may differ from q's; Hq % Hkv == 0 (GQA).
    valid: (B, S) bool, whether each slot holds a real token (left padding -> False); None: all
       slots are valid (then every slot below kv_len must hold finite values).
    q_start: python int, or None for S - Lq (the queries are the last Lq slots of the store);
       kv_len = q_start + Lq keys are attended.
    scale: score multiplier. causal / window (0 = none) / softcap (0 = off): see reference.py.
    mask: (1|B, 1|Hq, Lq, kv_len) bool over all keys (past + new), any strides, e.g. Hugging
       Face's attention mask; when given it replaces causal and window (see reference.py).
    num_splits: None = automatic (see :func:`choose_num_splits`), 1 = dense kernel, n > 1 = force
       split-KV with n chunks (clamped to the number of key tiles).

    Returns a new contiguous (B, Hq, Lq, Dv) tensor of q's dtype; rows with no visible key are 0.
    """
    B, Hq, Hkv, Lq, S, D, Dv, q_start, kv_len = check_attention_inputs(
        q, k, v, valid, q_start, scale=scale, window=window, softcap=softcap, mask=mask
    )
    tensors = [(n, t) for n, t in (("q", q), ("k", k), ("v", v), ("valid", valid), ("mask", mask))
               if t is not None]
    devices = {t.device for _, t in tensors}
    if len(devices) != 1:
        raise ValueError("all inputs must be on one device, got "
                         + ", ".join(f"{n}: {t.device}" for n, t in tensors))
    device = q.device
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("attention_over_store needs CUDA tensors "
                           "(or TRITON_INTERPRET=1 set before triton is imported, for CPU)")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or num_splits < 1):
        raise ValueError(f"num_splits must be None or a positive int, got {num_splits!r}")

    out = torch.empty((B, Hq, Lq, Dv), dtype=q.dtype, device=device)
    if out.numel() == 0:
        return out

    group = Hq // Hkv
    R = Lq * group
    # 16-bit operands only when everything shares that dtype; otherwise fp32 ("ieee") dots.
    dot_fp32 = not (q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16))
    # Triton's CPU interpreter multiplies bf16 tl.dot operands as their raw uint16 bits (numpy has
    # no bf16), so there the (already bf16-rounded) operands are multiplied as fp32 instead: same
    # rounding of q, k, p, v as on the GPU; only the accumulation order differs.
    upcast_dot = dot_fp32 or (device.type != "cuda" and q.dtype == torch.bfloat16)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_DV = max(16, triton.next_power_of_2(Dv))
    BLOCK_M, BLOCK_N, num_warps, num_stages = _launch_config(R, max(BLOCK_D, BLOCK_DV), dot_fp32)
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
    # an absent one is a None pointer (a constexpr: its loads are compiled out) with zero strides.
    if valid is not None:
        valid_u8, valid_strides = valid.view(torch.uint8), valid.stride()
    else:
        valid_u8, valid_strides = None, (0, 0)
    if mask is not None:
        mask_u8 = mask.view(torch.uint8).expand(B, Hq, Lq, kv_len)   # broadcast dims get stride 0
        mask_strides = mask_u8.stride()
    else:
        mask_u8, mask_strides = None, (0, 0, 0, 0)

    is_split = num_splits > 1
    if is_split:
        acc_part = torch.empty((B * Hkv, num_splits, R, Dv), dtype=torch.float32, device=device)
        m_part = torch.empty((B * Hkv, num_splits, R), dtype=torch.float32, device=device)
        l_part = torch.empty_like(m_part)
        dst = acc_part
    else:
        m_part = l_part = dst = out

    grid = (row_blocks, B * Hkv, num_splits)
    _attn_fwd_kernel[grid](
        q, k, v, valid_u8, mask_u8, dst, m_part, l_part,
        *q.stride(), *k.stride(), *v.stride(), *valid_strides, *mask_strides, *out.stride(),
        Hkv, group, Lq, q_start, kv_len, window, num_splits, D, Dv,
        qk_scale, softcap_log2,
        CAUSAL=causal, HAS_WINDOW=has_window, HAS_VALID=valid is not None, HAS_MASK=mask is not None,
        HAS_SOFTCAP=softcap > 0, IS_SPLIT=is_split, DOT_FP32=dot_fp32, UPCAST_DOT=upcast_dot,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
        num_warps=num_warps, num_stages=num_stages,
    )
    if is_split:
        _combine_kernel[(row_blocks, B * Hkv)](
            acc_part, m_part, l_part, out, *out.stride(),
            Hkv, group, Lq, num_splits, Dv,
            # not tuned: 8 warps keep a 64 x 256 fp32 accumulator in registers without spills
            BLOCK_M=BLOCK_M, BLOCK_DV=BLOCK_DV, num_warps=8 if BLOCK_M * BLOCK_DV > 8192 else 4,
        )
    return out
