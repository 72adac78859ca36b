"""Picks the implementation of a kernel family: Triton on CUDA (or anywhere with KVPASS_KERNELS=triton,
which under TRITON_INTERPRET=1 runs the kernels on the CPU), the plain PyTorch reference otherwise."""
from __future__ import annotations

import os

import torch
from torch._subclasses.fake_tensor import is_fake


def use_triton(t: torch.Tensor) -> bool:
    choice = os.environ.get("KVPASS_KERNELS", "auto")
    if choice not in ("auto", "triton", "reference"):
        raise ValueError(f"KVPASS_KERNELS={choice!r}; use auto, triton or reference")
    return choice == "triton" or (choice == "auto" and t.is_cuda)


def attention(q, k, v, *, mask, is_causal, scale, softcap, window, valid=None, return_lse=False, q_start=None,
              new_k=None, new_v=None):
    """q: (B, Hq, Lq, D) are the last Lq of the S keys in k, v: (B, Hkv, S, D|Dv), or the Lq keys from q_start
    (an int, or a (1,) int64 device tensor read by the kernel); mask: None or bool (Bm, Hm, Lq, S) over all keys;
    valid: None or (B, S) bool (False: a padding slot). With return_lse also the (B, Hq, Lq) fp32 log-sum-exp.
    new_k (B, Hkv, 1, D), new_v (B, Hkv, 1, Dv): a decode query's own key and value, written into k, v at q_start
    by the same call. See kernels/attention for the full contract."""
    from .kernels import attention as family

    fn = family.attention_over_store if use_triton(q) else family.attention_over_store_reference
    return fn(q, k, v, valid, q_start, scale=scale, causal=is_causal, window=window, softcap=softcap, mask=mask,
              return_lse=return_lse, new_k=new_k, new_v=new_v)


def coded_attention(q, kv, *, mask, is_causal, scale, softcap, window, return_lse=False, valid=None, q_start=None):
    """Attention of q (B, Hq, Lq, D), the last Lq stored slots or those from q_start (an int, or a (1,) int64
    device tensor read by the kernel), over a product-quantized store (kvpass.kernels.coded_attention.CodedKV);
    valid: None or (B, S) bool (False: a slot not to read); with return_lse also the (B, Hq, Lq) fp32
    log-sum-exp."""
    from .kernels import coded_attention as family

    fn = family.attention_over_codes if use_triton(q) else family.attention_over_codes_reference
    return fn(q, kv, valid, q_start, scale=scale, causal=is_causal, window=window, softcap=softcap, mask=mask,
              return_lse=return_lse)


def anchor_scores(q, k, v, lse, o, *, q_start, key_start, mask, is_causal, scale, softcap, window, span=0):
    """(4, B, Hkv, Lk) fp32 column statistics of the attention of q over the exact keys k, v at slots
    key_start.. (see kvpass.kernels.anchor_scores); span > 0: each key scored by the span queries from its slot
    on only."""
    from .kernels import anchor_scores as family

    fn = family.anchor_scores if use_triton(q) else family.anchor_scores_reference
    return fn(q, k, v, lse, o, q_start=q_start, key_start=key_start, scale=scale, causal=is_causal, window=window,
              softcap=softcap, mask=mask, span=span)


def kmeans(x, count, clusters, iterations, metric):
    """Lloyd's k-means of x (G, N, D) with count[g] valid rows per group: (labels (G, N) int32, centroids
    (G, clusters, D) fp32, sizes (G, clusters) int32); see kvpass.kernels.kmeans."""
    from .kernels import kmeans as family

    steps = (family.assign, family.update) if use_triton(x) else (family.assign_reference, family.update_reference)
    return family.kmeans(x, count, clusters, iterations, metric, assign=steps[0], update=steps[1])


def cluster_sums(x, labels, clusters):
    """Per-cluster sums (G, clusters, D) fp32 and sizes (G, clusters) int32 of the rows of x (G, N, D) by
    labels (G, N) (-1: skipped); deterministic on every device (kvpass.kernels.kmeans update step)."""
    from .kernels import kmeans as family

    return (family.update if use_triton(x) else family.update_reference)(x, labels, clusters)


def _wave(name: str, like: torch.Tensor):
    from .kernels import wave_attention as family

    return getattr(family, name if use_triton(like) else name + "_reference")


