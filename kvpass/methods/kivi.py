"""KIVI method: a scalar KV-quantization baseline in the style of KIVI (arXiv 2402.02750).

Keys are quantized per channel over groups of `group` consecutive tokens (key outliers sit in a few fixed
channels, so a per-channel step keeps them from coarsening every other channel), values per token over the
head dim. Both use asymmetric min/max quantization: x ~ code * scale + zero, with zero the minimum of the slice
and scale = (max - min) / (2**bits - 1). The newest `residual` tokens stay exact (`KIVIStore` says which).

Storage choices of this baseline:
- codes are one uint8 per value at every bit width: 2- and 4-bit codes are NOT bit-packed, so the codes take
  8 bits per value in memory and in `nbytes()`; a packed layout would hold bits/8 of that;
- scales and zero-points are kept in the model dtype (the dtype of the appended keys/values): 2 bytes each for
  fp16/bf16 models, as KIVI's fp16 scales, without fp16's overflow under a bf16 model. The arithmetic is fp32,
  and codes are computed against the scale and zero as stored, so decoding stays within half a step of them.
"""
from __future__ import annotations

import torch

from .. import kernels_dispatch
from ..config import KIVI
from .base import AttentionSpec, LayerStore

# Quantized parts grow geometrically (like DenseStore) so a decode of n tokens costs O(log n) reallocations.
_MIN_CAPACITY = 256


# -- quantizers ----------------------------------------------------------------------------------------------------
def _quantize_min_max(x: torch.Tensor, bits: int, dim: int):
    """Asymmetric min/max quantization of x over `dim`, one scale and zero per slice along it.

    Returns codes (x's shape, uint8 in [0, 2**bits - 1]) and scale, zero (x's shape with `dim` of size 1, x's dtype).
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r}: codes are uint8, so 1 to 8 bits")
    levels = (1 << bits) - 1
    xf = x.float()
    lo, hi = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    scale, zero = ((hi - lo) / levels).to(x.dtype), lo.to(x.dtype)
    # A constant slice (max == min) has scale 0: dividing by 1 instead gives code 0, which decodes to zero == x.
    step = torch.where(scale > 0, scale.float(), 1.0)
    codes = torch.round((xf - zero.float()) / step).clamp_(0, levels).to(torch.uint8)
    return codes, scale, zero


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """codes * scale + zero (scale and zero broadcast over codes), in fp32, rounded once to the scale's dtype."""
    return (codes.float() * scale.float() + zero.float()).to(scale.dtype)


