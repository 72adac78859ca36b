"""The interface between the attention op and a KV-cache method.

A `LayerStore` holds one layer's cache for one batch of sequences in the method's own representation
(dense tensors, quantized codes, a clustered index, ...). The attention op calls, per step:

    store.append(k, v)                 # the new tokens' keys/values, (B, Hkv, L, D) / (B, Hkv, L, Dv)
    out = store.attend(q, mask, ...)   # queries of those new tokens over everything stored

so the compiled graph only ever carries the new tokens, and the past stays in the store. `materialize`
gives the reference view (dense K/V of everything stored) used when a graph could not be fused.

A store that meets the captured-decode contract (`captured_decode = True`) also serves the decode engine
(kvpass/engine.py), which replays each decode step from a CUDA graph:

    store.reserve(length)               # host, before a step: room for `length` tokens (may reallocate)
    out = store.decode(q, k, v, ...)    # inside the step: fixed shapes, static buffers, no host sync
    store.advance(1)                    # host, after the step (or its replay)
    store.reset()                       # a new sequence: empty, same buffers

Work that does not fit a fixed-shape step (e.g. clustering a full segment) belongs outside the graph, at step
counts the host knows. `StaticStore` holds the host-side half of the contract (length, reset, reserve, advance)
for stores whose buffers grow only when a sequence outgrows them.
"""
from __future__ import annotations

import dataclasses

import torch

from ..config import AttentionMethod


# Static stores grow geometrically, so a decode of n tokens costs O(log n) reallocations, not n copies.
MIN_CAPACITY = 256


def static_capacity(needed: int, held: int, capacity: int | None, hint: int | None) -> int | None:
    """The capacity a static store (one meeting the captured-decode contract) allocates for `needed` slots, or None
    if its current `capacity` (None: no buffers of the right shape) will do. held: tokens it holds now; hint: tokens
    the sequence is expected to reach. A sequence's first append also honours the hint: growing before decode starts,
    not in the middle of it, keeps the decode engine's recordings valid for the whole generation."""
    hinted = 0 if held else (hint or 0)
    if capacity is not None and max(needed, hinted) <= capacity:
        return None
    if capacity is None or hinted > capacity:  # the whole expected sequence, so decode never grows
        return max(MIN_CAPACITY, needed, hint or 0)
    return max(needed, 2 * capacity)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Per-site constants recovered from the graph (all plain Python values).

    scale: softmax scale; softcap: tanh soft-capping of the logits (0 = off); window: sliding window in
    tokens (0 = full attention; only used when no mask is given, HF masks already carry it).
    """

    scale: float
    softcap: float = 0.0
    window: int = 0


class LayerStore:
    """One layer's KV cache in a method's representation. Subclasses implement the four methods."""

    # True for stores that meet the captured-decode contract (see the module docstring) whatever their options.
    captured_decode = False
    # True for methods whose representation depends on the queries (AnTKV's anchors): they must see attend()
    # calls, so the unfused cache path (store + materialize, HF attends) cannot give their semantics.
    needs_queries = False

    def __init__(self, method: AttentionMethod, layer: int, capacity: int | None = None):
        self.method = method
        self.layer = layer
        self.capacity_hint = capacity  # tokens the sequence is expected to reach (None: unknown)
        # False for a one-shot store (dropped after one call): methods skip work that only serves later steps.
        self.persistent = True

    @classmethod
    def supports_captured_decode(cls, method: AttentionMethod) -> bool:
        """Whether this store, configured by `method`, meets the captured-decode contract."""
        return cls.captured_decode

    @property
    def length(self) -> int:
        """Slots used (the same for every row of the batch; padding is marked by the caller's masks)."""
        raise NotImplementedError

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        raise NotImplementedError

    def attend(self, q: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, spec: AttentionSpec) -> torch.Tensor:
        """q: (B, Hq, Lq, D) for the last Lq stored slots. mask: None or bool (Bm, Hm, Lq, length), True = attend.

        Without a mask, query i sees every past slot and the new slots up to itself when `is_causal`
        (bottom-right aligned), restricted to the last `spec.window` slots when a window is set.
        Returns (B, Hq, Lq, Dv) in q's dtype; a row that sees nothing is 0.
        """
        raise NotImplementedError

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense (B, Hkv, length, D) keys and values as the method represents them (the reference view)."""
        raise NotImplementedError

    def nbytes(self) -> dict[str, int]:
        """Bytes held, by component (e.g. {"keys": ..., "values": ...})."""
        raise NotImplementedError

    def allocated_nbytes(self) -> int:
        """Bytes of device memory the store has allocated (held plus spare capacity)."""
        return sum(self.nbytes().values())

    def stats(self) -> dict:
        """Per-layer counters for kvpass.report (empty for methods without any)."""
        return {}

    def settle(self) -> None:
        """Host: put tokens stored without attention (a benchmark's random fill) in the form a decode step expects
        (e.g. compressed); called between the chunks of a bulk load. Nothing to do for most methods."""

    def reset(self) -> bool:
        """Empty the store for a new sequence, keeping its buffers (their addresses are what a recorded decode
        graph reads). Returns False if this store is not reusable: the runtime then drops it."""
        return False

    # -- captured decode (only stores with captured_decode = True) ------------------------------------------
    def reserve(self, length: int) -> bool:
        """Make room for `length` tokens per row; True if a buffer was reallocated (recorded graphs go stale)."""
        raise NotImplementedError

    def decode(self, q, k, v, spec: AttentionSpec, slot: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """One decode step, capturable: store k, v (B, Hkv, 1, D|Dv) at `slot` ((1,) int64 on the device, the same
        for every row) and attend q (B, Hq, 1, D) over the slots [0, slot] that `valid` ((B, >= capacity) bool)
        marks, causal, windowed and soft-capped by spec. Returns (B, Hq, 1, Dv). Changes no host state."""
        raise NotImplementedError

    def advance(self, count: int) -> None:
        """Host bookkeeping after `count` decode steps ran on the device."""
        raise NotImplementedError


class StaticStore(LayerStore):
    """A store meeting the captured-decode contract whose slots are counted on the host (`_length`) over buffers
    of `capacity` slots that keep their addresses until they must grow. Subclasses implement `capacity` and
    `_grow(length)`, plus the LayerStore methods."""

    captured_decode = True

    def __init__(self, method: AttentionMethod, layer: int, capacity: int | None = None):
        super().__init__(method, layer, capacity)
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    @property
    def capacity(self) -> int:
        raise NotImplementedError

    def _grow(self, length: int) -> bool:
        """Reallocate the buffers for at least `length` slots, keeping what they hold; True if reallocated."""
        raise NotImplementedError

    def reset(self) -> bool:
        self._length = 0
        return True

    def reserve(self, length: int) -> bool:
        if length <= self.capacity:  # every decode step asks: answer without building views
            return False
        return self._grow(length)

    def advance(self, count: int) -> None:
        self._length += count
