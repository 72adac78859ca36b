"""Plain PyTorch reference for attention over a product-quantized KV store, and its dequantization.

:func:`dequantize` materializes the store as dense fp32 K/V (also the store's reference view).
:func:`attention_over_codes_reference` is the ground truth of the Triton kernel (``kernel.py``):
dequantize, then the computation and visibility rule of
:mod:`kvpass.kernels.attention.reference`, plus the log-sum-exp of each row.
"""
from __future__ import annotations

import torch

from ..attention.reference import check_attention_inputs, visibility_mask
from .layout import CodedKV, KeyRotation, rope_rotate

__all__ = ["attention_over_codes_reference", "check_coded_inputs", "dequantize"]


def _dequantize_side(codes, codebook, anchor_slot, anchors, exact, exact_start,
                     rotation: KeyRotation | None = None):
    """Dense fp32 keys (or values) of slots [0, exact_start + P): (B, Hkv, exact_start + P, d).

    codes (B, Hkv, S, M) uint8; codebook (Hkv, M, C, d // M); anchor_slot (B, Hkv, S) int32;
    anchors (B, Hkv, A, d); exact (B, Hkv, P, d); rotation: RoPE applied to the decoded codes, or None.
    """
    Hkv, M, C, sub = codebook.shape
    slot = anchor_slot[:, :, :exact_start].long()                   # (B, Hkv, n)
    is_anchor = (slot >= 0)[..., None]                              # (B, Hkv, n, 1)
    # Codes of anchor slots are garbage (maybe >= C): gather centroid 0 for them instead.
    code = codes[:, :, :exact_start].long().masked_fill(is_anchor, 0)   # (B, Hkv, n, M)
    # Row of centroid (h, m, c) in the flattened (Hkv * M * C, sub) codebook: (h * M + m) * C + c.
    first_row = torch.arange(Hkv * M, device=code.device).view(Hkv, 1, M) * C
    centroids = codebook.float().reshape(Hkv * M * C, sub)[code + first_row]   # (B, Hkv, n, M, sub)
    rows = slot.clamp(min=0)[..., None].expand(-1, -1, -1, anchors.shape[-1])
    anchored = anchors.float().gather(2, rows)                      # (B, Hkv, n, d)
    decoded = centroids.flatten(-2)
    if rotation is not None:
        # Rotated in fp32 and rounded to the codebook's dtype, as the kernel (and the model, whose post-RoPE
        # keys are in its dtype) holds them.
        decoded = rope_rotate(decoded.to(codebook.dtype), rotation.positions(0, exact_start), rotation.inv_freq,
                              rotation.scaling).float()
    head = torch.where(is_anchor, anchored, decoded)
    return torch.cat([head, exact.float()], dim=2)


def dequantize(kv: CodedKV) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense fp32 (k (B, Hkv, length, D), v (B, Hkv, length, Dv)) of a store, by the slot rule of
    :mod:`.layout`; only the first ``kv.length`` slots are materialized."""
    kv.validate()
    k = _dequantize_side(kv.codes_k, kv.codebook_k, kv.anchor_slot, kv.anchor_k, kv.exact_k, kv.exact_start,
                         kv.rotation)
    v = _dequantize_side(kv.codes_v, kv.codebook_v, kv.anchor_slot, kv.anchor_v, kv.exact_v, kv.exact_start)
    return k, v


def check_coded_inputs(q, kv, valid, q_start, *, scale, window, softcap, mask):
    """Validate the inputs of attention over a coded store (kernel and reference); TypeError if kv
    is not a CodedKV, ValueError otherwise.

    valid must be None or (B, S) bool, S = the store's capacity. Everything else is checked by
    :func:`check_attention_inputs` as for a dense store of ``kv.length`` slots, whose result is
    returned: ``(B, Hq, Hkv, Lq, length, D, Dv, q_start, kv_len)`` (q_start None -> length - Lq).
    """
    if not isinstance(kv, CodedKV):
        raise TypeError(f"kv must be a CodedKV, got {type(kv).__name__}")
    kv.validate()
    B, Hkv, S = kv.anchor_slot.shape
    if valid is not None and (not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool
                              or tuple(valid.shape) != (B, S)):
        got = (tuple(valid.shape), valid.dtype) if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise ValueError(f"valid must be None or a bool tensor of shape (B, S) = {(B, S)}, got {got}")
    # Stand-ins with the shapes of the dequantized store: stride-0 views, nothing is materialized.
    length = kv.length
    k = kv.anchor_k[:, :, :1].expand(B, Hkv, length, -1)
    v = kv.anchor_v[:, :, :1].expand(B, Hkv, length, -1)
    return check_attention_inputs(q, k, v, None if valid is None else valid[:, :length], q_start,
                                  scale=scale, window=window, softcap=softcap, mask=mask)


def attention_over_codes_reference(q, kv, valid=None, q_start=None, *, scale, causal=True, window=0,
                                   softcap=0.0, mask=None, num_splits=None, return_lse=False):
    """fp32 reference of :func:`kvpass.kernels.coded_attention.attention_over_codes`.

    q: (B, Hq, Lq, D); kv: CodedKV; valid: (B, S) bool or None (all valid); q_start: int, None
    (``kv.length - Lq``) or a (1,) int64 tensor (read on the host here); mask: (1|B, 1|Hq, Lq,
    kv_len) bool or None; other arguments as in
    :func:`kvpass.kernels.attention.reference.attention_over_store_reference` (``num_splits`` is
    accepted and ignored). Returns a contiguous (B, Hq, Lq, Dv) tensor of q's dtype, and with
    return_lse also lse (B, Hq, Lq) fp32: the natural-log logsumexp of the visible scaled,
    soft-capped scores of each row, -inf for a row with no visible key (whose output is 0).
    """
    del num_splits
    if isinstance(q_start, torch.Tensor):
        q_start = int(q_start)
    B, Hq, Hkv, Lq, _, _, _, q_start, kv_len = check_coded_inputs(
        q, kv, valid, q_start, scale=scale, window=window, softcap=softcap, mask=mask
    )
    k, v = dequantize(kv)
    if valid is None:
        valid = torch.ones(B, kv_len, dtype=torch.bool, device=q.device)
    vis = visibility_mask(valid, q_start, Lq, Hq, causal=causal, window=window, mask=mask)
    # Zero K/V of invalid slots first: they may hold garbage (even NaN) and 0 * NaN = NaN.
    slot_ok = valid[:, None, :kv_len, None]
    group = Hq // Hkv
    kf = k[:, :, :kv_len].masked_fill(~slot_ok, 0.0).repeat_interleave(group, dim=1)
    vf = v[:, :, :kv_len].masked_fill(~slot_ok, 0.0).repeat_interleave(group, dim=1)
    s = torch.matmul(q.float(), kf.transpose(-1, -2)) * float(scale)
    if softcap > 0:
        s = float(softcap) * torch.tanh(s / float(softcap))
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                 # -inf where nothing is visible
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])   # empty rows -> 0
    out = torch.matmul(p, vf).to(q.dtype).contiguous()
    return (out, lse) if return_lse else out
