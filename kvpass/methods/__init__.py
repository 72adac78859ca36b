"""Attention (KV-cache) and FFN methods: one small file each, over the interfaces in `base.py`."""
from .base import LayerStore, OneShot, make_store
from .ffn import ffn_reference

__all__ = ["LayerStore", "OneShot", "make_store", "ffn_reference"]
