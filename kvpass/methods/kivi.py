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
from .base import AttentionSpec, StaticStore, static_capacity


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
def _ring_order(ring: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Ring positions of tokens [start, stop): token t lives at t mod the ring's size."""
    return (start + torch.arange(stop - start, device=ring.device)) % ring.shape[2]


def _with_exact(dense: torch.Tensor, ring: torch.Tensor, quantized, end) -> torch.Tensor:
    """dense (B, H, S, W) with the exact tokens [quantized, end) written over their slots from `ring` (B, H, R, W),
    token t at t mod R; quantized, end: ints, or (1,) int64 device tensors in a decode step. Needs S >= R, and at
    most R tokens exact.

    Fixed shapes: the last R slots before `end` are rewritten, each with its ring token if it is exact and with its
    own contents otherwise; a slot before 0 wraps to one at or past `end`, outside the tokens held."""
    size = ring.shape[2]
    tokens = end - size + torch.arange(size, device=dense.device)
    capacity = dense.shape[2]
    # An exported program's capacity is a symbolic size, which ONNX's remainder cannot divide by: make it a tensor
    # there (only there: a decode step would launch one more kernel for it).
    slots = tokens % (tokens.new_full((1,), capacity) if isinstance(capacity, torch.SymInt) else capacity)
    exact = (tokens >= quantized)[:, None]
    return dense.index_copy_(2, slots, torch.where(exact, ring[:, :, tokens % size], dense[:, :, slots]))


# The names of a KIVI store's buffers, in the order quantized_buffers (keys, then values) and exact_rings give them:
# the arguments an op over a caller-owned store takes (kvpass::static_kivi_attention) and an exported program's
# buffer names (kvpass.portable).
BUFFER_NAMES = ("key_codes", "key_scale", "key_zero", "value_codes", "value_scale", "value_zero", "ring_k", "ring_v")


def quantized_after(method: KIVI, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantized keys, quantized values) of a sequence of `end` tokens, a device tensor: the convention of
    KIVIStore's class doc (KIVIStore._targets on the host)."""
    values = (end - method.residual).clamp(min=0)
    return values - values % method.group, values


def dequantized_view(method: KIVI, buffers, quantized_keys, quantized_values, end):
    """Keys (B, H, S, D) and values (B, H, S, Dv) of a KIVI store's buffers (BUFFER_NAMES order; S slots, a multiple
    of g, at least r + g) in the model dtype: the dequantized codes, with the exact tokens before `end` over them.
    quantized_keys, quantized_values, end: ints (the host's view) or (1,) / 0-dim int64 device tensors."""
    key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, ring_k, ring_v = buffers
    keys = dequantize_per_channel(key_codes, key_scale, key_zero, method.group)
    values = dequantize_per_token(value_codes, value_scale, value_zero)
    return _with_exact(keys, ring_k, quantized_keys, end), _with_exact(values, ring_v, quantized_values, end)


def write_tokens(method: KIVI, buffers, k: torch.Tensor, v: torch.Tensor, first: torch.Tensor):
    """A KIVI store's buffers (BUFFER_NAMES order) after the tokens k (B, H, L, D), v (B, H, L, Dv) joined a
    sequence of `first` tokens (a 0-dim int64 tensor), as new tensors, in tensor operations alone: no host value
    depends on the data, so a program that holds no state (ONNX: the cache in, the cache out) traces it for any L
    and any first. The state is the convention of KIVIStore's class doc, equal to KIVIStore.append's: the tokens
    leaving the exact part are quantized from the rings' exact copies and the new tokens.

    Fixed shapes: every token of the rings and of k, v is quantized, and each row is written only where its token
    leaves the exact part (per token for values, per whole group of g for keys); the rest goes to a spare row."""
    r, g, bits = method.residual, method.group, method.bits
    key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, ring_k, ring_v = buffers
    end = first + k.shape[2]

    def exact_tokens(ring, new):
        """The ring's tokens before `first` then the new ones, (B, H, R + L, W), and their slots first - R ..."""
        size = ring.shape[2]
        slots = first - size + torch.arange(size + new.shape[2], device=new.device)
        return torch.cat([ring.index_select(2, slots[:size] % size), new.to(ring.dtype)], dim=2), slots

    exact_v, value_slots = exact_tokens(ring_v, v)
    leaving = (value_slots >= (first - r).clamp(min=0)) & (value_slots < end - r)
    value_codes, value_scale, value_zero = (_write_rows(buffer, value_slots, leaving, part) for buffer, part in
                                            zip((value_codes, value_scale, value_zero), quantize_per_token(exact_v, bits)))

    exact_k, key_slots = exact_tokens(ring_k, k)
    # Keys are quantized in whole groups: a window of slots starting on a group boundary that covers the exact
    # tokens, each slot holding its exact token (slots outside them hold a neighbour's: their groups never leave).
    start = torch.div(key_slots[0], g, rounding_mode="floor") * g
    slots = start + torch.arange((-(-exact_k.shape[2] // g) + 1) * g, device=k.device)
    window = exact_k.index_select(2, (slots - key_slots[0]).clamp(0, exact_k.shape[2] - 1))
    codes, scale, zero = quantize_per_channel(window, bits, g)
    quantized_from = torch.div((first - r).clamp(min=0), g, rounding_mode="floor") * g
    quantized_to = torch.div((end - r).clamp(min=0), g, rounding_mode="floor") * g
    groups = slots[::g]
    key_codes = _write_rows(key_codes, slots, (slots >= quantized_from) & (slots < quantized_to), codes)
    group_leaves = (groups >= quantized_from) & (groups < quantized_to)
    key_scale, key_zero = (_write_rows(buffer, groups // g, group_leaves, part)
                           for buffer, part in ((key_scale, scale), (key_zero, zero)))

    # The rings keep the last R tokens, token t at t mod R.
    ring_k, ring_v = (_write_rows(ring, at[-ring.shape[2]:] % ring.shape[2], None, tokens[:, :, -ring.shape[2]:])
                      for ring, at, tokens in ((ring_k, key_slots, exact_k), (ring_v, value_slots, exact_v)))
    return key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, ring_k, ring_v


def _write_rows(buffer: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor | None, values: torch.Tensor):
    """A copy of buffer (B, H, C, W) with values[:, :, i] at row rows[i] where keep[i] (None: everywhere, rows
    distinct): one scatter; rows not kept go to a spare row past the end, which is dropped."""
    C = buffer.shape[2]
    if keep is not None:
        buffer = torch.cat([buffer, buffer[:, :, :1]], dim=2)
        rows = torch.where(keep, rows, C)
    index = rows[None, None, :, None].expand(values.shape[0], values.shape[1], -1, values.shape[3])
    return buffer.scatter(2, index, values.to(buffer.dtype))[:, :, :C]


def quantized_buffers(batch: int, heads: int, capacity: int, key_dim: int, value_dim: int, dtype: torch.dtype,
                      device, group: int):
    """Zeroed quantized parts of `capacity` slots (a multiple of `group`): (key codes (B, H, C, D) uint8, key scale,
    key zero (B, H, C / group, D)) and (value codes (B, H, C, Dv) uint8, value scale, value zero (B, H, C, 1)), the
    scales and zeros in `dtype`."""
    def zeros(rows, width, kind=dtype):
        return torch.zeros(batch, heads, rows, width, dtype=kind, device=device)

    return ((zeros(capacity, key_dim, torch.uint8), zeros(capacity // group, key_dim), zeros(capacity // group, key_dim)),
            (zeros(capacity, value_dim, torch.uint8), zeros(capacity, 1), zeros(capacity, 1)))


def exact_rings(method: KIVI, batch: int, heads: int, key_dim: int, value_dim: int, dtype: torch.dtype, device):
    """Zeroed rings of the exact tokens: keys (B, H, r + g, D) and values (B, H, r + 1, Dv) (KIVIStore says why)."""
    r, g = method.residual, method.group
    return (torch.zeros(batch, heads, r + g, key_dim, dtype=dtype, device=device),
            torch.zeros(batch, heads, r + 1, value_dim, dtype=dtype, device=device))


def capacity_for(method: KIVI, tokens: int) -> int:
    """The slots a store needs to hold `tokens` tokens: at least r + g (the exact part's reach), a multiple of g."""
    g = method.group
    return -(-max(tokens, method.residual + g) // g) * g


def _put(buffer: torch.Tensor, index: torch.Tensor, new: torch.Tensor, condition: torch.Tensor) -> None:
    """buffer[:, :, index] = new where `condition` ((1,) bool on the device) holds, else left as it is."""
    buffer.index_copy_(2, index, torch.where(condition, new, buffer[:, :, index]))


class KIVIStore(StaticStore):
    """KV cache of one layer as KIVI holds it: quantized keys, quantized values and an exact tail of each.

    After every `append` (a prefill as well as a decode step) of a sequence of n tokens, with r = residual and
    g = group: values of the m = max(0, n - r) oldest tokens are quantized (per token); keys of the oldest whole
    groups among those m tokens are quantized (per channel), i.e. floor(m / g) * g tokens, so up to r + g - 1 keys
    stay exact. Each token is quantized once, from its own group or itself only, so the state depends on the
    tokens and n, not on how they were split into appends. `attend` runs over the dequantized view, so even a
    prompt attending over itself sees its older tokens quantized, as perplexity protocols require.

    One static layout serves both paths (`append`/`attend`, and the decode engine's captured `decode`), tokens at
    their slots; C is the capacity, a multiple of g, and the scales and zeros are in the model dtype:
    - key codes (B, Hkv, C, D) uint8, key scale and zero (B, Hkv, C / g, D): one row per group of g slots;
    - value codes (B, Hkv, C, Dv) uint8, value scale and zero (B, Hkv, C, 1);
    - exact keys in a ring (B, Hkv, r + g, D), token t at t mod (r + g), and exact values in a ring
      (B, Hkv, r + 1, Dv), token t at t mod (r + 1): one more than the most tokens the convention leaves exact, so
      a decode step stores its token before the oldest exact one is quantized.
    The buffers are zero-filled: a fixed-shape decode step reads every slot, and those past the tokens held (masked
    out) must be finite. Growth copies the quantized parts; the rings never grow.
    """

    method: KIVI

    def __init__(self, method: KIVI, layer: int, capacity: int | None = None):
        super().__init__(method, layer, capacity)
        self._keys: tuple[torch.Tensor, ...] = ()    # codes, scale, zero: (B, Hkv, C, D), (B, Hkv, C / g, D) x 2
        self._values: tuple[torch.Tensor, ...] = ()  # codes, scale, zero: (B, Hkv, C, Dv), (B, Hkv, C, 1) x 2
        self._ring_k: torch.Tensor | None = None     # (B, Hkv, r + g, D): exact keys, token t at t mod (r + g)
        self._ring_v: torch.Tensor | None = None     # (B, Hkv, r + 1, Dv): exact values, token t at t mod (r + 1)
        self._fixed_buffers = False                   # over a caller's buffers (over_buffers): never reallocated

    @classmethod
    def over_buffers(cls, method: KIVI, keys, values, ring_k, ring_v, length: int) -> KIVIStore:
        """A store over buffers its caller owns (an exported program's, kvpass.portable), laid out as
        `quantized_buffers` and `exact_rings` give them, holding the sequence's first `length` tokens. Appending
        writes into them; an append beyond their capacity is refused, never reallocated (the caller would keep
        the old buffers)."""
        store = cls(method, layer=0)
        store._keys, store._values, store._ring_k, store._ring_v = tuple(keys), tuple(values), ring_k, ring_v
        store._length, store._fixed_buffers = length, True
        return store

    @property
    def batch(self) -> int:
        return self._ring_k.shape[0]

    @property
    def capacity(self) -> int:
        return self._keys[0].shape[2]

    @property
    def device(self) -> torch.device:
        return self._ring_k.device

    @property
    def quantized_keys(self) -> int:
        """How many of the oldest tokens have their keys held quantized (the rest are exact)."""
        return self._targets(self._length)[0]

    @property
    def quantized_values(self) -> int:
        """How many of the oldest tokens have their values held quantized (the rest are exact)."""
        return self._targets(self._length)[1]

    def _targets(self, n: int) -> tuple[int, int]:
        """(quantized keys, quantized values) for a sequence of n tokens: the convention in the class doc."""
        older = max(0, n - self.method.residual)
        return older - older % self.method.group, older

    def _check_fits(self, k: torch.Tensor) -> None:
        if not self._length:
            return
        held = (self._ring_k.shape[0], self._ring_k.shape[1], self._ring_k.shape[3])
        if (k.shape[0], k.shape[1], k.shape[3]) != held:
            raise ValueError(f"layer {self.layer}: new keys of shape {tuple(k.shape)} do not fit the stored "
                             f"(batch, kv heads, head dim) = {held}; start a new sequence (kvpass.reset(model) or a "
                             f"new kvpass cache) for a new batch")

    def _make_room(self, k: torch.Tensor, v: torch.Tensor, needed: int) -> bool:
        """Buffers for `needed` slots for keys like k (B, Hkv, *, D) and values like v; True if they were reallocated.
        The capacity is at least r + g (`_with_exact` needs it) and a multiple of g."""
        r, g = self.method.residual, self.method.group
        rings = self._ring_k, self._ring_v
        same = rings[0] is not None and (k.shape[:2], k.shape[3], v.shape[3], k.device) == (
            rings[0].shape[:2], rings[0].shape[3], rings[1].shape[3], rings[0].device) and (
            self._length or k.dtype == rings[0].dtype)
        capacity = static_capacity(max(needed, r + g), self._length, self.capacity if same else None,
                                   self.capacity_hint)
        if capacity is None:
            return False
        if self._fixed_buffers:
            raise ValueError(f"{needed} tokens do not fit the {self.capacity} slots of this KIVI store's buffers "
                             "(an exported program's cache): export it with a larger max_cache_len")
        if not same:  # a new sequence of another shape (the shape of a held one is checked): nothing to keep
            B, H, _, D = k.shape
            self._ring_k, self._ring_v = exact_rings(self.method, B, H, D, v.shape[3], k.dtype, k.device)
            self._keys = self._values = ()
        self._reallocate(capacity_for(self.method, capacity))
        return True

    def _reallocate(self, capacity: int) -> None:
        """Zeroed quantized parts for `capacity` slots (a multiple of g), holding what the old ones held."""
        B, H, _, D = self._ring_k.shape
        keys, values = quantized_buffers(B, H, capacity, D, self._ring_v.shape[3], self._ring_k.dtype,
                                         self._ring_k.device, self.method.group)
        for old, new in zip(self._keys + self._values, keys + values) if self._length else ():
            new[:, :, : old.shape[2]] = old
        self._keys, self._values = keys, values

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k: (B, Hkv, L, D), v: (B, Hkv, L, Dv), the newest L tokens; both are copied, never kept."""
        self._check_fits(k)
        before, after = self._length, self._length + k.shape[2]
        self._make_room(k, v, after)
        (keys_from, values_from), (keys_to, values_to) = self._targets(before), self._targets(after)
        bits, g = self.method.bits, self.method.group
        leaving = self._through_ring(self._ring_k, keys_from, before, k, keys_to)
        groups = slice(keys_from // g, keys_to // g)
        for buffer, part, rows in zip(self._keys, quantize_per_channel(leaving, bits, g),
                                      (slice(keys_from, keys_to), groups, groups)):
            buffer[:, :, rows] = part
        leaving = self._through_ring(self._ring_v, values_from, before, v, values_to)
        for buffer, part in zip(self._values, quantize_per_token(leaving, bits)):
            buffer[:, :, values_from:values_to] = part
        self._length = after

    @staticmethod
    def _through_ring(ring: torch.Tensor, held_from: int, held_to: int, new: torch.Tensor, keep_from: int):
        """The exact tokens [held_from, held_to) of `ring` followed by `new`: those from keep_from on go into the
        ring, the older ones are returned (they leave, to be quantized). A copy of held_to - held_from + L tokens,
        bounded by r + g + L whatever the sequence length; `new` is never aliased."""
        tokens = torch.cat([ring[:, :, _ring_order(ring, held_from, held_to)], new.to(ring.dtype)], dim=2)
        cut = keep_from - held_from
        ring.index_copy_(2, _ring_order(ring, keep_from, held_to + new.shape[2]), tokens[:, :, cut:])
        return tokens[:, :, :cut]

    def attend(self, q, mask, is_causal, spec: AttentionSpec):
        k, v = self.materialize()
        return kernels_dispatch.attention(q, k, v, mask=mask, is_causal=is_causal, scale=spec.scale,
                                          softcap=spec.softcap, window=spec.window)

    def _dequantized(self, slots: int, quantized_keys, quantized_values, end):
        """Keys (B, Hkv, slots, D) and values (B, Hkv, slots, Dv) of the first `slots` slots (a multiple of g, at
        least r + g) in the model dtype: the dequantized codes, with the exact tokens before `end` over them.
        quantized_keys, quantized_values, end: ints (the host's view) or (1,) device tensors (a decode step)."""
        g = self.method.group
        codes, scale, zero = self._keys
        keys = codes[:, :, :slots], scale[:, :, : slots // g], zero[:, :, : slots // g]
        values = tuple(part[:, :, :slots] for part in self._values)
        return dequantized_view(self.method, (*keys, *values, self._ring_k, self._ring_v), quantized_keys,
                                quantized_values, end)

    def materialize(self):
        """Dense (B, Hkv, length, D|Dv) keys and values in the model dtype: the dequantized tokens, then the exact
        tail. Built afresh on every call (O(length) work and a transient dense copy, not counted by `nbytes`)."""
        if self._ring_k is None:
            raise RuntimeError(f"layer {self.layer}: the store is empty")
        n, g = self._length, self.method.group
        slots = -(-max(n, self.method.residual + g) // g) * g
        keys, values = self._dequantized(slots, *self._targets(n), n)
        return keys[:, :, :n], values[:, :, :n]

    # -- captured decode ----------------------------------------------------------------------------------
    def _grow(self, length: int) -> bool:
        return self._make_room(self._ring_k, self._ring_v, length)

    def decode(self, q, k, v, spec: AttentionSpec, slot, valid):
        """The convention of the class doc for the token at `slot`, in fixed-shape device ops: store it in the rings;
        quantize the value of token slot - r (when slot >= r) and, when this step completes a group of g quantized
        values, that group's keys; attend over the dequantized capacity with the exact tokens over it.

        The first version dequantizes the whole capacity every step (O(capacity) work and a transient dense copy);
        a fused kernel reading the codes is later work (docs/engine.md)."""
        r, g, bits = self.method.residual, self.method.group, self.method.bits
        self._ring_k.index_copy_(2, slot % (r + g), k.to(self._ring_k.dtype))
        self._ring_v.index_copy_(2, slot % (r + 1), v.to(self._ring_v.dtype))
        token = (slot - r).clamp(min=0)  # the value leaving the exact part, if slot >= r
        for buffer, part in zip(self._values, quantize_per_token(self._ring_v[:, :, token % (r + 1)], bits)):
            _put(buffer, token, part, slot >= r)
        quantized_keys, quantized_values = quantized_after(self.method, slot + 1)  # after this step
        group = (quantized_values // g - 1).clamp(min=0)  # the group this step completes, if it completes one
        tokens = group * g + torch.arange(g, device=slot.device)
        completes = (quantized_values > 0) & (quantized_values % g == 0)
        for buffer, part, rows in zip(self._keys, quantize_per_channel(self._ring_k[:, :, tokens % (r + g)], bits, g),
                                      (tokens, group, group)):
            _put(buffer, rows, part, completes)
        keys, values = self._dequantized(self.capacity, quantized_keys, quantized_values, slot + 1)
        return kernels_dispatch.attention(q, keys, values, mask=None, is_causal=True, scale=spec.scale,
                                          softcap=spec.softcap, window=spec.window, valid=valid[:, : self.capacity],
                                          q_start=slot)

    def nbytes(self):
        """Bytes allocated, by component (capacity reserved for later tokens counts, as in DenseStore):
        "codes": one uint8 per quantized value, keys and values (not bit-packed: 8 bits in memory whatever `bits`);
        "scales": the scales and zero-points of keys and values, model dtype;
        "exact": the exact rings (r + g tokens of keys and r + 1 of values), model dtype."""
        return {"codes": sum(parts[0].nbytes for parts in (self._keys, self._values) if parts),
                "scales": sum(part.nbytes for part in self._keys[1:] + self._values[1:]),
                "exact": sum(0 if ring is None else ring.nbytes for ring in (self._ring_k, self._ring_v))}
