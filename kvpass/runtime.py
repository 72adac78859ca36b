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

from .config import Chess, Config
from .methods import LayerStore, OneShot, make_store
from .methods.base import AttentionSpec

_RUNTIMES: "weakref.WeakValueDictionary[int, Runtime]" = weakref.WeakValueDictionary()
_NEXT_ID = itertools.count(1)

# How the attention op finds its past, decided by the graph rewrite and baked into the op call.
MODE_ONESHOT = 0  # the graph supplies all keys (no cache, or a foreign cache such as HF DynamicCache)
MODE_CACHED = 1   # keys of the new tokens only; the past is in the runtime (kvpass HF cache)
MODE_AUTO = 2     # keys of the new tokens only; use the open sequence if any, else behave as one-shot
MODES = {MODE_ONESHOT: "one-shot", MODE_CACHED: "kvpass-cache", MODE_AUTO: "auto"}


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
        self._model = None                   # weakref to the model served (set by the backend when bound)
        self._calibrations: dict[str, object] = {}  # method name -> its Calibration
        self._chess_plan = None

    def bind_model(self, model) -> None:
        self._model = None if model is None else weakref.ref(model)
        self._calibrations = {}
        self._chess_plan = None

    def calibration(self, method=None):
        """The calibration of `method` (default: the attention method): kvpass.calibration.resolve gives the
        config's artefact, or the cached automatic one, made on first use; None for methods without one."""
        from .calibration import needs_calibration, resolve

        method = self.config.attention if method is None else method
        if method.method not in self._calibrations and needs_calibration(method):
            model = None if self._model is None else self._model()
            if model is None:
                raise RuntimeError(f"{method.method} needs a calibration, and this kvpass runtime is bound to no "
                                   f"model; use kvpass.compile(model, config) or kvpass.attach")
            self._calibrations[method.method] = resolve(model, method, self.config.calibration)
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
        self._stores.clear()
        self.sequence_kind = kind
        self.capacity = capacity
        self.sequences_started += 1

    def end_sequence(self) -> None:
        self._stores.clear()
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

    def attention(self, q, k, v, mask, is_causal, spec: AttentionSpec, mode: int, layer: int, past: int):
        phase = "prefill" if q.shape[2] > 1 else "decode"
        if mode == MODE_CACHED or (mode == MODE_AUTO and self.sequence_kind == "explicit"):
            store = self.store(layer)
            if mode == MODE_CACHED:
                self.check_past(store, past)
            store.append(k, v)
            self.calls[(MODES[mode], phase)] += 1
            return store.attend(q, mask, is_causal, spec)
        self.calls[("one-shot", phase)] += 1
        return OneShot(self.config.attention, self.calibration()).attend(q, k, v, mask, is_causal, spec, layer)

    def cache_update(self, k, v, layer: int, past: int):
        """Unfused cache plumbing (reference semantics): store the new k/v, return all keys/values."""
        store = self.store(layer)
        if store.needs_queries:
            raise NotImplementedError(
                f"{self.config.attention.method} chooses what it keeps or reads from attention scores, which the unfused "
                f"kvpass cache path (layer {layer}: HF attends over materialized keys) never sees. Run the model compiled: "
                f"kvpass.compile(model, config) (inner='eager' runs the rewritten graph without Inductor)")
        self.check_past(store, past)
        store.append(k, v)
        self.calls[("materialized", "prefill" if k.shape[2] > 1 else "decode")] += 1
        keys, values = store.materialize()
        return keys.to(k.dtype), values.to(v.dtype)

    # -- reporting ----------------------------------------------------------------------------------
    def nbytes(self) -> dict[str, int]:
        total: collections.Counter = collections.Counter()
        for store in self._stores.values():
            total.update(store.nbytes())
        return dict(total)

    def layer_stats(self) -> list[dict]:
        """Each layer's method counters (e.g. the wave index's keys read), for layers that keep any."""
        return [stats for _, store in sorted(self._stores.items()) if (stats := store.stats())]

    def tokens_held(self) -> int:
        return max((s.length for s in self._stores.values()), default=0)


def lookup(runtime_id: int) -> Runtime:
    runtime = _RUNTIMES.get(runtime_id)
    if runtime is None:
        raise RuntimeError(f"kvpass runtime {runtime_id} no longer exists (its backend was garbage-collected); "
                           f"keep a reference to the kvpass backend while the compiled model is used")
    return runtime
