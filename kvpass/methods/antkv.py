"""AnTKV store: product-quantized K/V codes, plus exact anchor tokens chosen online by their Anchor Score.

Every token enters the store exact (the "window"). Each attention call scores the exact tokens with the
column statistics of its queries' attention (kvpass.kernels.anchor_scores). A token that `window` queries
have scored is finalized: encoded against the layer's codebooks, or kept exact as an anchor when its Anchor
Score is among the highest (budget: `anchor_ratio` of the finalized tokens of its row and KV head; a later
token must also reach the weakest anchor's score so far). The same rule covers the prompt, generated tokens
and attention sinks (a sink's score is simply the highest). With pre-RoPE key codebooks (the default) a key
is rotated back by its position before it is encoded, and the kernels rotate its reconstruction forward again;
a row's positions are its slots minus its left padding, read from the first call's mask.

Attention always reads the stored representation as it is when the call's output is computed (codes,
anchors, window), through kvpass.kernels.coded_attention. A prefill therefore runs three passes: attention
over the still-exact prompt (for the log-sum-exp the scores need), the score pass, and after finalizing,
the prompt's attention over its own stored representation, which is what perplexity measures. A decode step
finalizes what the earlier queries have scored first, then runs one attention pass and scores the window
with its query.
"""
from __future__ import annotations

import math

import torch

from .. import kernels_dispatch
from ..config import AnTKV
from ..kernels.coded_attention import rope_rotate
from . import pq
from .base import AttentionSpec, LayerStore

_MIN_CAPACITY = 256
_STATS = 4  # sum A, sum A(1-A), sum A |q| |v - o|, visible (query, head) pairs: kvpass.kernels.anchor_scores


def section_name(method: AnTKV) -> str:
    """The calibration section this store reads its codebooks from (kvpass.calibration.antkv writes it)."""
    return (f"antkv-{method.bits:g}bit" + ("" if method.value_bits is None else f"-values-{method.value_bits:g}bit")
            + ("" if method.keys == "pre-rope" else f"-{method.keys}-keys")
            + ("" if method.key_metric == "euclidean" else f"-{method.key_metric}-metric"))


