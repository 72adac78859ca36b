"""AnTKV's per-token computations as pure functions: the codes, Anchor Scores and anchor choice of window tokens
leaving the window, and a decode query's exact attention over the window ring merged with its coded attention.

The store (kvpass/methods/antkv.py) applies their results in place. They write nothing themselves, so that a
decode step can run them fused: `fused(fn)` compiles one with Inductor where its tensors are on CUDA (finalizing
a token and attending the ring are dozens of small operations per layer, which a recorded step would otherwise
replay as as many kernel launches); elsewhere it runs as written.
"""
from __future__ import annotations

import functools

import torch

from ..config import AnTKV
from ..kernels.anchor_scores.reference import attention_scores, column_statistics
from ..kernels.coded_attention import rope_rotate
from . import pq


def anchor_score(method: AnTKV, stats: torch.Tensor, key_error: torch.Tensor, value_error: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """Per-token Anchor Score (B, H, n) from the accumulated statistics (4, B, H, n) and the token's own
    quantization errors |k - k^|, |v - v^| (B, H, n). Means over the (query, head) pairs that saw the token;
    tokens nobody saw (padding) get -inf. docs/antkv.md derives the candidates and compares them."""
    seen = stats[3]
    if method.score == "attention":
        total = stats[0]
    elif method.score == "attention_variance":
        total = stats[1]
    else:  # "bound": first-order output error from this token's key and value errors
        total = scale * stats[2] * key_error + stats[0] * value_error
    return torch.where(seen > 0, total / seen.clamp_min(1), float("-inf"))


def encode_tokens(k, v, stats, positions, books, rope, method: AnTKV, scale: float):
    """Codes and Anchor Scores of n window tokens: k (B, H, n, D), v (B, H, n, Dv), their statistics stats
    (4, B, H, n); books = (key codebook (H, Mk, C, D / Mk), value codebook, key whitening or None); with pre-RoPE
    codebooks positions (B, n) and rope = (inv_freq, scaling), else None and None.
    Returns (codes_k (B, H, n, Mk) uint8, codes_v (B, H, n, Mv) uint8, score (B, H, n))."""
    book_k, book_v, whitening = books
    if positions is not None:
        inv_freq, scaling = rope
        codes_k = pq.encode(rope_rotate(k, positions, inv_freq, scaling, inverse=True), book_k, whitening)
        decoded_k = rope_rotate(pq.decode(codes_k, book_k), positions, inv_freq, scaling)
    else:
        codes_k = pq.encode(k, book_k, whitening)
        decoded_k = pq.decode(codes_k, book_k)
    codes_v = pq.encode(v, book_v)
    key_error = (k.float() - decoded_k.float()).norm(dim=-1)
    value_error = (v.float() - pq.decode(codes_v, book_v).float()).norm(dim=-1)
    return codes_k, codes_v, anchor_score(method, stats, key_error, value_error, scale)


def choose_anchors(score, counters, ratio: float):
    """The highest-scoring of n tokens (score (B, H, n); -inf: not a candidate) kept exact within each (row,
    head)'s budget: at most ceil(ratio * finalized candidates) anchors, and once anchors exist a token must also
    reach the weakest one's score. counters = (finalized candidates, anchors, weakest anchor score), each (B, H).
    Returns (chosen (B, H, n) bool, each token's anchor row where chosen (B, H, n) int64, counters after)."""
    finalized, anchors, weakest = counters
    # Padding (never seen by a query) does not count: a padded row keeps the anchors it would have alone.
    finalized = finalized + torch.isfinite(score).sum(-1)
    budget = (torch.ceil(ratio * finalized.double()).long() - anchors).clamp_min(0)                 # (B, H)
    rank = score.argsort(dim=-1, descending=True).argsort(dim=-1)                                   # 0 = best
    floor = torch.where(anchors > 0, weakest, float("-inf"))
    chosen = (rank < budget[..., None]) & (score >= floor[..., None]) & torch.isfinite(score)
    index = anchors[..., None] + chosen.long().cumsum(-1) - 1
    weakest = torch.minimum(weakest, torch.where(chosen, score, float("inf")).amin(-1))
    return chosen, index, (finalized, anchors + chosen.sum(-1), weakest)


def finalize_tokens(k, v, stats, positions, books, rope, method: AnTKV, scale: float, counters, fresh=None):
    """encode_tokens then choose_anchors (arguments as theirs). fresh: None, or a (1,) bool tensor: False makes
    every token a non-candidate (a decode step whose leaving slot was finalized already changes nothing).
    Returns (codes_k, codes_v, chosen, index, counters after)."""
    codes_k, codes_v, score = encode_tokens(k, v, stats, positions, books, rope, method, scale)
    if fresh is not None:
        score = score.masked_fill(~fresh, float("-inf"))
    chosen, index, counters = choose_anchors(score, counters, method.anchor_ratio)
    return codes_k, codes_v, chosen, index, counters


def ring_attention(q, ring_k, ring_v, slot, exact_start, valid, out_coded, lse_coded, scale: float, softcap: float,
                   window: int, bound: bool):
    """A decode query's attention over the exact ring merged with its attention over the codes.

    q (B, Hq, 1, D) at slot ((1,) int64); ring_k (B, Hkv, R, D), ring_v (B, Hkv, R, Dv) (finite everywhere), slot j
    at row j % R; the query sees the rows whose slot is exact (>= exact_start, (1,) int64), valid (valid (B, >= slot
    + 1) bool) and within the sliding window (0: none); out_coded (B, Hq, 1, Dv) and lse_coded (B, Hq, 1) fp32: the
    coded part's output and log-sum-exp (-inf: it saw nothing); bound: the Anchor Score needs the output (|v - o|).
    Returns (output (B, Hq, 1, Dv) in q's dtype, the ring rows' column statistics (4, B, Hkv, R) fp32)."""
    ring = ring_k.shape[2]
    held = slot - (slot - torch.arange(ring, device=slot.device)) % ring            # (R,) each row's slot
    seen = (held >= exact_start) & valid.index_select(1, held.clamp_min(0))         # (B, R)
    if window:
        seen = seen & (held > slot - window)
    scores = attention_scores(q, ring_k, scale=scale, softcap=softcap)                 # (B, Hq, 1, R)
    visible = seen[:, None, None, :].expand_as(scores)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logaddexp(lse_coded, torch.logsumexp(scores, dim=-1))     # finite: the query sees its own token
    probs = torch.exp(scores - lse[..., None])                             # 0 where hidden
    group = q.shape[1] // ring_v.shape[1]
    out = (out_coded.float() * torch.exp(lse_coded - lse)[..., None]
           + probs @ ring_v.float().repeat_interleave(group, dim=1)).to(q.dtype)
    return out, column_statistics(probs, visible, q, ring_v, out if bound else None, ring_v.shape[1])


def fused(fn):
    """fn compiled by Inductor (whole graph, static shapes) when its first argument is a CUDA tensor, else fn. The
    compiled form is made at the first CUDA call (torch.compile imports Dynamo, which importing kvpass does not)."""
    compiled = None

    @functools.wraps(fn)
    def run(first, *args, **kwargs):
        nonlocal compiled
        if not first.is_cuda:
            return fn(first, *args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        return compiled(first, *args, **kwargs)

    return run


fused_finalize_tokens = fused(finalize_tokens)
fused_ring_attention = fused(ring_attention)
