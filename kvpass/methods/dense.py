"""Dense method: exact attention over K/V kept as tensors (model dtype or a chosen storage dtype)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels_dispatch
from ..config import Dense
from .base import AttentionSpec, StaticStore, static_capacity


_CAUSAL_CHECK_ROWS = 4096  # rows of the mask compared at a time: bounds the comparison's memory at long prompts


def is_plain_causal(mask: torch.Tensor) -> bool:
    """Whether a bool mask (Bm, Hm, L, L) (True = attend) is exactly the causal one: every query sees itself and
    the keys before it, nothing else (no padding, no window). One device sync."""
    L = mask.shape[-1]
    if mask.dtype != torch.bool or mask.shape[-2] != L:
        return False
    keys = torch.arange(L, device=mask.device)
    differs = torch.zeros((), dtype=torch.bool, device=mask.device)
    for start in range(0, L, _CAUSAL_CHECK_ROWS):
        block = mask[..., start : start + _CAUSAL_CHECK_ROWS, :]
        queries = torch.arange(start, start + block.shape[-2], device=mask.device)
        differs |= (block != (keys <= queries[:, None])).any()
    return not bool(differs)


class DenseStore(StaticStore):
    method: Dense

    def __init__(self, method: Dense, layer: int, capacity: int | None = None):
        super().__init__(method, layer, capacity)
        self._k: torch.Tensor | None = None  # (B, Hkv, capacity, D)
        self._v: torch.Tensor | None = None  # (B, Hkv, capacity, Dv)

    @property
    def batch(self) -> int:
        return self._k.shape[0]

    @property
    def capacity(self) -> int:
        return self._k.shape[2]

    @property
    def device(self) -> torch.device:
        return self._k.device

    def _allocate(self, k: torch.Tensor, v: torch.Tensor, needed: int) -> bool:
        """Buffers for `needed` slots shaped like k, v (B, Hkv, *, D|Dv); True if they were reallocated."""
        same = self._k is not None and (k.shape[0], k.shape[1], k.shape[3], v.shape[3], k.device) == (
            self._k.shape[0], self._k.shape[1], self._k.shape[3], self._v.shape[3], self._k.device)
        capacity = static_capacity(needed, self._length, self.capacity if same else None, self.capacity_hint)
        if capacity is None:
            return False
        dtype = self.method.torch_dtype or k.dtype
        B, H, _, D = k.shape
        new_k = torch.empty(B, H, capacity, D, dtype=dtype, device=k.device)
        new_v = torch.empty(B, H, capacity, v.shape[-1], dtype=dtype, device=v.device)
        if self._length:
            new_k[:, :, : self._length] = self._k[:, :, : self._length]
            new_v[:, :, : self._length] = self._v[:, :, : self._length]
        self._k, self._v = new_k, new_v
        return True

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self._length and (k.shape[0], k.shape[1], k.shape[3]) != (self._k.shape[0], self._k.shape[1], self._k.shape[3]):
            raise ValueError(f"layer {self.layer}: new keys of shape {tuple(k.shape)} do not fit the stored "
                             f"(batch, kv heads, head dim) = {(self._k.shape[0], self._k.shape[1], self._k.shape[3])}; "
                             f"start a new sequence (kvpass.reset(model) or a new kvpass cache) for a new batch")
        L = k.shape[2]
        self._allocate(k, v, self._length + L)
        # Copy, never alias: the caller's tensors may be CUDA-graph or Inductor buffers reused next step.
        self._k[:, :, self._length : self._length + L] = k
        self._v[:, :, self._length : self._length + L] = v
        self._length += L

    def attend(self, q, mask, is_causal, spec: AttentionSpec):
        k, v = self.materialize()
        if q.is_cuda and q.shape[2] == self._length and spec.softcap == 0 and (mask is not None or not spec.window):
            # The whole store is this prompt: dense adds nothing to its attention, so torch's fastest kernel
            # (flash without a mask; past = 0, so its top-left causal alignment is the right one) does it.
            if mask is not None and is_plain_causal(mask):
                mask, is_causal = None, True  # HF materializes it under torch.compile; flash needs it gone
            return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                                  is_causal=is_causal and mask is None, scale=spec.scale,
                                                  enable_gqa=q.shape[1] != k.shape[1])
        return kernels_dispatch.attention(q, k, v, mask=mask, is_causal=is_causal, scale=spec.scale,
                                          softcap=spec.softcap, window=spec.window)

    # -- captured decode ----------------------------------------------------------------------------------
    def _grow(self, length: int) -> bool:
        return self._allocate(self._k[:, :, :0], self._v[:, :, :0], length)

    def decode(self, q, k, v, spec: AttentionSpec, slot, valid):
        # The slot is a device tensor, so replays move it; the kernel writes k, v there in the same launch.
        return kernels_dispatch.attention(q, self._k, self._v, mask=None, is_causal=True, scale=spec.scale,
                                          softcap=spec.softcap, window=spec.window, valid=valid[:, : self.capacity],
                                          q_start=slot, new_k=k, new_v=v)

    def materialize(self):
        if self._k is None:
            raise RuntimeError(f"layer {self.layer}: the store is empty")
        return self._k[:, :, : self._length], self._v[:, :, : self._length]

    def nbytes(self):
        """Bytes of the tokens held (not of the buffers' spare capacity: `allocated_nbytes`)."""
        if self._k is None:
            return {"keys": 0, "values": 0}
        per_slot = self._k.nbytes // self.capacity, self._v.nbytes // self.capacity
        return {"keys": per_slot[0] * self._length, "values": per_slot[1] * self._length}

    def allocated_nbytes(self) -> int:
        return 0 if self._k is None else self._k.nbytes + self._v.nbytes
