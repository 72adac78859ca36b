"""Triton attention that reads a product-quantized KV store (:class:`.layout.CodedKV`) directly.

Public entry point: :func:`attention_over_codes`, with the semantics of
:func:`kvpass.kernels.attention.attention_over_store` (visibility rule, GQA packing, split-KV,
soft-capping, precision rules) except that keys and values come from a :class:`CodedKV`; its
ground truth is :func:`.reference.attention_over_codes_reference`.

Design
------
The kernel is the dense FlashAttention-style kernel of ``kernels/attention/dense.py`` built from
the same @triton.jit helpers and host code (:func:`launch_attention`); only the K/V tiles differ.
It never materializes the dequantized store: per key tile of ``BLOCK_N`` slots it

* loads ``anchor_slot`` of the tile once and classifies each slot as *coded*, *anchored* (an exact
  anchor row) or *exact* (``j >= exact_start``, the exact tail); slots that must not be read
  (invalid, past the key range) get no class;
* builds the (BLOCK_N, BLOCK_D) K tile (then the V tile) a sub-vector at a time: a coded slot loads
  the code of each sub-space once, then the centroid ``CB[h, m, code, :]`` as SUB contiguous
  elements (a (BLOCK_N, BLOCK_D // SUB, SUB) load, reshaped); anchored / exact slots load their
  rows; all three are masked loads with ``other=0`` and merged with ``tl.where``, so codes of
  anchor or exact slots (maybe out of the codebook), unused anchor rows and NaN in invalid slots
  are never read (a code is only loaded, and used as an index, for a coded slot);
* with a :class:`KeyRotation` (pre-RoPE key codes), rotates the coded part of the K tile: each
  rotated element also needs its RoPE partner (``d +- R/2``), the same element of the sub-space
  ``R / 2 / SUB`` away (a second sub-vector load), and cos / sin of ``position * inv_freq`` in
  fp32, the rotation the reference applies with ``rope_rotate``. Where the pairs do not fall on
  sub-vector boundaries (``R / 2`` not a multiple of SUB: :func:`whole_sub_vectors`), the tile is
  gathered element by element instead (the code and the centroid element per element).

A lookup table of query . centroid products (PQ search's trick) cannot replace the key gathers
here: with pre-RoPE codes (the default) a key's score is the query rotated back by that key's
position against its centroids, a different table per position.

Precision: 16-bit ``tl.dot`` operands when q and every codebook / anchor / exact tensor share one
16-bit dtype, fp32 "ieee" dots otherwise (each source is then upcast to fp32 before merging, so a
bf16 codebook is not rounded through fp16).

Speed (one H100, D = 128, 8 kv heads x 4, sub-vector 8, 256 centroids, fp16), measured with the
element-wise gather before the sub-vector loads: the per-element centroid gathers bound it, not the
bytes read: decode over 32K keys took ~0.24 ms against ~0.07 ms for the dense kernel over the
dequantized fp16 store (which reads ~14x more bytes), a 512-query prefill over 4K keys ~0.85 ms
against ~0.18 ms. The sub-vector loads are not measured on a GPU yet
(``python benchmarks/antkv_kernels.py``). Launch parameters: :func:`_launch_config`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention.dense import _launch_config as _dense_launch_config
from ..attention.dense import (
    check_device_q_start,
    finish_rows,
    key_range,
    keys_ok,
    launch_attention,
    load_q,
    program_rows,
    query_slots,
    scores,
    softmax_step,
    visible,
)
from .layout import CodedKV
from .reference import check_coded_inputs

__all__ = ["attention_over_codes"]


@triton.jit
def _slot_sources(ANCHOR_SLOT, slot_row, sass, offs_n, key_ok, exact_start):
    """Where each slot offs_n (BLOCK_N,) of a key tile reads its key and value.

    slot_row: offset of anchor_slot[b, h] (int64). Returns (BLOCK_N,) anchor_row (int32, -1 if
    none) and the disjoint flags coded, anchored, exact, all False where key_ok is False.
    """
    before_exact = key_ok & (offs_n < exact_start)
    anchor_row = tl.load(ANCHOR_SLOT + slot_row + offs_n.to(tl.int64) * sass, mask=before_exact,
                         other=-1).to(tl.int32)
    anchored = anchor_row >= 0
    return anchor_row, before_exact & ~anchored, anchored, key_ok & (offs_n >= exact_start)


@triton.jit
def _centroid_elements(code_row, CB, hkv, offs_t, dims, sel, scs, scm, sbh, sbm, sbc, sbd,
                       SUB: tl.constexpr):
    """(BLOCK_N, BLOCK_D): element dims[d] of each slot's centroid (the code of sub-vector
    dims[d] // SUB, read from code_row = the tile's first code), 0 where sel is False."""
    sub_space = dims // SUB
    code = tl.load(code_row + (offs_t[:, None] * scs + sub_space[None, :] * scm), mask=sel, other=0).to(tl.int32)
    centroid_offs = (sub_space * sbm + (dims % SUB) * sbd)[None, :] + code * sbc
    return tl.load(CB + hkv * sbh + centroid_offs, mask=sel, other=0.0)


