"""The wave index's cluster selection: per (batch, kv head), the highest-scoring clusters for exact
attention and the next ones for centroid estimation. A Triton radix select in three histogram levels
spread over many programs (``kernel.py``) and its plain PyTorch reference (``reference.py``, which also defines
the ranking key both share).

``select_clusters`` and ``new_histogram`` (Triton) are imported lazily, as in :mod:`kvpass.kernels.attention`: importing
this package does not import triton (a Linux-only dependency, and the CPU interpreter needs
``TRITON_INTERPRET=1`` set before its first import).
"""
from .reference import rank_keys, select_clusters_reference

__all__ = ["new_histogram", "rank_keys", "select_clusters", "select_clusters_reference"]


def __getattr__(name):
    if name in ("new_histogram", "select_clusters"):
        from . import kernel

        return getattr(kernel, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
