"""RetroInfer's tripartite decode attention over a clustered KV cache: Triton kernels and fp32
PyTorch references (centroid scoring, exact attention over clusters (directly or through pages), centroid estimation, and the
log-sum-exp merge of their partials; see ``reference.py``).

The Triton functions (``kernel.py``) are imported lazily, as in :mod:`kvpass.kernels.attention`:
importing this package (and using the references) does not import triton (a Linux-only
dependency, and the CPU interpreter needs ``TRITON_INTERPRET=1`` set before its first import).
"""
from .reference import (
    choose_num_splits,
    cluster_attention_reference,
    estimate_clusters_reference,
    merge_partials_reference,
    score_clusters_reference,
    split_bounds,
)

_KERNELS = ("cluster_attention", "estimate_clusters", "merge_partials", "score_clusters")

__all__ = ["choose_num_splits", "cluster_attention", "cluster_attention_reference", "estimate_clusters",
           "estimate_clusters_reference", "merge_partials", "merge_partials_reference", "score_clusters",
           "score_clusters_reference", "split_bounds"]


def __getattr__(name):
    if name in _KERNELS:
        from . import kernel

        return getattr(kernel, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
