"""Plain PyTorch reference for AnTKV anchor-score column statistics, and the input checks.

AnTKV keeps in fp16 the ~1 % of tokens ("anchors") whose quantization error would hurt attention
most. A first attention pass gives, per query row ``i``, its output ``o_i`` and the natural-log
log-sum-exp ``lse_i`` of its scores, so the normalized probabilities are
``A_ij = exp(s_ij - lse_i)``. Since ``d o_i / d v_j = A_ij`` and
``d o_i / d k_j = scale * A_ij (v_j - o_i) q_i^T``, an error in key ``j`` moves the outputs by
about ``sum_i A_ij ||q_i|| ||v_j - o_i||`` (times ``scale``).

Statistics (``out[t, b, h, j]`` for scored key ``j`` of kv head ``h``, summed over the visible
pairs of a query ``i`` and a query head ``g`` of ``h``'s GQA group):

* ``t = 0``: ``A`` (the attention mass the key receives; its sensitivity to a value error);
* ``t = 1``: ``A (1 - A)`` (the softmax Jacobian's diagonal: sensitivity to a score error);
* ``t = 2``: ``A ||q_i||_2 ||v_j - o_i||_2`` (the key-error sensitivity; 0 without ``o``);
* ``t = 3``: ``1`` (the number of visible pairs, e.g. to turn sums into means).

Visibility is the rule of :mod:`kvpass.kernels.attention.reference` (``mask``, or causal +
window; ``valid`` slots), restricted to the scored keys; rows whose ``lse`` is ``-inf`` see
nothing. Invalid keys get all-zero statistics, whatever their K/V slots hold (even NaN).

This reference materializes the ``(B, Hq, Lq, Lk)`` scores in fp32: it is the ground truth the
Triton kernel (``kernel.py``) is tested against, for tests and short sequences only.
"""
from __future__ import annotations

import torch

from ..attention.reference import check_attention_inputs, visibility_mask

__all__ = ["anchor_scores_reference", "attention_scores", "check_anchor_inputs", "column_statistics"]

NUM_STATS = 4