def score_clusters(q, centroids, clusters, *, scale, softcap, select_sizes=None):
    """(logits (B, Hq, C) fp32, scores (B, Hkv, C) fp32, top_level) of the decode queries q (B, Hq, 1, D) against
    the first `clusters` centroids (B, Hkv, Ccap, D); see kvpass.kernels.wave_attention. With select_sizes (the
    clusters' sizes) the Triton kernels also count the cluster selection's first level: top_level is then that
    histogram, for select_clusters; otherwise (and on the reference path) it is None."""
    from .kernels import wave_attention as family

    if not use_triton(q):
        return (*family.score_clusters_reference(q, centroids, clusters, scale=scale, softcap=softcap), None)
    out = family.score_clusters(q, centroids, clusters, scale=scale, softcap=softcap, select_sizes=select_sizes)
    return out if select_sizes is not None else (*out, None)


def select_clusters(scores, sizes, clusters, retrieved, estimated, counts, top_level=None):
    """Per row of scores (B, Hkv, >= clusters), the `retrieved` best clusters then the next `estimated`, each part
    in cluster order: (B, Hkv, retrieved + estimated) int32; adds their sizes to counts (2,) int64 if given;
    top_level: score_clusters' histogram for these scores and sizes, or None. See kvpass.kernels.cluster_select."""
    from .kernels import cluster_select as family

    if use_triton(scores):
        return family.select_clusters(scores, sizes, clusters, retrieved, estimated, counts, top_level)
    return family.select_clusters_reference(scores, sizes, clusters, retrieved, estimated, counts)


def cluster_attention(q, keys, values, starts, sizes, selected, *, page_table, scale, softcap):
    """Exact attention of q (B, Hq, 1, D) over the tokens of the selected clusters (B, Hkv, R), read directly
    from cluster-contiguous keys/values or through page_table from a page pool: split partials (out (S, B, Hq,
    Dv), lse (S, B, Hq)) fp32; see kvpass.kernels.wave_attention."""
    return _wave("cluster_attention", q)(q, keys, values, starts, sizes, selected, page_table=page_table,
                                         scale=scale, softcap=softcap)


def estimate_clusters(logits, value_means, sizes, selected):
    """Centroid estimation over the selected clusters (B, Hkv, E): split partials (out (S, B, Hq, Dv), lse
    (S, B, Hq)) fp32."""
    return _wave("estimate_clusters", logits)(logits, value_means, sizes, selected)


def merge_partials(outs, lses, dtype):
    """Combine partials outs[i] (S_i, B, Hq, Dv), lses[i] (S_i, B, Hq) by log-sum-exp into (B, Hq, 1, Dv)."""
    return _wave("merge_partials", lses[0])(outs, lses, dtype)


def decode_sized(x: torch.Tensor) -> bool:
    """Whether x's call takes the sparse decode kernels (sparse_ffn, sparse_linear; else the op's dense path): at
    most MAX_DECODE_TOKENS tokens on the Triton path. Not while a graph is traced on the CPU (KVPASS_KERNELS=triton):
    the interpreter needs real data, and Inductor launches Triton kernels on GPUs only, so a traced CPU graph takes
    the dense thresholded path (same zeros)."""
    if not use_triton(x) or (not x.is_cuda and is_fake(x)):
        return False
    from .kernels.sparse_ffn import MAX_DECODE_TOKENS

    return x.numel() // x.shape[-1] <= MAX_DECODE_TOKENS


def sparse_ffn(x, w_up, b_up, w_down, b_down, w_gate, b_gate, activation, thresholds, w_down_t):
    """The thresholded FFN of a decode-sized x (..., H) (decode_sized(x)) by the sparse kernel, which skips the weight
    rows of zeroed channels (kvpass.methods.ffn.dense_ffn has the contract; prompts run that dense path,
    kvpass.kernels.sparse_ffn says why); w_down_t: None or the down weight as a contiguous (I, Ho) copy
    (kvpass.methods.chess.ChessPlan.input_major; None reads w_down's transpose, strided and slower)."""
    from .kernels.sparse_ffn import sparse_ffn

    out = sparse_ffn(x.reshape(-1, x.shape[-1]), w_up, b_up, w_down.t() if w_down_t is None else w_down_t, b_down,
                     w_gate, b_gate, thresholds, activation)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def sparse_linear(x, weight, bias, threshold: float, w_t):
    """A decode-sized x (..., K) (decode_sized(x)) thresholded at `threshold` through weight (N, K) plus bias by the
    sparse kernel, which reads only the rows of w_t (K, N) (the contiguous input-major copy; None: weight's strided
    transpose) whose input survives (kvpass.methods.ffn.dense_sparse_linear is the dense path)."""
    from .kernels.sparse_ffn import sparse_linear as kernel

    out = kernel(x.reshape(-1, x.shape[-1]), weight.t() if w_t is None else w_t, bias, threshold)
    return out.reshape(*x.shape[:-1], out.shape[-1])
