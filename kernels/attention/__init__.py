"""Attention over a KV store: Triton kernel and fp32 PyTorch reference.

``attention_over_store`` (Triton, ``dense.py``) is imported lazily so that importing this package
(and using the reference) does not import triton: triton is only a Linux dependency, and the CPU
interpreter needs ``TRITON_INTERPRET=1`` set before triton's first import.
"""
from .reference import attention_over_store_reference

__all__ = ["attention_over_store", "attention_over_store_reference"]


def __getattr__(name):
    if name == "attention_over_store":
        from .dense import attention_over_store

        return attention_over_store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