def _is_index(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def check_anchor_inputs(q, k, v, lse, o, valid, *, q_start, key_start, scale, window, softcap,
                        mask, span=0):
    """Validate the inputs of ``anchor_scores`` (kernel and reference alike).

    Returns ``(B, Hq, Hkv, Lq, Lk, D, Dv, kv_len)``. Raises ``ValueError`` naming the offending
    input. Shapes: see :func:`anchor_scores_reference`.
    """
    if not _is_index(q_start):
        raise ValueError(f"q_start must be a non-negative python int, got {q_start!r}")
    if not _is_index(span):
        raise ValueError(f"span must be a python int >= 0 (0: every visible query scores), got {span!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor, got shape {shape}")
    # k and v hold only the scored keys. Everything else attention checks (dtypes, batch, GQA,
    # head dims, valid, q_start, mask, window, softcap, scale) is checked by the attention check
    # itself, against shape-only stand-ins for the store the queries attend to (its capacity is
    # valid's width, or kv_len), so the two APIs accept and reject the same arguments.
    kv_len = q_start + q.shape[2]
    capacity = valid.shape[1] if isinstance(valid, torch.Tensor) and valid.dim() == 2 else kv_len
    store_k, store_v = (torch.empty((*t.shape[:2], capacity, t.shape[3]), dtype=t.dtype, device="meta")
                        for t in (k, v))
    B, Hq, Hkv, Lq, _, D, Dv, _, _ = check_attention_inputs(
        q, store_k, store_v, valid, q_start, scale=scale, window=window, softcap=softcap, mask=mask
    )
    Lk = k.shape[2]
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must hold the same keys: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not _is_index(key_start) or key_start + Lk > kv_len:
        raise ValueError(f"key_start must be an int >= 0 with key_start + Lk <= kv_len = q_start + Lq = "
                         f"{kv_len}, got key_start = {key_start!r}, Lk = {Lk}")
    if not isinstance(lse, torch.Tensor) or lse.dtype != torch.float32 or tuple(lse.shape) != (B, Hq, Lq):
        got = (tuple(lse.shape), lse.dtype) if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise ValueError(f"lse must be a float32 tensor of shape (B, Hq, Lq) = {(B, Hq, Lq)}, got {got}")
    if o is not None and (not isinstance(o, torch.Tensor) or not o.is_floating_point()
                          or tuple(o.shape) != (B, Hq, Lq, Dv)):
        got = (tuple(o.shape), o.dtype) if isinstance(o, torch.Tensor) else type(o).__name__
        raise ValueError(f"o must be None or a float tensor of shape (B, Hq, Lq, Dv) = {(B, Hq, Lq, Dv)}, "
                         f"got {got}")
    return B, Hq, Hkv, Lq, Lk, D, Dv, kv_len


def attention_scores(q, k, *, scale, softcap=0.0):
    """fp32 scores ``s = scale * q k^T``, soft-capped to ``softcap * tanh(s / softcap)`` if softcap > 0.

    q: (B, Hq, Lq, D); k: (B, Hkv, L, D) with Hq % Hkv == 0 (query head h reads kv head
    h // (Hq // Hkv)). Returns (B, Hq, Lq, L) float32; NaN keys give NaN columns (mask them).
    """
    kf = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.matmul(q.float(), kf.transpose(-1, -2)) * float(scale)
    if softcap > 0:
        s = float(softcap) * torch.tanh(s / float(softcap))
    return s


def anchor_scores_reference(q, k, v, lse, o=None, valid=None, *, q_start, key_start, scale,
                            causal=True, window=0, softcap=0.0, mask=None, span=0):
    """fp32 anchor-score column statistics (see the module doc), materializing all scores.

    q: (B, Hq, Lq, D), queries at store slots q_start .. q_start + Lq - 1 (kv_len = q_start + Lq);
    k: (B, Hkv, Lk, D), v: (B, Hkv, Lk, Dv): the scored keys, at slots key_start .. key_start + Lk - 1;
    lse: (B, Hq, Lq) float32, each row's natural-log logsumexp over all its visible keys (-inf:
    the row sees nothing); o: None or (B, Hq, Lq, Dv), each row's attention output;
    valid: None (all valid) or (B, S) bool, S >= kv_len; mask: None or (1|B, 1|Hq, Lq, kv_len) bool
    over all keys (then causal / window are ignored). scale / causal / window / softcap: as in
    :func:`kvpass.kernels.attention.attention_over_store`. span: 0, or a key counts only the visible
    pairs of the span queries from its own slot on (key slot <= query slot < key slot + span).
    Returns (4, B, Hkv, Lk) float32.
    """
    B, Hq, Hkv, Lq, Lk, _, _, kv_len = check_anchor_inputs(
        q, k, v, lse, o, valid, q_start=q_start, key_start=key_start, scale=scale, window=window,
        softcap=softcap, mask=mask, span=span,
    )
    if valid is None:
        valid = torch.ones(B, kv_len, dtype=torch.bool, device=q.device)
    vis = visibility_mask(valid, q_start, Lq, Hq, causal=causal, window=window, mask=mask)
    vis = vis[..., key_start:key_start + Lk] & (lse > float("-inf"))[..., None]   # (B, Hq, Lq, Lk)
    if span:
        query_slot = q_start + torch.arange(Lq, device=q.device)
        behind = query_slot[:, None] - (key_start + torch.arange(Lk, device=q.device))   # (Lq, Lk)
        vis = vis & (behind >= 0) & (behind < span)
    s = attention_scores(q, k, scale=scale, softcap=softcap)
    # exp(-inf) = 0 where hidden: there s may be NaN (garbage keys) and s - lse = +inf (rows with lse = -inf).
    a = torch.exp(torch.where(vis, s - lse[..., None], float("-inf")))        # (B, Hq, Lq, Lk), 0 where hidden
    return column_statistics(a, vis, q, v, o, Hkv)


def column_statistics(a, vis, q, v, o, kv_heads: int):
    """The statistics (see the module doc) from the probabilities: a (B, Hq, Lq, Lk) fp32, 0 where hidden;
    vis (B, Hq, Lq, Lk) bool, the visible pairs; q (B, Hq, Lq, D); v (B, Hkv, Lk, Dv) the scored values (anything,
    even NaN, where hidden: those pairs are zeroed); o None or (B, Hq, Lq, Dv) the outputs.
    Returns (4, B, Hkv, Lk) float32."""
    B, Hq, Lq, Lk = a.shape
    group = (B, kv_heads, Hq // kv_heads, Lq, Lk)
    stats = a.new_zeros(NUM_STATS, B, kv_heads, Lk)
    stats[0] = a.view(group).sum(dim=(2, 3))
    stats[1] = stats[0] - a.square().view(group).sum(dim=(2, 3))
    if o is not None:
        # ||v_j - o_i||^2 = ||o||^2 - 2 o.v + ||v||^2 as the kernel computes it, but in float64, where the
        # cancellation of near-equal v and o that fp32 suffers is negligible; hidden pairs are zeroed, as
        # garbage (NaN) V may sit there.
        v_rows = v.double().repeat_interleave(Hq // kv_heads, dim=1)
        o64 = o.double()
        square = (o64.square().sum(-1)[..., None] - 2 * torch.matmul(o64, v_rows.transpose(-1, -2))
                  + v_rows.square().sum(-1)[..., None, :])
        dist = square.clamp_min(0).sqrt().float()
        sensitivity = torch.where(vis, a * q.float().norm(dim=-1)[..., None] * dist, 0.0)
        stats[2] = sensitivity.view(group).sum(dim=(2, 3))
    stats[3] = vis.view(group).sum(dim=(2, 3))
    return stats