def quantize_per_channel(x: torch.Tensor, bits: int, group: int):
    """Key quantization: one scale and zero-point per (batch, head, group of `group` tokens, channel).

    x: (B, H, L, D) with L a multiple of `group`. Returns codes (B, H, L, D) uint8 and scale, zero
    (B, H, L // group, D) in x's dtype.
    """
    B, H, L, D = x.shape
    if L % group:
        raise ValueError(f"{L} tokens do not split into groups of {group}")
    codes, scale, zero = _quantize_min_max(x.reshape(B, H, L // group, group, D), bits, dim=3)
    return codes.reshape(B, H, L, D), scale.squeeze(3), zero.squeeze(3)


def dequantize_per_channel(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of `quantize_per_channel`: codes (B, H, L, D), scale and zero (B, H, L // group, D) -> (B, H, L, D)
    in the scale's dtype."""
    B, H, L, D = codes.shape
    grouped = codes.reshape(B, H, L // group, group, D)
    return _dequantize(grouped, scale.unsqueeze(3), zero.unsqueeze(3)).reshape(B, H, L, D)


def quantize_per_token(x: torch.Tensor, bits: int):
    """Value quantization: one scale and zero-point per (batch, head, token), over the head dim.

    x: (B, H, L, D). Returns codes (B, H, L, D) uint8 and scale, zero (B, H, L, 1) in x's dtype.
    """
    return _quantize_min_max(x, bits, dim=3)


def dequantize_per_token(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_per_token`: codes (B, H, L, D), scale and zero (B, H, L, 1) -> (B, H, L, D) in the
    scale's dtype."""
    return _dequantize(codes, scale, zero)


# -- storage -------------------------------------------------------------------------------------------------------
class _Growing:
    """A tensor (B, H, capacity, ...) filled along dim 2 (tokens, or key groups); capacity doubles when full."""

    def __init__(self, min_capacity: int):
        self._min_capacity = min_capacity  # the first allocation: the whole expected sequence when it is known
        self._data: torch.Tensor | None = None
        self.length = 0

    def append(self, x: torch.Tensor) -> None:
        """Copies x (B, H, n, ...) behind the rows held; the first call allocates, even for n == 0."""
        needed = self.length + x.shape[2]
        if self._data is None or needed > self._data.shape[2]:
            self._grow(x, needed)
        self._data[:, :, self.length : needed] = x
        self.length = needed

    def _grow(self, x: torch.Tensor, needed: int) -> None:
        capacity = max(self._min_capacity if self._data is None else 2 * self._data.shape[2], needed)
        data = x.new_empty(x.shape[:2] + (capacity,) + x.shape[3:])
        if self.length:
            data[:, :, : self.length] = self._data[:, :, : self.length]
        self._data = data

    def view(self) -> torch.Tensor:
        return self._data[:, :, : self.length]

    def nbytes(self) -> int:
        return 0 if self._data is None else self._data.nbytes


class _Quantized:
    """Quantized tokens: codes (B, H, tokens, D) uint8 with their scale and zero rows (B, H, rows, D or 1)."""

    def __init__(self, tokens: int, rows: int):
        self.codes, self.scale, self.zero = _Growing(tokens), _Growing(rows), _Growing(rows)

    def append(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self.codes.append(codes)
        self.scale.append(scale)
        self.zero.append(zero)

    def views(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.codes.view(), self.scale.view(), self.zero.view()


def _shift(tail: torch.Tensor, held: int, new: torch.Tensor, keep: int) -> torch.Tensor:
    """Puts `new` behind the `held` exact tokens of `tail`, keeps the newest `keep` of them in `tail` and returns the
    older ones, which leave the exact part to be quantized.

    tail: (B, H, capacity, D) with capacity >= keep; new: (B, H, L, D); returns (B, H, held + L - keep, D) in
    tail's dtype. The copy is of held + L tokens: bounded by residual + group + L, whatever the sequence length.
    """
    tokens = torch.cat([tail[:, :, :held], new.to(tail.dtype)], dim=2)  # a copy: never alias the caller's buffers
    cut = tokens.shape[2] - keep
    tail[:, :, :keep] = tokens[:, :, cut:]
    return tokens[:, :, :cut]


class KIVIStore(LayerStore):
    """KV cache of one layer as KIVI holds it: quantized keys, quantized values and an exact tail of each.

    After every `append` (a prefill as well as a decode step) of a sequence of n tokens, with r = residual and
    g = group: values of the m = max(0, n - r) oldest tokens are quantized (per token); keys of the oldest whole
    groups among those m tokens are quantized (per channel), i.e. floor(m / g) * g tokens, so up to r + g - 1 keys
    stay exact. Each token is quantized once, from its own group or itself only, so the state depends on the
    tokens and n, not on how they were split into appends. `attend` runs over the dequantized view, so even a
    prompt attending over itself sees its older tokens quantized, as perplexity protocols require.
    """

    method: KIVI

    def __init__(self, method: KIVI, layer: int, capacity: int | None = None):
        super().__init__(method, layer, capacity)
        tokens = max(_MIN_CAPACITY, capacity or 0)
        self._keys = _Quantized(tokens, rows=-(-tokens // method.group))  # scale rows: one per group of tokens
        self._values = _Quantized(tokens, rows=tokens)  # scale rows: one per token
        self._tail_k: torch.Tensor | None = None  # (B, Hkv, r + g - 1, D): keys of tokens [quantized_keys, length)
        self._tail_v: torch.Tensor | None = None  # (B, Hkv, r, Dv): values of tokens [quantized_values, length)
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    @property
    def quantized_keys(self) -> int:
        """How many of the oldest tokens have their keys held quantized (the rest are exact)."""
        return self._keys.codes.length

    @property
    def quantized_values(self) -> int:
        """How many of the oldest tokens have their values held quantized (the rest are exact)."""
        return self._values.codes.length

    def _targets(self, n: int) -> tuple[int, int]:
        """(quantized keys, quantized values) for a sequence of n tokens: the convention in the class doc."""
        older = max(0, n - self.method.residual)
        return older - older % self.method.group, older

    def _check_fits(self, k: torch.Tensor) -> None:
        if self._tail_k is None:
            return
        held = (self._tail_k.shape[0], self._tail_k.shape[1], self._tail_k.shape[3])
        if (k.shape[0], k.shape[1], k.shape[3]) != held:
            raise ValueError(f"layer {self.layer}: new keys of shape {tuple(k.shape)} do not fit the stored "
                             f"(batch, kv heads, head dim) = {held}; start a new sequence (kvpass.reset(model) or a "
                             f"new kvpass cache) for a new batch")

    def _allocate_tails(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Exact tails sized to the most tokens the convention ever leaves exact; in the first append's dtype."""
        r, g = self.method.residual, self.method.group
        self._tail_k = k.new_empty(k.shape[0], k.shape[1], r + g - 1, k.shape[3])
        self._tail_v = v.new_empty(v.shape[0], v.shape[1], r, v.shape[3])

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k: (B, Hkv, L, D), v: (B, Hkv, L, Dv), the newest L tokens; both are copied, never kept."""
        self._check_fits(k)
        if self._tail_k is None:
            self._allocate_tails(k, v)
        n = self._length + k.shape[2]
        keys_to, values_to = self._targets(n)
        bits, group = self.method.bits, self.method.group
        leaving = _shift(self._tail_k, self._length - self.quantized_keys, k, n - keys_to)
        self._keys.append(*quantize_per_channel(leaving, bits, group))
        leaving = _shift(self._tail_v, self._length - self.quantized_values, v, n - values_to)
        self._values.append(*quantize_per_token(leaving, bits))
        self._length = n

    def attend(self, q, mask, is_causal, spec: AttentionSpec):
        k, v = self.materialize()
        return kernels_dispatch.attention(q, k, v, mask=mask, is_causal=is_causal, scale=spec.scale,
                                          softcap=spec.softcap, window=spec.window)

    def materialize(self):
        """Dense (B, Hkv, length, D|Dv) keys and values in the model dtype: the dequantized tokens, then the exact
        tail. Built afresh on every call (O(length) work and a transient dense copy, not counted by `nbytes`)."""
        if self._tail_k is None:
            raise RuntimeError(f"layer {self.layer}: the store is empty")
        keys = dequantize_per_channel(*self._keys.views(), self.method.group)
        values = dequantize_per_token(*self._values.views())
        n = self._length
        return (torch.cat([keys, self._tail_k[:, :, : n - keys.shape[2]]], dim=2),
                torch.cat([values, self._tail_v[:, :, : n - values.shape[2]]], dim=2))

    def nbytes(self):
        """Bytes allocated, by component (capacity reserved for later tokens counts, as in DenseStore):
        "codes": one uint8 per quantized value, keys and values (not bit-packed: 8 bits in memory whatever `bits`);
        "scales": the scales and zero-points of keys and values, model dtype;
        "exact": the exact tails (r + g - 1 tokens of keys and r of values), model dtype."""
        parts = (self._keys, self._values)
        return {"codes": sum(p.codes.nbytes() for p in parts),
                "scales": sum(p.scale.nbytes() + p.zero.nbytes() for p in parts),
                "exact": sum(0 if t is None else t.nbytes for t in (self._tail_k, self._tail_v))}
