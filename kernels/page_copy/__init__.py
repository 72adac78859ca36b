"""The wave buffer's page copy: move pages of an offloaded index's K/V into slots of the GPU pool and record the
slots in the page table. A Triton kernel that reads the pages (and the list of moves) straight from page-locked
CPU memory (``kernel.py``) and its plain PyTorch reference (``reference.py``).

``copy_pages`` (Triton) is imported lazily, as in :mod:`kvpass.kernels.attention`: importing this package does not
import triton.
"""
from .reference import check_copy_inputs, copy_pages_reference

__all__ = ["check_copy_inputs", "copy_pages", "copy_pages_reference"]


def __getattr__(name):
    if name == "copy_pages":
        from . import kernel

        return kernel.copy_pages
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
