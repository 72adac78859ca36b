"""Dense method: exact attention over K/V kept as tensors (model dtype or a chosen storage dtype)."""
from __future__ import annotations

import torch

from .. import kernels_dispatch
from ..config import Dense
from .base import AttentionSpec, LayerStore

# Capacity grows geometrically so a decode of n tokens costs O(log n) reallocations, not n copies.
_MIN_CAPACITY = 256


class DenseStore(LayerStore):
    method: Dense

    def __init__(self, method: Dense, layer: int, capacity: int | None = None):
        super().__init__(method, layer, capacity)
        self._k: torch.Tensor | None = None  # (B, Hkv, capacity, D)
        self._v: torch.Tensor | None = None  # (B, Hkv, capacity, Dv)
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    def _reserve(self, k: torch.Tensor, v: torch.Tensor, needed: int) -> None:
        if self._k is not None and needed <= self._k.shape[2]:
            return
        dtype = self.method.torch_dtype or k.dtype
        if self._k is None:  # first allocation: the whole expected sequence, so decode never reallocates
            capacity = max(_MIN_CAPACITY, needed, self.capacity_hint or 0)
        else:
            capacity = max(needed, 2 * self._k.shape[2])
        B, H, _, D = k.shape
        new_k = torch.empty(B, H, capacity, D, dtype=dtype, device=k.device)
        new_v = torch.empty(B, H, capacity, v.shape[-1], dtype=dtype, device=v.device)
        if self._length:
            new_k[:, :, : self._length] = self._k[:, :, : self._length]
            new_v[:, :, : self._length] = self._v[:, :, : self._length]
        self._k, self._v = new_k, new_v

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self._k is not None and (k.shape[0], k.shape[1], k.shape[3]) != (self._k.shape[0], self._k.shape[1], self._k.shape[3]):
            raise ValueError(f"layer {self.layer}: new keys of shape {tuple(k.shape)} do not fit the stored "
                             f"(batch, kv heads, head dim) = {(self._k.shape[0], self._k.shape[1], self._k.shape[3])}; "
                             f"start a new sequence (kvpass.reset(model) or a new kvpass cache) for a new batch")
        L = k.shape[2]
        self._reserve(k, v, self._length + L)
        # Copy, never alias: the caller's tensors may be CUDA-graph or Inductor buffers reused next step.
        self._k[:, :, self._length : self._length + L] = k
        self._v[:, :, self._length : self._length + L] = v
        self._length += L

    def attend(self, q, mask, is_causal, spec: AttentionSpec):
        k, v = self.materialize()
        return kernels_dispatch.attention(q, k, v, mask=mask, is_causal=is_causal, scale=spec.scale,
                                          softcap=spec.softcap, window=spec.window)

    def materialize(self):
        if self._k is None:
            raise RuntimeError(f"layer {self.layer}: the store is empty")
        return self._k[:, :, : self._length], self._v[:, :, : self._length]

    def nbytes(self):
        if self._k is None:
            return {"keys": 0, "values": 0}
        return {"keys": self._k.nbytes, "values": self._v.nbytes}
