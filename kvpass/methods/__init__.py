"""Attention (KV-cache) and FFN methods: one small file each, over the interfaces in `base.py`."""
from .base import LayerStore, OneShot, captured_decode_supported, make_store
from .ffn import dense_ffn

__all__ = ["LayerStore", "OneShot", "captured_decode_supported", "make_store", "dense_ffn"]
