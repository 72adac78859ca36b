"""Picks the implementation of a kernel family: Triton on CUDA (or anywhere with KVPASS_KERNELS=triton,
which under TRITON_INTERPRET=1 runs the kernels on the CPU), the plain PyTorch reference otherwise."""
from __future__ import annotations

import os

import torch


def use_triton(t: torch.Tensor) -> bool:
    choice = os.environ.get("KVPASS_KERNELS", "auto")
    if choice not in ("auto", "triton", "reference"):
        raise ValueError(f"KVPASS_KERNELS={choice!r}; use auto, triton or reference")
    return choice == "triton" or (choice == "auto" and t.is_cuda)


def attention(q, k, v, *, mask, is_causal, scale, softcap, window):
    """q: (B, Hq, Lq, D) are the last Lq of the S keys in k, v: (B, Hkv, S, D|Dv); mask: None or bool
    (Bm, Hm, Lq, S) over all keys. See kernels/attention for the full contract."""
    from .kernels import attention as family

    fn = family.attention_over_store if use_triton(q) else family.attention_over_store_reference
    return fn(q, k, v, scale=scale, causal=is_causal, window=window, softcap=softcap, mask=mask)


def coded_attention(q, kv, *, mask, is_causal, scale, softcap, window, return_lse=False):
    """Attention of q (B, Hq, Lq, D), the last Lq stored slots, over a product-quantized store
    (kvpass.kernels.coded_attention.CodedKV); with return_lse also the (B, Hq, Lq) fp32 log-sum-exp."""
    from .kernels import coded_attention as family

    fn = family.attention_over_codes if use_triton(q) else family.attention_over_codes_reference
    return fn(q, kv, scale=scale, causal=is_causal, window=window, softcap=softcap, mask=mask, return_lse=return_lse)


def anchor_scores(q, k, v, lse, o, *, q_start, key_start, mask, is_causal, scale, softcap, window):
    """(4, B, Hkv, Lk) fp32 column statistics of the attention of q over the exact keys k, v at slots
    key_start.. (see kvpass.kernels.anchor_scores)."""
    from .kernels import anchor_scores as family

    fn = family.anchor_scores if use_triton(q) else family.anchor_scores_reference
    return fn(q, k, v, lse, o, q_start=q_start, key_start=key_start, scale=scale, causal=is_causal, window=window,
              softcap=softcap, mask=mask)