def anchor_score(method: AnTKV, stats: torch.Tensor, key_error: torch.Tensor, value_error: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """Per-token Anchor Score (B, H, n) from the accumulated statistics (4, B, H, n) and the token's own
    quantization errors |k - k^|, |v - v^| (B, H, n). Means over the (query, head) pairs that saw the token;
    tokens nobody saw (padding) get -inf. docs/antkv.md derives the candidates and compares them."""
    seen = stats[3]
    if method.score == "attention":
        total = stats[0]
    elif method.score == "attention_variance":
        total = stats[1]
    else:  # "bound": first-order output error from this token's key and value errors
        total = scale * stats[2] * key_error + stats[0] * value_error
    return torch.where(seen > 0, total / seen.clamp_min(1), float("-inf"))


class AnTKVStore(LayerStore):
    method: AnTKV
    needs_queries = True  # anchors are chosen from attention scores: the unfused cache path cannot serve it

    def __init__(self, method: AnTKV, layer: int, capacity: int | None = None, calibration=None):
        super().__init__(method, layer, capacity)
        if calibration is None:
            raise RuntimeError("AnTKV needs codebooks: pass Config(calibration=...) or let kvpass calibrate "
                               "(kvpass.compile resolves it from the model)")
        from .rope import stored_rotation

        tensors = calibration.section(section_name(method))
        self._books_cpu = (tensors[f"layers.{layer}.keys"], tensors[f"layers.{layer}.values"])
        self._whitening_cpu = tensors.get(f"layers.{layer}.key_whitening")   # None: Euclidean key metric
        self._rope = stored_rotation(tensors, layer)     # None: keys are encoded as attention sees them
        self._length = 0
        self._finalized = 0       # slots < _finalized are codes or anchors; the rest are exact (the window)

    @property
    def length(self) -> int:
        return self._length

    # -- storage ---------------------------------------------------------------------------------------
    def _allocate(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """First append: codebooks on the device in the model's dtype, empty window and anchor state."""
        B, H, _, D = k.shape
        books = [book.to(k.device, k.dtype if k.dtype in (torch.float16, torch.bfloat16) else torch.float32)
                 for book in self._books_cpu]
        for book, x, name in zip(books, (k, v), ("keys", "values")):
            if book.shape[0] != H or book.shape[1] * book.shape[3] != x.shape[-1]:
                raise ValueError(f"layer {self.layer}: the calibration's {name} codebook {tuple(book.shape)} does not "
                                 f"fit {name} of shape {tuple(x.shape)} (kv heads, head dim); recalibrate this model")
        self._book_k, self._book_v = books
        self._whitening = None if self._whitening_cpu is None else self._whitening_cpu.to(k.device, torch.float32)
        self._window_k = k.new_empty(B, H, 0, D)
        self._window_v = v.new_empty(B, H, 0, v.shape[-1])
        self._stats = k.new_zeros(_STATS, B, H, 0, dtype=torch.float32)
        self._anchor_count = torch.zeros(B, H, dtype=torch.int64, device=k.device)
        self._finalized_seen = torch.zeros(B, H, dtype=torch.int64, device=k.device)  # finalized, not padding
        self._weakest = torch.full((B, H), float("inf"), device=k.device)   # lowest score among the anchors so far
        self._codes_k = self._codes_v = self._anchor_slot = self._anchor_k = self._anchor_v = None
        self._rotation = None     # KeyRotation once the first attend has told the rows' padding

    def _reserve(self, needed: int) -> None:
        """Codes and anchor rows for `needed` finalized slots, grown geometrically (O(log n) copies)."""
        if self._codes_k is not None and needed <= self._codes_k.shape[2]:
            return
        old = 0 if self._codes_k is None else self._codes_k.shape[2]
        capacity = max(_MIN_CAPACITY, needed, self.capacity_hint or 0, 2 * old)
        # The budget never exceeds ceil(ratio * capacity) anchors; one more row takes the writes of tokens that
        # were not chosen, so choosing anchors needs no data-dependent indexing (no host sync in decode).
        anchors = math.ceil(self.method.anchor_ratio * capacity) + 1
        B, H, _, D = self._window_k.shape
        dev = self._window_k.device

        def grow(current, shape, dtype, fill=None):
            new = torch.empty(shape, dtype=dtype, device=dev) if fill is None else torch.full(shape, fill, dtype=dtype,
                                                                                                device=dev)
            if current is not None:
                new[:, :, : current.shape[2]] = current
            return new

        self._codes_k = grow(self._codes_k, (B, H, capacity, self._book_k.shape[1]), torch.uint8)
        self._codes_v = grow(self._codes_v, (B, H, capacity, self._book_v.shape[1]), torch.uint8)
        self._anchor_slot = grow(self._anchor_slot, (B, H, capacity), torch.int32, fill=-1)
        self._anchor_k = grow(self._anchor_k, (B, H, anchors, D), self._window_k.dtype)
        self._anchor_v = grow(self._anchor_v, (B, H, anchors, self._window_v.shape[-1]), self._window_v.dtype)

    def coded(self):
        """The stored representation as the coded-attention kernels read it (kvpass.kernels.coded_attention)."""
        from ..kernels.coded_attention import CodedKV

        self._reserve(max(self._length, 1))   # the layout wants capacity for every slot, window included
        return CodedKV(codes_k=self._codes_k, codes_v=self._codes_v, codebook_k=self._book_k,
                       codebook_v=self._book_v, anchor_slot=self._anchor_slot, anchor_k=self._anchor_k,
                       anchor_v=self._anchor_v, exact_k=self._window_k, exact_v=self._window_v,
                       exact_start=self._finalized, rotation=self._rotation)

    # -- the LayerStore interface ------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self._length == 0:
            self._allocate(k, v)
        elif (k.shape[0], k.shape[1], k.shape[3]) != (self._window_k.shape[0], self._window_k.shape[1],
                                                      self._window_k.shape[3]):
            raise ValueError(f"layer {self.layer}: new keys of shape {tuple(k.shape)} do not fit the stored (batch, "
                             f"kv heads, head dim); start a new sequence (kvpass.reset(model) or a new kvpass cache)")
        # torch.cat copies: the caller's tensors may be buffers reused by the next step.
        self._window_k = torch.cat([self._window_k, k.to(self._window_k.dtype)], dim=2)
        self._window_v = torch.cat([self._window_v, v.to(self._window_v.dtype)], dim=2)
        self._stats = torch.cat([self._stats, self._stats.new_zeros(_STATS, *k.shape[:3])], dim=3)
        self._length += k.shape[2]

    def attend(self, q, mask, is_causal, spec: AttentionSpec):
        Lq = q.shape[2]
        if self._rope is not None and self._rotation is None:
            self._rotation = self._key_rotation(mask, Lq)
        window = self.method.window
        # Tokens the earlier queries have already scored `window` times are finalized before this call reads them.
        self._finalize(self._length - Lq - window + 1, spec.scale)
        kwargs = dict(mask=mask, is_causal=is_causal, scale=spec.scale, softcap=spec.softcap, window=spec.window)
        out, lse = kernels_dispatch.coded_attention(q, self.coded(), return_lse=True, **kwargs)
        o = out if self.method.score == "bound" else None
        self._stats += kernels_dispatch.anchor_scores(q, self._window_k, self._window_v, lse, o,
                                                      q_start=self._length - Lq, key_start=self._finalized, **kwargs)
        if Lq > 1 and self._finalize(self._length - window + 1, spec.scale):
            # A prompt's queries all scored it in one pass: it attends over its own stored representation.
            out = kernels_dispatch.coded_attention(q, self.coded(), **kwargs)
        return out

    def materialize(self):
        from ..kernels.coded_attention import dequantize

        k, v = dequantize(self.coded())
        return k.to(self._window_k.dtype), v.to(self._window_v.dtype)

    def nbytes(self):
        if self._length == 0:
            return {"codes": 0, "anchors": 0, "codebooks": 0, "window": 0}
        parts = {"codes": (self._codes_k, self._codes_v, self._anchor_slot), "anchors": (self._anchor_k, self._anchor_v),
                 "codebooks": (self._book_k, self._book_v), "window": (self._window_k, self._window_v, self._stats)}
        return {name: sum(t.nbytes for t in tensors if t is not None) for name, tensors in parts.items()}

    def _key_rotation(self, mask, Lq: int):
        """The KeyRotation of this sequence, from its first call (queries at slots 0 .. Lq - 1): a slot is
        padding when its own query does not see it, and a row's positions start after its (left) padding, as
        Hugging Face numbers them."""
        from ..kernels.coded_attention import KeyRotation

        B, device = self._window_k.shape[0], self._window_k.device
        if mask is None:
            padding = torch.zeros(B, dtype=torch.int32, device=device)
        else:
            slots = torch.arange(Lq, device=mask.device)
            padding = (~mask[:, 0, slots, slots]).sum(-1).to(torch.int32).expand(B).contiguous()
        inv_freq, scaling = self._rope
        return KeyRotation(inv_freq.to(device, torch.float32), scaling, padding)

    # -- finalization ---------------------------------------------------------------------------------------
    def _finalize(self, upto: int, scale: float) -> int:
        """Encode or anchor the window tokens of slots < upto; returns how many were finalized."""
        n = min(upto, self._length) - self._finalized
        if n <= 0:
            return 0
        start = self._finalized
        self._reserve(start + n)
        k, v, stats = self._window_k[:, :, :n], self._window_v[:, :, :n], self._stats[:, :, :, :n]
        rotation = self._rotation
        if rotation is not None:
            positions = rotation.positions(start, start + n)
            codes_k = pq.encode(rope_rotate(k, positions, rotation.inv_freq, rotation.scaling, inverse=True),
                                self._book_k, self._whitening)
            decoded_k = rope_rotate(pq.decode(codes_k, self._book_k), positions, rotation.inv_freq,
                                    rotation.scaling)
        else:
            codes_k = pq.encode(k, self._book_k, self._whitening)
            decoded_k = pq.decode(codes_k, self._book_k)
        codes_v = pq.encode(v, self._book_v)
        self._codes_k[:, :, start : start + n] = codes_k
        self._codes_v[:, :, start : start + n] = codes_v
        key_error = (k.float() - decoded_k.float()).norm(dim=-1)
        value_error = (v.float() - pq.decode(codes_v, self._book_v).float()).norm(dim=-1)
        score = anchor_score(self.method, stats, key_error, value_error, scale)          # (B, H, n)
        self._choose_anchors(score, k, v, start, n)
        self._window_k, self._window_v = self._window_k[:, :, n:], self._window_v[:, :, n:]
        self._stats = self._stats[:, :, :, n:]
        self._finalized += n
        return n

    def _choose_anchors(self, score, k, v, start: int, n: int) -> None:
        """Keep the highest-scoring of the n tokens exact, within each (row, head)'s budget; no host sync."""
        # Padding (never seen by a query) does not count: a padded row keeps the anchors it would have alone.
        self._finalized_seen += torch.isfinite(score).sum(-1)
        budget = (torch.ceil(self.method.anchor_ratio * self._finalized_seen.double()).long()
                  - self._anchor_count).clamp_min(0)                                                    # (B, H)
        rank = score.argsort(dim=-1, descending=True).argsort(dim=-1)                               # 0 = best
        # Before any anchor exists, any finite score qualifies; afterwards it must reach the weakest anchor.
        floor = torch.where(self._anchor_count > 0, self._weakest, float("-inf"))
        chosen = (rank < budget[..., None]) & (score >= floor[..., None]) & torch.isfinite(score)
        index = self._anchor_count[..., None] + chosen.long().cumsum(-1) - 1                          # (B, H, n)
        rows = torch.where(chosen, index, self._anchor_k.shape[2] - 1)          # the last row is the spare one
        self._anchor_k.scatter_(2, rows[..., None].expand(*rows.shape, k.shape[-1]), k)
        self._anchor_v.scatter_(2, rows[..., None].expand(*rows.shape, v.shape[-1]), v)
        self._anchor_slot[:, :, start : start + n] = torch.where(chosen, index, -1).to(torch.int32)
        self._anchor_count += chosen.sum(-1)
        self._weakest = torch.minimum(self._weakest, torch.where(chosen, score, float("inf")).amin(-1))
