"""AnTKV store: product-quantized K/V codes, plus exact anchor tokens chosen online by their Anchor Score.

Every token enters the store exact (the "window"). Each attention call scores the exact tokens with the
column statistics of its queries' attention (kvpass.kernels.anchor_scores): all of a prompt's later queries
score a prompt token, or with prompt_scoring "window" only the `window` queries from its own slot on, as for a
generated token. A token that `window` queries have scored is finalized: encoded against the layer's codebooks,
or kept exact as an anchor when its Anchor Score is among the highest (budget: `anchor_ratio` of the
finalized tokens of its row and KV head; a later token must also reach the weakest anchor's score so far). The
same rule covers the prompt, generated tokens and attention sinks (a sink's score is simply the highest). With pre-RoPE key codebooks (the default) a key
is rotated back by its position before it is encoded, and the kernels rotate its reconstruction forward again;
a row's positions are its slots minus its left padding, read from the first call's mask.

Attention always reads the stored representation as it is when the call's output is computed (codes,
anchors, window), through kvpass.kernels.coded_attention. A prefill therefore runs three passes: attention
over the still-exact prompt (for the log-sum-exp the scores need), the score pass, and after finalizing,
the prompt's attention over its own stored representation, which is what perplexity measures. A decode step
finalizes what the earlier queries have scored first, then runs one attention pass and scores the window
with its query.

The store meets the decode engine's captured-decode contract (kvpass/engine.py): in a decode step exactly one
token leaves the window, `window` slots behind the new one, so `decode` runs the same rule with fixed shapes at
the device-held slot (the window is a ring, the finalized count is held on the device too), and `advance` keeps
the host's counts.
"""
from __future__ import annotations

import math

import torch

from .. import kernels_dispatch
from ..config import AnTKV
from ..kernels.coded_attention import CodedKV, KeyRotation, dequantize
from .antkv_step import finalize_tokens, fused_finalize_tokens, fused_ring_attention
from .base import AttentionSpec, LayerStore

_MIN_CAPACITY = 256
_STATS = 4  # sum A, sum A(1-A), sum A |q| |v - o|, visible (query, head) pairs: kvpass.kernels.anchor_scores


def section_name(method: AnTKV) -> str:
    """The calibration section this store reads its codebooks from (kvpass.calibration.antkv writes it)."""
    return (f"antkv-{method.bits:g}bit" + ("" if method.value_bits is None else f"-values-{method.value_bits:g}bit")
            + ("" if method.keys == "pre-rope" else f"-{method.keys}-keys")
            + ("" if method.key_metric == "euclidean" else f"-{method.key_metric}-metric"))


# The state of one layer's store that an exported program holds as buffers (kvpass.portable), in the order
# kvpass::static_antkv_attention takes them (attributes "_" + name; position_offset is the KeyRotation's); the
# codebooks travel beside them as the program's constants.
STATE_NAMES = ("codes_k", "codes_v", "anchor_slot", "anchor_k", "anchor_v", "ring_k", "ring_v", "ring_stats",
               "exact_start", "finalized_seen", "anchor_count", "weakest", "position_offset")
_BATCH_DIM = {"ring_stats": 1, "exact_start": None}   # the others: dim 0


def batch_dim(name: str) -> int | None:
    """The dimension of state buffer `name` that runs over the batch's rows (None: shared by all rows)."""
    return _BATCH_DIM.get(name, 0)


def batch_rows(name: str, buffer: torch.Tensor, batch: int) -> torch.Tensor:
    """The view of a program's state buffer `name` that holds its first `batch` rows."""
    dim = batch_dim(name)
    return buffer if dim is None else buffer.narrow(dim, 0, batch)


