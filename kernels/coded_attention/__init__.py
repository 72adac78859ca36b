"""Attention over a product-quantized (vector-quantized) KV store: Triton kernel, fp32 PyTorch
reference, the store's layout (:class:`CodedKV`) and its dequantization.

``attention_over_codes`` (Triton, ``kernel.py``) is imported lazily, as in
:mod:`kvpass.kernels.attention`: importing this package does not import triton (a Linux-only
dependency, and the CPU interpreter needs ``TRITON_INTERPRET=1`` set before its first import).
"""
from .layout import CodedKV, KeyRotation, rope_rotate
from .reference import attention_over_codes_reference, dequantize

__all__ = ["CodedKV", "KeyRotation", "attention_over_codes", "attention_over_codes_reference", "dequantize",
           "rope_rotate"]


def __getattr__(name):
    if name == "attention_over_codes":
        from .kernel import attention_over_codes

        return attention_over_codes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