@triton.jit
def _centroid_vectors(code_row, CB, hkv, offs_t, sub_spaces, sel, scs, scm, sbh, sbm, sbc, sbd,
                      SUB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_N, BLOCK_D): each slot's centroids of the sub-spaces sub_spaces (BLOCK_D // SUB,) side by side, 0
    where sel (BLOCK_N, BLOCK_D // SUB) is False. One code load per sub-vector, and each centroid read as SUB
    contiguous elements (a vector load), where the element-wise gather reads the code and the centroid per
    element."""
    code = tl.load(code_row + (offs_t[:, None] * scs + sub_spaces[None, :] * scm), mask=sel, other=0).to(tl.int32)
    offs_s = tl.arange(0, SUB)
    offs = (sub_spaces * sbm)[None, :, None] + code[:, :, None] * sbc + (offs_s * sbd)[None, None, :]
    x = tl.load(CB + hkv * sbh + offs, mask=sel[:, :, None], other=0.0)       # (BLOCK_N, BLOCK_D // SUB, SUB)
    return tl.reshape(x, (BLOCK_N, BLOCK_D))


@triton.jit
def _coded_tile(CODES, CB, ANCHORS, EXACT, b, hkv, start, exact_start,
                anchor_row, coded, anchored, exact,
                scb, sch, scs, scm,     # codes (B, Hkv, S, M)
                sbh, sbm, sbc, sbd,     # codebook (Hkv, M, C, SUB)
                sab, sah, sas, sad,     # anchors (B, Hkv, A, d)
                seb, seh, ses, sed,     # exact tokens (B, Hkv, P, d)
                d, INV_FREQ, rot_half, rope_scaling, position_offset,
                SUB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_FP32: tl.constexpr, ROPE: tl.constexpr, INTERPRETED: tl.constexpr, VECTOR: tl.constexpr):
    """(BLOCK_N, BLOCK_D) keys (or values) of slots [start, start + BLOCK_N) of (b, hkv): the
    centroids of coded slots, the rows of anchored / exact ones, 0 elsewhere and past d.

    anchor_row, coded, anchored, exact: (BLOCK_N,) as returned by :func:`_slot_sources`.
    With ROPE, coded slots hold pre-RoPE keys: their centroids are rotated at position
    slot - position_offset (the layout's KeyRotation; rot_half = len(INV_FREQ)); each rotated
    element also gathers its partner element d +- rot_half. VECTOR: centroids are read a sub-vector at a
    time (:func:`_centroid_vectors`; the host checks that rotation pairs fall in sub-spaces rot_half // SUB
    apart), else element by element (:func:`_centroid_elements`).
    Slot offsets are an int64 scalar (start) plus int32 offsets within the tile, as in dense.py.
    """
    offs_t = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < d)[None, :]
    start64 = tl.cast(start, tl.int64)     # not start.to(): a python int under the interpreter
    coded2 = coded[:, None] & d_ok
    code_row = CODES + b * scb + hkv * sch + start64 * scs
    if VECTOR:
        spaces = tl.arange(0, BLOCK_D // SUB)
        coded_spaces = coded[:, None] & (spaces < d // SUB)[None, :]
        x = _centroid_vectors(code_row, CB, hkv, offs_t, spaces, coded_spaces, scs, scm, sbh, sbm, sbc, sbd,
                              SUB, BLOCK_N, BLOCK_D)
    else:
        x = _centroid_elements(code_row, CB, hkv, offs_t, offs_d, coded2, scs, scm, sbh, sbm, sbc, sbd, SUB)
    if ROPE:
        low = offs_d < rot_half
        rotated = offs_d < 2 * rot_half
        if VECTOR:   # element d's partner d +- rot_half is the same element of the sub-space rot_half // SUB away
            rotated_spaces = 2 * rot_half // SUB
            partner_spaces = tl.where(spaces < rotated_spaces, (spaces + rot_half // SUB) % rotated_spaces, spaces)
            xp = _centroid_vectors(code_row, CB, hkv, offs_t, partner_spaces,
                                   coded_spaces & (spaces < rotated_spaces)[None, :],
                                   scs, scm, sbh, sbm, sbc, sbd, SUB, BLOCK_N, BLOCK_D)
        else:
            partner = tl.where(low, offs_d + rot_half, offs_d - rot_half)
            xp = _centroid_elements(code_row, CB, hkv, offs_t, partner, coded2 & rotated[None, :],
                                    scs, scm, sbh, sbm, sbc, sbd, SUB)
        freq = tl.load(INV_FREQ + tl.where(low, offs_d, offs_d - rot_half), mask=rotated, other=0.0)
        angle = (start64 + offs_t - position_offset).to(tl.float32)[:, None] * freq[None, :]
        sign = tl.where(low, -1.0, 1.0)[None, :]
        xr = rope_scaling * (x.to(tl.float32) * tl.cos(angle) + sign * xp.to(tl.float32) * tl.sin(angle))
        if INTERPRETED and x.dtype == tl.bfloat16:
            # Round to nearest even by hand, as torch and the GPU do: the CPU interpreter truncates fp32 -> bf16.
            bits = xr.to(tl.int32, bitcast=True)
            xr = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        x = tl.where(rotated[None, :], xr, x.to(tl.float32)).to(x.dtype)
    anchor_offs = anchor_row[:, None] * sas + offs_d[None, :] * sad
    a = tl.load(ANCHORS + b * sab + hkv * sah + anchor_offs, mask=anchored[:, None] & d_ok, other=0.0)
    # (start - exact_start) < 0 before the exact tail: such pointers are formed but never loaded.
    exact_offs = offs_t[:, None] * ses + offs_d[None, :] * sed
    e = tl.load(EXACT + b * seb + hkv * seh + (start64 - exact_start) * ses + exact_offs,
                mask=exact[:, None] & d_ok, other=0.0)
    if DOT_FP32:    # fp32 dots: upcast each source (tl.where would round a bf16 one through fp16)
        x, a, e = x.to(tl.float32), a.to(tl.float32), e.to(tl.float32)
    return tl.where(exact[:, None], e, tl.where(anchored[:, None], a, x))


@triton.jit
def _coded_fwd_kernel(
    Q, VALID, MASK, OUT, M_PART, L_PART, LSE,
    sqb, sqh, sql, sqd,
    svalb, svals,
    smb, smh, smi, smj,
    sob, soh, sol, sod,
    slb, slh, sll,
    Hkv, group, Lq, q_start, kv_len, window, num_splits, D, DV,
    qk_scale, softcap_log2,
    ANCHOR_SLOT, sasb, sash, sass, exact_start,
    CODES_K, CB_K, ANCHOR_K, EXACT_K,
    sckb, sckh, scks, sckm, sbkh, sbkm, sbkc, sbkd, sakb, sakh, saks, sakd, sekb, sekh, seks, sekd,
    CODES_V, CB_V, ANCHOR_V, EXACT_V,
    scvb, scvh, scvs, scvm, sbvh, sbvm, sbvc, sbvd, savb, savh, savs, savd, sevb, sevh, sevs, sevd,
    INV_FREQ, POSITION_OFFSET, rot_half, rope_scaling,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_VALID: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_LSE: tl.constexpr, IS_SPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
    UPCAST_DOT: tl.constexpr, Q_START_ON_DEVICE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SUB_K: tl.constexpr, SUB_V: tl.constexpr, ROPE: tl.constexpr, INTERPRETED: tl.constexpr,
    VECTOR_K: tl.constexpr, VECTOR_V: tl.constexpr,
):
    """One program of attention over a coded store; grid, common parameters and outputs as
    ``_attn_fwd_kernel`` in dense.py. The store: ANCHOR_SLOT (B, Hkv, S) int16/int32 and exact_start,
    then for keys (K) and values (V) the codes, codebook, anchors and exact tokens of
    :class:`CodedKV` with their strides; SUB_K = D // Mk, SUB_V = Dv // Mv; with ROPE, the
    KeyRotation's inv_freq (rot_half,) fp32, position_offset (B,) int32 and scaling; INTERPRETED:
    running under Triton's CPU interpreter; VECTOR_K / VECTOR_V: centroids read a sub-vector at a time.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b, hkv, R, rows, row_ok, qi, head = program_rows(pid_m, pid_bh, Hkv, group, Lq, BLOCK_M)
    q = load_q(Q, b, head, qi, row_ok, sqb, sqh, sql, sqd, D, BLOCK_D)
    q_start, kv_len = query_slots(q_start, kv_len, Lq, Q_START_ON_DEVICE)
    q_pos = q_start + qi
    lo, hi = key_range(pid_m, pid_s, R, group, q_start, kv_len, window, num_splits,
                       CAUSAL, HAS_WINDOW, IS_SPLIT, BLOCK_M, BLOCK_N)
    mask_rows = b * smb + head * smh + qi.to(tl.int64) * smi
    slot_row = b * sasb + hkv * sash
    position_offset = tl.load(POSITION_OFFSET + b) if ROPE else 0

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        key_ok = keys_ok(VALID, b * svalb, svals, offs_n, hi, HAS_VALID)
        anchor_row, coded, anchored, exact = _slot_sources(ANCHOR_SLOT, slot_row, sass, offs_n, key_ok,
                                                           exact_start)
        k = _coded_tile(CODES_K, CB_K, ANCHOR_K, EXACT_K, b, hkv, start, exact_start,
                        anchor_row, coded, anchored, exact,
                        sckb, sckh, scks, sckm, sbkh, sbkm, sbkc, sbkd, sakb, sakh, saks, sakd,
                        sekb, sekh, seks, sekd, D, INV_FREQ, rot_half, rope_scaling, position_offset,
                        SUB_K, BLOCK_N, BLOCK_D, DOT_FP32, ROPE, INTERPRETED, VECTOR_K)
        s = scores(q, k, qk_scale, softcap_log2, HAS_SOFTCAP, UPCAST_DOT)
        vis = visible(MASK, mask_rows, smj, row_ok, key_ok, offs_n, q_pos, window,
                      CAUSAL, HAS_WINDOW, HAS_MASK)
        v = _coded_tile(CODES_V, CB_V, ANCHOR_V, EXACT_V, b, hkv, start, exact_start,
                        anchor_row, coded, anchored, exact,
                        scvb, scvh, scvs, scvm, sbvh, sbvm, sbvc, sbvd, savb, savh, savs, savd,
                        sevb, sevh, sevs, sevd, DV, INV_FREQ, rot_half, rope_scaling, position_offset,
                        SUB_V, BLOCK_N, BLOCK_DV, DOT_FP32, False, INTERPRETED, VECTOR_V)
        m_i, l_i, acc = softmax_step(m_i, l_i, acc, s, vis, v, DOT_FP32, UPCAST_DOT)

    finish_rows(OUT, M_PART, L_PART, LSE, acc, m_i, l_i, pid_bh, pid_s, num_splits,
                b, head, qi, rows, row_ok, R, DV, sob, soh, sol, sod, slb, slh, sll,
                HAS_LSE, IS_SPLIT, BLOCK_DV)


def whole_sub_vectors(sub: int, rot_half: int) -> bool:
    """Whether the kernel may read centroids a sub-vector at a time: the sub-vector length is a power of two (so it
    divides the tile's power-of-two width) and RoPE's pairs (d, d + rot_half) are the same element of sub-spaces
    rot_half // sub apart (rot_half = 0: no rotation)."""
    return sub & (sub - 1) == 0 and rot_half % sub == 0


def _launch_config(rows: int, block_d: int, fp32_dots: bool):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the coded kernel; arguments as the dense rule's.

    The dense rule's BLOCK_M; BLOCK_N at most 32; 8 warps with fp32 dots, 4 with 16-bit ones; no
    software pipelining (num_stages 1). From one sweep on an H100 (D = 128, BLOCK_N 16/32/64 x
    4/8 warps x 1/2/3 stages; decode over 8K and 32K keys, a 17-query fp32 chunk, a 512-query fp16
    prefill): 1 stage was fastest or within ~10 % everywhere, the gathers gain nothing from
    pipelining, and with fp32 dots 3 stages overflow shared memory and 4 warps spill (3-8x slower).
    Not tuned beyond that (other head dims, sub-vector lengths, H200).
    """
    block_m, block_n, _, _ = _dense_launch_config(rows, block_d, fp32_dots)
    return block_m, min(block_n, 32), 8 if fp32_dots else 4, 1


def _side_args(codes, codebook, anchors, exact):
    """Kernel arguments of one side (keys or values): the four tensors, then their strides."""
    tensors = (codes, codebook, anchors, exact)
    return (*tensors, *(s for t in tensors for s in t.stride()))


def attention_over_codes(q, kv: CodedKV, valid=None, q_start=None, *, scale, causal=True, window=0,
                         softcap=0.0, mask=None, num_splits=None, return_lse=False):
    """Attention of new queries over a product-quantized KV store (Triton).

    q: (B, Hq, Lq, D) fp16/bf16/fp32, any strides; the queries sit in store slots
       q_start .. q_start + Lq - 1. kv: a :class:`CodedKV` of length = exact_start + P tokens and
       capacity S; Hq % Hkv == 0 (GQA).
    valid: (B, S) bool, whether each slot holds a real token; None: all slots are valid.
    q_start: python int, or None for kv.length - Lq; kv_len = q_start + Lq <= kv.length keys are
       attended. Or a (1,) int64 tensor on q's device, read by the kernel (a captured decode step: its
       position moves between replays of one launch); then mask must be None and the launch is planned for
       the whole store. mask: (1|B, 1|Hq, Lq, kv_len) bool, replaces causal and window.
    scale, causal, window, softcap, num_splits: as in
       :func:`kvpass.kernels.attention.attention_over_store`.
    return_lse: also return lse (B, Hq, Lq) fp32, natural-log logsumexp of each row's visible
       scores, -inf for rows with no visible key.

    Returns a new contiguous (B, Hq, Lq, Dv) tensor of q's dtype (and lse if return_lse); rows
    with no visible key are 0.
    """
    on_device = q_start if isinstance(q_start, torch.Tensor) else None
    if on_device is not None:
        check_device_q_start(on_device, q, mask)
    dims = check_coded_inputs(q, kv, valid, None if on_device is not None else q_start, scale=scale,
                              window=window, softcap=softcap, mask=mask)
    store_args = (
        kv.anchor_slot, *kv.anchor_slot.stride(), kv.exact_start,
        *_side_args(kv.codes_k, kv.codebook_k, kv.anchor_k, kv.exact_k),
        *_side_args(kv.codes_v, kv.codebook_v, kv.anchor_v, kv.exact_v),
    )
    rotation = kv.rotation
    if rotation is None:
        store_args += (None, None, 0, 1.0)
    else:
        store_args += (rotation.inv_freq, rotation.position_offset, rotation.inv_freq.numel(), rotation.scaling)
    sub_k, sub_v = kv.codebook_k.shape[3], kv.codebook_v.shape[3]
    rot_half = 0 if rotation is None else rotation.inv_freq.numel()
    meta = {"SUB_K": sub_k, "SUB_V": sub_v, "ROPE": rotation is not None, "INTERPRETED": not q.is_cuda,
            "VECTOR_K": whole_sub_vectors(sub_k, rot_half), "VECTOR_V": whole_sub_vectors(sub_v, 0)}
    return launch_attention(
        _coded_fwd_kernel, store_args, meta, kv.tensors(), q, valid, mask, dims,
        scale=scale, causal=causal, window=window, softcap=softcap, num_splits=num_splits,
        return_lse=return_lse, caller="attention_over_codes", launch_config=_launch_config,
        q_start_on_device=on_device,
    )
