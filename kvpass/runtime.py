"""The runtime: per-model KV-cache state that the kvpass ops read and write by layer id.

Compiled graphs never see this state (reading it from traced code would add guards and recompiles);
they carry a constant runtime id and layer id, and the op looks the state up when it runs, like vLLM's
forward context. One runtime serves one model; a sequence (batch of rows) lives in it from
`begin_sequence` until the next `begin_sequence` or `end_sequence`.
"""
from __future__ import annotations

import collections
import itertools
import weakref

import torch

from .config import Chess, Config
from .methods import LayerStore, OneShot, make_store
from .methods.base import AttentionSpec

_RUNTIMES: "weakref.WeakValueDictionary[int, Runtime]" = weakref.WeakValueDictionary()
_NEXT_ID = itertools.count(1)


class Runtime:
    """State of one model under one kvpass config."""

    def __init__(self, config: Config):
        self.config = config
        self.id = next(_NEXT_ID)
        _RUNTIMES[self.id] = self
        self._stores: dict[int, LayerStore] = {}
        self.sequence_kind: str | None = None  # None, "cache" (a kvpass HF cache) or "explicit" (kvpass.sequence)
        self.capacity: int | None = None
        self.sequences_started = 0
        self.calls = collections.Counter()  # (mode name, "prefill"|"decode") -> attention op calls
        self._resolve = None                 # method -> its loaded Calibration; given with the model (use_calibrations)
        self._calibrations: dict[str, object] = {}  # method name -> its Calibration
        self._chess_plan = None
        # Decode-engine state (kvpass/engine.py), on the device and address-stable so a recorded CUDA graph stays
        # valid: the slot the next decode token goes to, and which slots of each row hold a real token (left
        # padding does not). Shared by every layer: all layers hold the same slots.
        self.static_decode = False        # set when a decode engine drives this runtime's decode steps
        self._slot: torch.Tensor | None = None    # (1,) int64
        self._valid: torch.Tensor | None = None   # (B, capacity) bool
        self.pool_version = 0             # bumped whenever a buffer a recorded graph reads is reallocated
        # cache_update calls run unfused (HF's own attention read the kvpass cache), counted wherever they ran: in
        # a compiled graph or outside any (a graph break, Dynamo's recompile limit). The decode engine stands aside
        # once it sees one, as that attention needs HF's mask.
        self.unfused_updates = 0

    def use_calibrations(self, resolve) -> None:
        """resolve: method config -> its loaded kvpass.calibration.Calibration, for the model this runtime now
        serves (the face gives it when it binds the backend to a model: kvpass.attach.attach); None when unbound.
        The runtime asks it once per method, at first use, and never makes a calibration itself."""
        self._resolve = resolve
        self._calibrations = {}
        if self._chess_plan is not None:
            self._chess_plan.restore_layouts()  # the weights go back to the model as it had them
        self._chess_plan = None

    def calibration(self, method=None):
        """The loaded calibration of `method` (default: the attention method); None for methods without one."""
        method = self.config.attention if method is None else method
        if method.method not in self._calibrations and method.needs_calibration:
            if self._resolve is None:
                raise RuntimeError(f"{method.method} needs a calibration, and this kvpass runtime is bound to no "
                                   f"model; use kvpass.compile(model, config) or kvpass.attach")
            self._calibrations[method.method] = self._resolve(method)
        return self._calibrations.get(method.method)

    def chess_plan(self):
        """The CHESS thresholds and weight copies every graph of the model shares (None unless ffn=Chess), made
        from the calibration at the first compile (kvpass.methods.chess)."""
        if self._chess_plan is None and isinstance(self.config.ffn, Chess):
            from .methods.chess import ChessPlan

            self._chess_plan = ChessPlan.from_calibration(self.config.ffn, self.calibration(self.config.ffn))
        return self._chess_plan

    # -- sequence lifecycle -------------------------------------------------------------------------
    def begin_sequence(self, kind: str, capacity: int | None = None) -> None:
        """Drop every layer's state and start a new batch of sequences; nothing carries over.

        kind "cache": driven by a kvpass HF cache (graphs carry its cache_update calls);
        kind "explicit": opened by the user, so graphs without any cache decode incrementally over it.
        capacity: tokens per row the sequence is expected to reach, so stores allocate once."""
        if kind not in ("cache", "explicit"):
            raise ValueError(f"sequence kind={kind!r}; use 'cache' or 'explicit'")
        # Static stores are emptied in place (their addresses are what a recorded decode graph reads); the others
        # are dropped. Either way nothing of the last sequence is visible to the next.
        self._stores = {layer: store for layer, store in self._stores.items() if store.reset()}
        for store in self._stores.values():
            store.capacity_hint = capacity  # a kept store grows to it at the sequence's first append, not mid-decode
        if self._valid is not None:
            self._valid.zero_()
        self.sequence_kind = kind
        self.capacity = capacity
        self.sequences_started += 1

    def release(self) -> None:
        """Free every store and the decode state (the memory is needed elsewhere); recordings that read them go
        stale and are dropped before any replay."""
        self._stores.clear()
        self._valid = None
        self.pool_version += 1
        self.sequence_kind = None

    def end_sequence(self) -> None:
        self._stores = {layer: store for layer, store in self._stores.items() if store.reset()}
        self.sequence_kind = None

    # -- used by the ops ----------------------------------------------------------------------------
    def store(self, layer: int) -> LayerStore:
        if self.sequence_kind is None:
            raise RuntimeError("no kvpass sequence is open for this model: a kvpass cache op ran outside a "
                               "generation; pass past_key_values=kvpass.KVCache(model) or use "
                               "`with kvpass.sequence(model):`")
        store = self._stores.get(layer)
        if store is None:
            store = self._stores[layer] = make_store(self.config.attention, layer, self.capacity,
                                                     calibration=self.calibration())
        return store

    def check_past(self, store: LayerStore, past: int) -> None:
        if store.length != past:
            raise RuntimeError(f"kvpass cache out of sync at layer {store.layer}: the runtime holds {store.length} "
                               f"tokens but the caller says {past} came before. A kvpass cache serves one generation "
                               f"at a time per model; create a new kvpass.KVCache(model) for each generation")

    def attend_stored(self, q, k, v, mask, is_causal, spec: AttentionSpec, layer: int, past: int | None, mode: str):
        """kvpass::attention over the open sequence: store the new tokens' k, v in `layer`, then attend q over
        everything stored. past: the tokens the caller says came before (checked), None to take the store's word;
        mode: the op's mode, by name, for the call counts."""
        store = self.store(layer)
        if past is not None:
            self.check_past(store, past)
        mask = _full_mask(mask, q.shape[2], store.length + k.shape[2])
        self.append(layer, k, v, mask)
        if self.static_decode and mask is not None:
            self._check_window(layer, mask, spec.window, store.length)
        self.calls[(mode, "prefill" if q.shape[2] > 1 else "decode")] += 1
        return store.attend(q, mask, is_causal, spec)

    def attend_one_shot(self, q, k, v, mask, is_causal, spec: AttentionSpec, layer: int, mode: str):
        """kvpass::attention over the keys the graph supplies (k, v: all of them), through the method's
        representation, storing nothing."""
        self.calls[(mode, "prefill" if q.shape[2] > 1 else "decode")] += 1
        mask = _full_mask(mask, q.shape[2], k.shape[2])
        return OneShot(self.config.attention, self.calibration()).attend(q, k, v, mask, is_causal, spec, layer)

    def append(self, layer: int, k, v, mask=None) -> None:
        """Store new tokens' k, v (B, Hkv, L, D|Dv) in `layer`; mask: None or HF's bool mask (.., L, past + L),
        from which the decode engine's slot validity is kept (padding)."""
        store = self.store(layer)
        start = store.length
        store.append(k, v)
        if self.static_decode:
            self._mark_valid(store, mask, start, k.shape[2])

    def load(self, layer: int, k, v, chunk: int = 8192) -> None:
        """Bulk-load real tokens without attention (benchmark fills): k, v (B, Hkv, L, D|Dv) appended `chunk` tokens
        at a time, each settled (LayerStore.settle), so a compressing method never holds more than a chunk of them
        uncompressed."""
        for start in range(0, k.shape[2], chunk):
            self.append(layer, k[:, :, start : start + chunk], v[:, :, start : start + chunk])
            self.store(layer).settle()

    # -- the decode engine's step (kvpass/engine.py) --------------------------------------------------
    def decode(self, q, k, v, spec: AttentionSpec, layer: int):
        """kvpass::decode_attention: store the new token at the device-held slot and attend over every valid
        slot. Runs once when a step is recorded, then only replays: no host state changes here."""
        store = self._stores.get(layer)
        if store is None or self._slot is None:
            raise RuntimeError(f"kvpass decode step at layer {layer} before any prefill stored its prompt: the decode "
                               f"engine starts after a prompt of at least one token")
        self.calls[("decode-engine", "decode")] += 1  # op bodies run: eager steps and recordings, not replays
        return store.decode(q, k, v, spec, self._slot, self._valid)

    def begin_decode_step(self) -> int:
        """Host side before one decode step: make room for one more token in every store, point the device slot
        at it and mark it valid in every row. Returns the slot."""
        slot = self.tokens_held()
        for store in self._stores.values():
            self.pool_version += store.reserve(slot + 1)
        self._valid_for(next(iter(self._stores.values())), slot + 1)[:, slot] = True
        self._slot.fill_(slot)
        return slot

    def end_decode_step(self) -> None:
        """Host side after one decode step ran (or was replayed): every store holds one more token."""
        for store in self._stores.values():
            store.advance(1)

    def positions_of_next_token(self) -> torch.Tensor:
        """(B, 1) int64 position of the next token of each row: slots held minus the row's left padding (its
        first valid slot), for callers that pass no position_ids."""
        first = self._valid.to(torch.int8).argmax(dim=1)
        return (self.tokens_held() - first).unsqueeze(1)

    def _valid_for(self, store, length: int) -> torch.Tensor:
        """The (B, capacity) validity of the slots, (re)allocated to the stores' batch, capacity and device."""
        batch, capacity, device = store.batch, store.capacity, store.device
        valid = self._valid
        if valid is None or valid.shape[0] != batch or valid.shape[1] < capacity or valid.device != device:
            self._valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
            if valid is not None and valid.shape[0] == batch and valid.device == device:
                self._valid[:, : valid.shape[1]] = valid
            self.pool_version += valid is not None
        if self._slot is None or self._slot.device != device:
            self._slot = torch.zeros(1, dtype=torch.int64, device=device)
        return self._valid

    def _check_window(self, layer: int, mask, window: int, length: int) -> None:
        """The decode step reads no HF mask: it sees the valid slots, causal, within the site's window. Check that
        HF's mask says the same for this call's last query (its row over every key: cheap), so a model whose mask
        holds something else fails here, plainly, rather than decoding wrong tokens."""
        last = mask[:, 0, -1, :length]                                        # (Bm, length) bool
        expected = self._valid[:, :length].clone()
        if window:
            expected[:, : max(0, length - window)] = False
        if not torch.equal(last.expand_as(expected), expected):
            raise NotImplementedError(
                f"kvpass decode engine: layer {layer}'s attention mask is not the stored tokens, causal, within a "
                f"window of {window or 'no'} tokens, which is all a decode step sees; kvpass cannot decode this model "
                f"with its engine yet (tell us the model); the window kvpass found may be wrong")

    def _mark_valid(self, store, mask, start: int, count: int) -> None:
        """Record which of the slots [start, start + count) just stored hold real tokens: a token sees itself
        unless it is padding, so the diagonal of HF's bool mask (True = attend) says; no mask: all real."""
        valid = self._valid_for(store, start + count)
        if mask is None:
            valid[:, start : start + count] = True
        else:
            own = torch.diagonal(mask[:, 0, -count:, start : start + count], dim1=-2, dim2=-1)  # (Bm, count)
            valid[:, start : start + count] = own.expand(valid.shape[0], count)

    def cache_update(self, k, v, layer: int, past: int):
        """Unfused cache plumbing (reference semantics): store the new k/v, return all keys/values."""
        store = self.store(layer)
        if store.needs_queries:
            raise NotImplementedError(
                f"{self.config.attention.method} chooses what it keeps or reads from attention scores, which the unfused "
                f"kvpass cache path (layer {layer}: HF attends over materialized keys) never sees. Run the model compiled: "
                f"kvpass.compile(model, config) (inner='eager' runs the rewritten graph without Inductor)")
        self.check_past(store, past)
        self.append(layer, k, v)
        self.unfused_updates += 1
        self.calls[("materialized", "prefill" if k.shape[2] > 1 else "decode")] += 1
        keys, values = store.materialize()
        return keys.to(k.dtype), values.to(v.dtype)

    # -- reporting ----------------------------------------------------------------------------------
    def nbytes(self) -> dict[str, int]:
        total: collections.Counter = collections.Counter()
        for store in self._stores.values():
            total.update(store.nbytes())
        return dict(total)

    def allocated_nbytes(self) -> int:
        """Bytes the stores and the decode state have allocated (static stores keep spare capacity)."""
        state = sum(t.nbytes for t in (self._valid, self._slot) if t is not None)
        return state + sum(store.allocated_nbytes() for store in self._stores.values())

    def layer_stats(self) -> list[dict]:
        """Each layer's method counters (e.g. the wave index's keys read), for layers that keep any."""
        return [stats for _, store in sorted(self._stores.items()) if (stats := store.stats())]

    def tokens_held(self) -> int:
        return max((s.length for s in self._stores.values()), default=0)


def _full_mask(mask, queries: int, keys: int):
    """HF's bool mask (Bm, Hm, Lq or 1, kv_len or 1) as the methods take it, (Bm, Hm, Lq, kv_len): SDPA broadcasts
    a query or key dim of 1, and some models pass one (BERT-like decoders give (1, 1, 1, 1) when every key is
    visible); an expanded view, no copy."""
    if mask is None or mask.shape[-2:] == (queries, keys):
        return mask
    return mask.expand(*mask.shape[:2], queries, keys)


def lookup(runtime_id: int) -> Runtime:
    runtime = _RUNTIMES.get(runtime_id)
    if runtime is None:
        raise RuntimeError(f"kvpass runtime {runtime_id} no longer exists (its backend was garbage-collected); "
                           f"keep a reference to the kvpass backend while the compiled model is used")
    return runtime
