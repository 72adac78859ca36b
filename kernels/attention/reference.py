"""Plain PyTorch reference for attention over a KV store, and the shared input checks.

This is the ground truth the Triton kernel (``dense.py``) is tested against. It materializes the
full visibility mask and computes in fp32, so it is slow and memory hungry at long context; use
it for tests and for CPU fallbacks on short sequences only.

Visibility rule (shared with the kernel). Query ``i`` sits in store slot ``p = q_start + i``
(``q_start`` defaults to ``S - Lq``: the queries are the last ``Lq`` slots of the store); key slot
``j`` (``0 <= j < kv_len = q_start + Lq``) is visible to it iff ``valid[b, j]`` (always true when
``valid`` is None) and

* with ``mask`` (``(Bm, Hm, Lq, kv_len)`` bool, broadcast over batch/heads, e.g. Hugging Face's
  full attention mask over past + new keys): ``mask[b', h', i, j]``; ``causal`` and ``window``
  are ignored, the mask is authoritative;
* without: ``(not causal or j <= p) and (window == 0 or j > p - window)``. Past keys
  (``j < q_start``) always satisfy ``j <= p``, so ``causal`` only restricts the new keys.

A query row with no visible key outputs exactly zero. Only slots excluded by ``valid`` may hold
garbage: a slot hidden by ``mask`` alone is still multiplied (with probability 0) into the output,
so a NaN/inf value there makes the row NaN.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "attention_over_store_reference",
    "visibility_mask",
    "check_attention_inputs",
    "check_new_token",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_attention_inputs(q, k, v, valid, q_start, *, scale, window, softcap, mask):
    """Validate shapes/dtypes shared by the kernel and the reference.

    Returns ``(B, Hq, Hkv, Lq, S, D, Dv, q_start, kv_len)`` with ``q_start`` resolved (None ->
    ``S - Lq``). Raises ``ValueError`` naming the offending shapes when they disagree.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor, got shape {shape}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16/bfloat16/float32, got {t.dtype}")
    B, Hq, Lq, D = q.shape
    Bk, Hkv, S, Dk = k.shape
    Bv, Hv, Sv, Dv = v.shape
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if (Bk, Hkv, S) != (Bv, Hv, Sv):
        raise ValueError(f"k and v must agree on (batch, kv heads, capacity): {shapes}")
    if Bk != B:
        raise ValueError(f"q and k must have the same batch size: {shapes}")
    if Dk != D:
        raise ValueError(f"q and k must have the same head dim: {shapes}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads must be a multiple of kv heads (GQA): {shapes}")
    if valid is not None and (not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool
                              or tuple(valid.shape) != (B, S)):
        got = (tuple(valid.shape), valid.dtype) if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise ValueError(f"valid must be None or a bool tensor of shape (B, S) = {(B, S)}, got {got}; {shapes}")
    if q_start is None:
        if Lq > S:
            raise ValueError(f"Lq = {Lq} exceeds the store capacity S = {S}: {shapes}")
        q_start = S - Lq
    elif isinstance(q_start, bool) or not isinstance(q_start, int) or q_start < 0:
        raise ValueError(f"q_start must be None or a non-negative python int, got {q_start!r}")
    kv_len = q_start + Lq
    if kv_len > S:
        raise ValueError(
            f"q_start + Lq = {q_start} + {Lq} = {kv_len} exceeds the store capacity S = {S}: {shapes}"
        )
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be a non-negative int (0 = no window), got {window!r}")
    if not (float(softcap) >= 0.0):
        raise ValueError(f"softcap must be >= 0 (0 = off), got {softcap!r}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
            got = (tuple(mask.shape), mask.dtype) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a 4-D bool tensor (Bm, Hm, Lq, kv_len), got {got}")
        Bm, Hm, Lm, Km = mask.shape
        if Bm not in (1, B) or Hm not in (1, Hq) or (Lm, Km) != (Lq, kv_len):
            raise ValueError(
                f"mask shape {tuple(mask.shape)} must be (1 or {B}, 1 or {Hq}, Lq = {Lq}, "
                f"kv_len = q_start + Lq = {kv_len}) for {shapes}"
            )
    return B, Hq, Hkv, Lq, S, D, Dv, q_start, kv_len


def check_new_token(new_k, new_v, q, k, v, mask) -> bool:
    """Whether a decode query's own key and value come with the call (see :func:`attention_over_store`);
    raises if they come half, misshapen, with more than one query or with a mask."""
    if new_k is None and new_v is None:
        return False
    B, Hkv, _, D = k.shape
    want_k, want_v = (B, Hkv, 1, D), (B, Hkv, 1, v.shape[3])
    if new_k is None or new_v is None or tuple(new_k.shape) != want_k or tuple(new_v.shape) != want_v:
        got = [None if t is None else tuple(t.shape) for t in (new_k, new_v)]
        raise ValueError(f"new_k and new_v must both be given, shaped {want_k} and {want_v}; got {got}")
    if q.shape[2] != 1 or mask is not None:
        raise ValueError(f"new_k / new_v are one decode query's: Lq must be 1 (got {q.shape[2]}) and mask None")
    if new_k.device != k.device or new_v.device != k.device:
        raise ValueError(f"new_k / new_v must be on the store's device {k.device}, got {new_k.device}, {new_v.device}")
    return True


def visibility_mask(valid, q_start, Lq, Hq, *, causal=True, window=0, mask=None):
    """Materialize the (B, Hq, Lq, kv_len) bool mask of the visibility rule in the module doc.

    valid: (B, S) bool with S >= kv_len = q_start + Lq (pass all-True for ``valid=None``);
    mask: optional (Bm, Hm, Lq, kv_len) bool, Bm in {1, B}, Hm in {1, Hq}.
    """
    B = valid.shape[0]
    kv_len = q_start + Lq
    dev = valid.device
    if mask is not None:
        rule = mask.to(dev)
    else:
        p = q_start + torch.arange(Lq, device=dev)[:, None]      # (Lq, 1) query slots
        j = torch.arange(kv_len, device=dev)[None, :]            # (1, kv_len) key slots
        rule = torch.ones(Lq, kv_len, dtype=torch.bool, device=dev)
        if causal:
            rule &= j <= p
        if window > 0:
            rule &= j > p - window
    return rule.expand(B, Hq, Lq, kv_len) & valid[:, None, None, :kv_len]


def attention_over_store_reference(q, k, v, valid=None, q_start=None, *, scale, causal=True,
                                   window=0, softcap=0.0, mask=None, num_splits=None, return_lse=False,
                                   new_k=None, new_v=None):
    """fp32 reference. Shapes as in :func:`kvpass.kernels.attention.attention_over_store`.

    q: (B, Hq, Lq, D); k: (B, Hkv, S, D); v: (B, Hkv, S, Dv); valid: (B, S) bool or None (all
    valid); q_start: int, None (``S - Lq``) or a (1,) int64 tensor (read on the host here); mask:
    (1|B, 1|Hq, Lq, kv_len) bool or None.
    Returns a contiguous (B, Hq, Lq, Dv) tensor of q's dtype, and with return_lse also the
    (B, Hq, Lq) fp32 natural-log logsumexp of each row's visible scores (-inf: nothing visible).
    new_k (B, Hkv, 1, D), new_v (B, Hkv, 1, Dv): the decode query's own key and value, copied into k, v at
    slot q_start first (in place, cast to the store's dtype).
    ``num_splits`` is accepted (and ignored) so the two functions are call-compatible.
    """
    del num_splits
    if isinstance(q_start, torch.Tensor):
        q_start = int(q_start)
    B, Hq, Hkv, Lq, S, D, Dv, q_start, kv_len = check_attention_inputs(
        q, k, v, valid, q_start, scale=scale, window=window, softcap=softcap, mask=mask
    )
    if new_k is not None or new_v is not None:
        check_new_token(new_k, new_v, q, k, v, mask)
        k[:, :, q_start : q_start + 1] = new_k
        v[:, :, q_start : q_start + 1] = new_v
    group = Hq // Hkv
    if valid is None:
        valid = torch.ones(B, kv_len, dtype=torch.bool, device=q.device)
    vis = visibility_mask(valid, q_start, Lq, Hq, causal=causal, window=window, mask=mask)
    # Zero K/V of invalid slots first: they may hold garbage (even NaN) and 0 * NaN = NaN.
    slot_ok = valid[:, None, :kv_len, None]
    kf = k[:, :, :kv_len].float().masked_fill(~slot_ok, 0.0).repeat_interleave(group, dim=1)
    vf = v[:, :, :kv_len].float().masked_fill(~slot_ok, 0.0).repeat_interleave(group, dim=1)
    s = torch.matmul(q.float(), kf.transpose(-1, -2)) * float(scale)
    if softcap > 0:
        s = float(softcap) * torch.tanh(s / float(softcap))
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.where(vis.any(dim=-1, keepdim=True), p, torch.zeros_like(p))  # empty rows -> 0
    out = torch.matmul(p, vf).to(q.dtype).contiguous()
    return (out, torch.logsumexp(s, dim=-1)) if return_lse else out
