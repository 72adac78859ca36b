"""Attention (KV-cache) and FFN methods: one small file each, over the interfaces in `base.py`; `registry.py`
says which store serves which method."""
from .base import LayerStore
from .ffn import dense_ffn
from .registry import OneShot, captured_decode_supported, make_store

__all__ = ["LayerStore", "OneShot", "captured_decode_supported", "make_store", "dense_ffn"]
