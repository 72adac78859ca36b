"""Which store serves which attention method: the one module that knows every store (each store knows only
`base.py`, so the stores and their interface form no cycle).

The stores are imported when first asked for, keeping `import kvpass` light.
"""
from __future__ import annotations

import torch

from ..config import AttentionMethod
from .base import AttentionSpec, LayerStore


def _store_class(method: AttentionMethod) -> type[LayerStore]:
    from .antkv import AnTKVStore
    from .dense import DenseStore
    from .kivi import KIVIStore
    from .wave import WaveStore

    return {"antkv": AnTKVStore, "wave": WaveStore, "dense": DenseStore, "kivi": KIVIStore}[method.method]


def make_store(method: AttentionMethod, layer: int, capacity: int | None = None, calibration=None) -> LayerStore:
    """The store of `method` for one layer; calibration: the loaded kvpass.calibration.Calibration of methods that
    learn from data (AnTKV's codebooks, the wave index's pre-RoPE query moments), None for the others."""
    cls = _store_class(method)
    if method.method in ("antkv", "wave"):
        return cls(method, layer, capacity, calibration=calibration)
    return cls(method, layer, capacity)


def captured_decode_supported(method: AttentionMethod) -> bool:
    """Whether `method`'s store meets the captured-decode contract (the decode engine can drive it)."""
    return _store_class(method).supports_captured_decode(method)


class OneShot:
    """Runs a method statelessly over the k/v of one call: a fresh store, filled, attended, dropped.

    Used by graphs that carry their own past (HF DynamicCache) or none at all (a forward with no cache):
    the method's representation is still applied inside attention, as perplexity protocols require.
    """

    def __init__(self, method: AttentionMethod, calibration=None):
        self.method = method
        self.calibration = calibration

    def attend(self, q, k, v, mask, is_causal, spec: AttentionSpec, layer: int) -> torch.Tensor:
        store = make_store(self.method, layer, calibration=self.calibration)
        store.persistent = False
        store.append(k, v)
        return store.attend(q, mask, is_causal, spec)
