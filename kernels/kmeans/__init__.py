"""Segmented k-means of KV-cache keys (RetroInfer's wave index): Triton steps, fp32 PyTorch
references and the Lloyd loop that runs either.

``assign`` and ``update`` (Triton, ``kernel.py``) are imported lazily, as in
:mod:`kvpass.kernels.attention`: importing this package does not import triton (a Linux-only
dependency, and the CPU interpreter needs ``TRITON_INTERPRET=1`` set before its first import).
"""
from .loop import kmeans
from .reference import assign_reference, update_reference

__all__ = ["assign", "assign_reference", "kmeans", "update", "update_reference"]


def __getattr__(name):
    if name in ("assign", "update"):
        from . import kernel

        return getattr(kernel, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