class AnTKVStore(LayerStore):
    """Codes, anchors and the exact window of one layer. The window lives in a ring: slot j (exact while
    `_finalized` <= j < `length`) sits at row j % R of `_ring_k` / `_ring_v` / `_ring_stats` (its accumulated
    statistics), so a decode step writes, finalizes and reads at device-held slots with fixed shapes, and the
    store meets the captured-decode contract. A prompt longer than the ring grows it; after the prompt's
    finalization it shrinks back to window + 1 rows, what decode needs."""

    method: AnTKV
    captured_decode = True
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
        self._changed = True      # something a recorded decode step reads was (re)allocated since the last reserve
        self._scale = 1.0         # the site's softmax scale, once an attend has told it (unscored tokens ignore it)
        self._ring_k = None       # the buffers come with the first append (their shapes are its tokens')
        self._padding_told = False    # whether this sequence's first call has told the rows' padding
        self._ring_recorded = None    # the ring the last reserve saw (a recorded step reads it)

    @property
    def length(self) -> int:
        return self._length

    # -- an exported program's state (kvpass.portable) ------------------------------------------------------
    @classmethod
    def program_state(cls, method: AnTKV, calibration, layer: int, batch: int, slots: int, key_dim: int,
                      value_dim: int, heads: int, dtype: torch.dtype, device) -> tuple[dict, tuple]:
        """The buffers of an empty store for `batch` rows of `slots` tokens ({STATE_NAMES: tensor}) and its
        constants (key codebook, value codebook, key whitening or None, RoPE inv_freq or None, RoPE scaling)."""
        store = cls(method, layer, slots, calibration)
        store._allocate(torch.zeros(batch, heads, 1, key_dim, dtype=dtype, device=device),
                        torch.zeros(batch, heads, 1, value_dim, dtype=dtype, device=device))
        store._reserve(slots)
        store._position_offset = torch.zeros(batch, dtype=torch.int32, device=device)
        rope = (None, 1.0) if store._rope is None else (store._rope[0].to(device, torch.float32), store._rope[1])
        return {name: getattr(store, "_" + name) for name in STATE_NAMES}, (*store._books, *rope)

    @classmethod
    def over_buffers(cls, method: AnTKV, state: dict, constants: tuple, length: int) -> AnTKVStore:
        """A store over a program's buffers (`program_state`'s, cut to the batch's rows by `batch_rows`) holding
        the sequence's first `length` tokens; length 0 starts a sequence (its counts are reset). Writes go into
        the buffers; `write_back` returns what a prompt's call reallocated (its ring)."""
        store = cls.__new__(cls)
        LayerStore.__init__(store, method, layer=0)
        book_k, book_v, whitening, inv_freq, scaling = constants
        store._books = (book_k, book_v, whitening)
        store._rope = None if inv_freq is None else (inv_freq, scaling)
        for name in STATE_NAMES:
            setattr(store, "_" + name, state[name])
        store._changed, store._scale, store._kept_ring, store._ring_recorded = False, 1.0, {}, None
        store._rotation = None
        if inv_freq is not None:
            store._rotation = KeyRotation(inv_freq, scaling, store._position_offset)
        if length == 0:
            store.reset()
        store._length, store._finalized, store._padding_told = length, int(store._exact_start), length > 0
        return store

    def write_back(self, state: dict) -> None:
        """Into a program's buffers, what this call made anew: the ring (a prompt grows it, then shrinks it back to
        window + 1 rows)."""
        for name in ("ring_k", "ring_v", "ring_stats"):
            if getattr(self, "_" + name) is not state[name]:
                state[name].copy_(getattr(self, "_" + name))

    # -- storage ---------------------------------------------------------------------------------------
    def _allocate(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """First append: codebooks on the device in the model's dtype, an empty ring and anchor state."""
        B, H, L, D = k.shape
        books = [book.to(k.device, k.dtype if k.dtype in (torch.float16, torch.bfloat16) else torch.float32)
                 for book in self._books_cpu]
        for book, x, name in zip(books, (k, v), ("keys", "values")):
            if book.shape[0] != H or book.shape[1] * book.shape[3] != x.shape[-1]:
                raise ValueError(f"layer {self.layer}: the calibration's {name} codebook {tuple(book.shape)} does not "
                                 f"fit {name} of shape {tuple(x.shape)} (kv heads, head dim); recalibrate this model")
        whitening = None if self._whitening_cpu is None else self._whitening_cpu.to(k.device, torch.float32)
        self._books = (*books, whitening)      # key codebook, value codebook, key whitening: what encode_tokens takes
        # Zeros, not garbage: a decode step multiplies every ring row's value by its (maybe zero) probability.
        size = max(L, self.method.window + 1)
        self._ring_k = k.new_zeros(B, H, size, D)
        self._ring_v = v.new_zeros(B, H, size, v.shape[-1])
        self._ring_stats = k.new_zeros(_STATS, B, H, size, dtype=torch.float32)
        self._kept_ring: dict[str, torch.Tensor] = {}   # the decode-sized ring while a prompt's is larger
        self._exact_start = torch.zeros(1, dtype=torch.int64, device=k.device)   # _finalized, for decode steps
        self._anchor_count = torch.zeros(B, H, dtype=torch.int64, device=k.device)
        self._finalized_seen = torch.zeros(B, H, dtype=torch.int64, device=k.device)  # finalized, not padding
        self._weakest = torch.full((B, H), float("inf"), device=k.device)   # lowest score among the anchors so far
        self._codes_k = self._codes_v = self._anchor_slot = self._anchor_k = self._anchor_v = None
        self._rotation = None     # KeyRotation once the first attend has told the rows' padding
        self._padding_told = False

    def _reserve(self, needed: int) -> None:
        """Codes and anchor rows for `needed` slots, grown geometrically (O(log n) copies)."""
        if self._codes_k is not None and needed <= self._codes_k.shape[2]:
            return
        old = 0 if self._codes_k is None else self._codes_k.shape[2]
        capacity = max(_MIN_CAPACITY, needed, self.capacity_hint or 0, 2 * old)
        # The budget never exceeds ceil(ratio * capacity) anchors; one more row takes the writes of tokens that
        # were not chosen, so choosing anchors needs no data-dependent indexing (no host sync in decode).
        anchors = math.ceil(self.method.anchor_ratio * capacity) + 1
        B, H, _, D = self._ring_k.shape
        dev = self._ring_k.device

        def grow(current, shape, dtype, fill=None):
            new = torch.empty(shape, dtype=dtype, device=dev) if fill is None else torch.full(shape, fill, dtype=dtype,
                                                                                                device=dev)
            if current is not None:
                new[:, :, : current.shape[2]] = current
            return new

        # Codes start at 0, a real centroid: a decode step classes every slot as coded (the ring's and the
        # unused ones are masked invalid), and the fp32 reference decodes masked slots before masking them.
        self._codes_k = grow(self._codes_k, (B, H, capacity, self._books[0].shape[1]), torch.uint8, fill=0)
        self._codes_v = grow(self._codes_v, (B, H, capacity, self._books[1].shape[1]), torch.uint8, fill=0)
        # The anchor map is int16 while the anchor rows fit: as int32 it is a quarter of a 0.375-bit store's bytes.
        slot_dtype = torch.int16 if anchors <= torch.iinfo(torch.int16).max else torch.int32
        self._anchor_slot = grow(self._anchor_slot, (B, H, capacity), slot_dtype, fill=-1)
        self._anchor_k = grow(self._anchor_k, (B, H, anchors, D), self._ring_k.dtype)
        self._anchor_v = grow(self._anchor_v, (B, H, anchors, self._ring_v.shape[-1]), self._ring_v.dtype)
        self._changed = True

    def _ring_rows(self, start: int, stop: int) -> torch.Tensor:
        """Ring rows (stop - start,) of slots start .. stop - 1."""
        return torch.arange(start, stop, device=self._ring_k.device) % self._ring_k.shape[2]

    def _resize_ring(self, size: int) -> None:
        """A ring of `size` rows (>= the exact tokens held) holding the same exact tokens and statistics. The
        decode-sized ring (window + 1 rows) a prompt outgrows is kept and taken back when the ring shrinks after
        the prompt's finalization, so the tensors a recorded step reads outlive the prompts of later sequences."""
        held = torch.arange(self._finalized, self._length, device=self._ring_k.device)
        old_rows, new_rows = held % self._ring_k.shape[2], held % size
        decode_size = self.method.window + 1
        for name, dim in (("_ring_k", 2), ("_ring_v", 2), ("_ring_stats", 3)):
            old = getattr(self, name)
            shape = list(old.shape)
            shape[dim] = size
            kept = self._kept_ring.get(name)
            reuse = size == decode_size and kept is not None and list(kept.shape) == shape
            new = kept if reuse else old.new_zeros(shape)
            if old.shape[dim] == decode_size:
                self._kept_ring[name] = old
            new.index_copy_(dim, new_rows, old.index_select(dim, old_rows))
            setattr(self, name, new)

    def _window(self):
        """The exact tokens' keys (B, H, P, D) and values (B, H, P, Dv), in slot order (copies), and their rows."""
        rows = self._ring_rows(self._finalized, self._length)
        return self._ring_k.index_select(2, rows), self._ring_v.index_select(2, rows), rows

    def coded(self):
        """The stored representation as the coded-attention kernels read it (kvpass.kernels.coded_attention)."""
        self._reserve(max(self._length, 1))   # the layout wants capacity for every slot, window included
        exact_k, exact_v, _ = self._window()
        return self._coded_kv(exact_k, exact_v, self._finalized)

    def _coded_kv(self, exact_k, exact_v, exact_start: int) -> CodedKV:
        """The codes, anchors and codebooks, with exact_k, exact_v (B, H, P, D|Dv) the tokens of slots exact_start
        on."""
        return CodedKV(codes_k=self._codes_k, codes_v=self._codes_v, codebook_k=self._books[0],
                       codebook_v=self._books[1], anchor_slot=self._anchor_slot, anchor_k=self._anchor_k,
                       anchor_v=self._anchor_v, exact_k=exact_k, exact_v=exact_v, exact_start=exact_start,
                       rotation=self._rotation)

    # -- the LayerStore interface ------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self._ring_k is None or (self._length == 0 and k.shape[:2] != self._ring_k.shape[:2]):
            self._allocate(k, v)   # the first sequence, or a new one of another batch size
        elif (k.shape[0], k.shape[1], k.shape[3]) != (self._ring_k.shape[0], self._ring_k.shape[1],
                                                      self._ring_k.shape[3]):
            raise ValueError(f"layer {self.layer}: new keys of shape {tuple(k.shape)} do not fit the stored (batch, "
                             f"kv heads, head dim); start a new sequence (kvpass.reset(model) or a new kvpass cache)")
        L = k.shape[2]
        exact = self._length + L - self._finalized
        if exact > self._ring_k.shape[2]:
            self._resize_ring(max(exact, self.method.window + 1))
        rows = self._ring_rows(self._length, self._length + L)
        # index_copy_ copies: the caller's tensors may be buffers reused by the next step.
        self._ring_k.index_copy_(2, rows, k.to(self._ring_k.dtype))
        self._ring_v.index_copy_(2, rows, v.to(self._ring_v.dtype))
        self._ring_stats.index_fill_(3, rows, 0.0)
        self._length += L
        self._reserve(self._length)   # codes for every slot held: the capacity the decode engine's validity spans

    def attend(self, q, mask, is_causal, spec: AttentionSpec):
        Lq = q.shape[2]
        self._scale = spec.scale
        if self._rope is not None and not self._padding_told:
            self._tell_padding(mask, Lq)
        window = self.method.window
        # Tokens the earlier queries have already scored `window` times are finalized before this call reads them.
        self._finalize(self._length - Lq - window + 1, spec.scale)
        kwargs = dict(mask=mask, is_causal=is_causal, scale=spec.scale, softcap=spec.softcap, window=spec.window)
        kv = self.coded()
        out, lse = kernels_dispatch.coded_attention(q, kv, return_lse=True, **kwargs)
        o = out if self.method.score == "bound" else None
        # prompt_scoring "window": a prompt token is scored by the `window` queries from its own slot on, as a
        # generated token is (the span changes nothing in decode), and the score pass costs O(L * window).
        span = window if self.method.prompt_scoring == "window" else 0
        stats = kernels_dispatch.anchor_scores(q, kv.exact_k, kv.exact_v, lse, o, q_start=self._length - Lq,
                                               key_start=self._finalized, span=span, **kwargs)
        self._ring_stats.index_add_(3, self._ring_rows(self._finalized, self._length), stats)
        if Lq > 1 and self._finalize(self._length - window + 1, spec.scale):
            # A prompt's queries all scored it in one pass: it attends over its own stored representation.
            out = kernels_dispatch.coded_attention(q, self.coded(), **kwargs)
            if self.persistent and self._ring_k.shape[2] > window + 1:
                self._resize_ring(window + 1)   # what decode needs; a long prompt's ring is dropped
        return out

    def materialize(self):
        k, v = dequantize(self.coded())
        return k.to(self._ring_k.dtype), v.to(self._ring_v.dtype)

    def nbytes(self):
        """Bytes of what the store holds, by part: the codes and the anchor map of the slots held, the anchor rows
        in use (a device sync), the codebooks (the same for every sequence) and the window ring with its
        statistics; spare capacity is in `allocated_nbytes`."""
        if self._length == 0:
            return {"codes": 0, "anchor_map": 0, "anchors": 0, "codebooks": 0, "window": 0}
        per_slot = {"codes": (self._codes_k, self._codes_v), "anchor_map": (self._anchor_slot,)}
        held = {name: self._length * sum(t.nbytes // t.shape[2] for t in tensors) for name, tensors in per_slot.items()}
        row = sum(t[:, :, 0].nbytes // (t.shape[0] * t.shape[1]) for t in (self._anchor_k, self._anchor_v))
        return {**held, "anchors": int(self._anchor_count.sum()) * row,
                "codebooks": sum(t.nbytes for t in self._books if t is not None),
                "window": sum(t.nbytes for t in (self._ring_k, self._ring_v, self._ring_stats))}

    def allocated_nbytes(self) -> int:
        if self._ring_k is None:
            return 0
        buffers = (self._codes_k, self._codes_v, self._anchor_slot, self._anchor_k, self._anchor_v, *self._books,
                   self._ring_k, self._ring_v, self._ring_stats)
        return sum(t.nbytes for t in buffers if t is not None)

    def _tell_padding(self, mask, Lq: int) -> None:
        """The sequence's KeyRotation, from its first call (queries at slots 0 .. Lq - 1): a slot is padding when
        its own query does not see it, and a row's positions start after its (left) padding, as Hugging Face
        numbers them. No mask (or no call before the first decode step): no padding. A store kept from the last
        sequence writes the padding into the same tensor (a recorded step reads it)."""
        B, device = self._ring_k.shape[0], self._ring_k.device
        if mask is None:
            padding = torch.zeros(B, dtype=torch.int32, device=device)
        else:
            slots = torch.arange(Lq, device=mask.device)
            padding = (~mask[:, 0, slots, slots]).sum(-1).to(torch.int32).expand(B).contiguous()
        if self._rotation is not None and self._rotation.position_offset.shape == padding.shape:
            self._rotation.position_offset.copy_(padding)
        else:
            inv_freq, scaling = self._rope
            self._rotation = KeyRotation(inv_freq.to(device, torch.float32), scaling, padding)
            self._changed = True
        self._padding_told = True

    # -- captured decode (the decode engine) ------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self._ring_k.shape[0]

    @property
    def capacity(self) -> int:
        return self._codes_k.shape[2]

    @property
    def device(self) -> torch.device:
        return self._ring_k.device

    def settle(self) -> None:
        """Tokens stored without attention (a benchmark's random fill) are finalized as a prompt's would be,
        all but the newest window - 1: a decode step finalizes one token, so it must find no more than that
        exact. Unscored tokens have no Anchor Score: they are all encoded."""
        if self._length == 0:
            return
        if self._rope is not None and not self._padding_told:   # no attention call has told the padding: none
            self._tell_padding(None, 0)
        self._finalize(self._length - self.method.window + 1, self._scale)
        if self._ring_k.shape[2] > self.method.window + 1:
            self._resize_ring(self.method.window + 1)

    def reserve(self, length: int) -> bool:
        """Codes for `length` slots and a ring for the exact ones, after `settle`; True if anything a recorded
        step reads was (re)allocated since the last reserve (growth, a prompt's ring, a new store)."""
        if self._length - self._finalized > self.method.window:
            self.settle()
        self._reserve(length)
        exact = length - self._finalized
        if exact > self._ring_k.shape[2]:
            self._resize_ring(max(exact, self.method.window + 1))
        changed = self._changed or self._ring_k is not self._ring_recorded   # (a prompt's ring, another size)
        self._changed, self._ring_recorded = False, self._ring_k
        return changed

    def decode(self, q, k, v, spec: AttentionSpec, slot, valid):
        """The decode step of `attend` with fixed shapes: the new token enters the ring at `slot`, the token
        `window` slots back is finalized (if the prompt has not), then attention over the codes and anchors
        (the coded kernel, its slots below the device-held finalized count) and over the ring (every row whose
        slot is exact and valid), merged by log-sum-exp; the ring's statistics take the query's column
        statistics."""
        ring = self._ring_k.shape[2]
        new = slot % ring
        self._ring_k.index_copy_(2, new, k.to(self._ring_k.dtype))
        self._ring_v.index_copy_(2, new, v.to(self._ring_v.dtype))
        self._ring_stats.index_fill_(3, new, 0.0)
        self._finalize_on_device(slot - self.method.window, spec.scale)

        capacity = self.capacity
        valid = valid[:, :capacity]
        coded_valid = valid & (torch.arange(capacity, device=valid.device) < self._exact_start)
        # Every slot is classed coded or anchor (exact_start = capacity): the ring's slots are invalid here.
        kv = self._coded_kv(self._ring_k[:, :, :0], self._ring_v[:, :, :0], capacity)
        out_coded, lse_coded = kernels_dispatch.coded_attention(
            q, kv, mask=None, is_causal=True, scale=spec.scale, softcap=spec.softcap, window=spec.window,
            return_lse=True, valid=coded_valid, q_start=slot)

        out, stats = fused_ring_attention(q, self._ring_k, self._ring_v, slot, self._exact_start, valid, out_coded,
                                          lse_coded, spec.scale, spec.softcap, spec.window,
                                          self.method.score == "bound")
        self._ring_stats += stats
        return out

    def advance(self, count: int) -> None:
        """The host's counts after `count` decode steps: each stored a token and finalized the one `window`
        slots back unless the prompt had."""
        for _ in range(count):
            self._finalized = max(self._finalized, self._length - self.method.window + 1)
            self._length += 1

    def reset(self) -> bool:
        """Empty the store for a new sequence in place: the buffers (what a recorded step reads) stay, the counts
        restart, and the next sequence's first call tells its padding anew."""
        if self._ring_k is not None:
            for counter, value in ((self._exact_start, 0), (self._finalized_seen, 0), (self._anchor_count, 0),
                                   (self._weakest, float("inf"))):
                counter.fill_(value)
        self._length = self._finalized = 0
        self._padding_told = False
        return True

    # -- finalization ---------------------------------------------------------------------------------------
    def _finalize(self, upto: int, scale: float) -> int:
        """Encode or anchor the window tokens of slots < upto; returns how many were finalized."""
        n = min(upto, self._length) - self._finalized
        if n <= 0:
            return 0
        start = self._finalized
        self._reserve(start + n)
        rows = self._ring_rows(start, start + n)
        k, v = self._ring_k.index_select(2, rows), self._ring_v.index_select(2, rows)
        positions = None if self._rotation is None else self._rotation.positions(start, start + n)
        codes_k, codes_v, chosen, index, counters = finalize_tokens(
            k, v, self._ring_stats.index_select(3, rows), positions, self._books, self._rope_args(), self.method,
            scale, self._counters())
        self._codes_k[:, :, start : start + n] = codes_k
        self._codes_v[:, :, start : start + n] = codes_v
        self._anchor_slot[:, :, start : start + n] = self._keep_anchors(chosen, index, k, v, counters)
        self._finalized += n
        self._exact_start.fill_(self._finalized)
        return n

    def _finalize_on_device(self, slot: torch.Tensor, scale: float) -> None:
        """`_finalize` of the one token at `slot` ((1,) int64 on the device; below 0 before the window fills),
        with fixed shapes and no host sync; nothing changes where it is finalized already (the prompt's)."""
        fresh = slot >= self._exact_start                                           # (1,) bool
        at = slot.clamp_min(0)
        rows = at % self._ring_k.shape[2]
        k, v = self._ring_k.index_select(2, rows), self._ring_v.index_select(2, rows)
        positions = None if self._rotation is None else self._rotation.positions_of(at)
        codes_k, codes_v, chosen, index, counters = fused_finalize_tokens(
            k, v, self._ring_stats.index_select(3, rows), positions, self._books, self._rope_args(), self.method,
            scale, self._counters(), fresh)
        entry = self._keep_anchors(chosen, index, k, v, counters)
        for held, new in ((self._codes_k, codes_k), (self._codes_v, codes_v), (self._anchor_slot, entry)):
            held.index_copy_(2, at, torch.where(fresh.view(-1, *[1] * (new.dim() - 1)), new, held.index_select(2, at)))
        self._exact_start.copy_(torch.where(fresh, slot + 1, self._exact_start))

    def _rope_args(self):
        """(inv_freq, scaling) of the sequence's KeyRotation, or None (keys are encoded as attention sees them)."""
        return None if self._rotation is None else (self._rotation.inv_freq, self._rotation.scaling)

    def _counters(self):
        """(finalized candidates, anchors, weakest anchor score) per (row, head): what choose_anchors takes."""
        return self._finalized_seen, self._anchor_count, self._weakest

    def _keep_anchors(self, chosen, index, k, v, counters) -> torch.Tensor:
        """Write the chosen tokens (chosen (B, H, n)) of k, v into their anchor rows (the others into the spare last
        row: no data-dependent indexing, no host sync) and the counters after the choice, in place (a recorded step
        reads these tensors). Returns the tokens' anchor_slot entries (B, H, n) (-1: coded)."""
        rows = torch.where(chosen, index, self._anchor_k.shape[2] - 1)
        self._anchor_k.scatter_(2, rows[..., None].expand(*rows.shape, k.shape[-1]), k)
        self._anchor_v.scatter_(2, rows[..., None].expand(*rows.shape, v.shape[-1]), v)
        for held, new in zip(self._counters(), counters):
            held.copy_(new)
        return torch.where(chosen, index, -1).to(self._anchor_slot.dtype)
