"""A `transformers.Cache` whose data lives in the kvpass runtime.

HF's bookkeeping stays exact (sequence length, positions, mask sizes: the same as DynamicCache, so HF
builds the full (q, past + q) mask with padding and sliding windows); each layer's `update` calls
`kvpass::cache_update`. Compiled, the attention rewrite fuses that call into `kvpass::attention`, so the
graph carries only the new tokens and the op attends over the store. Eager (not compiled), the op stores
and returns everything stored, and HF's own attention computes the method's reference semantics.
"""
from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import ops  # noqa: F401  (registers torch.ops.kvpass.*)
from .backend import backend_of


def recurrent_layers(model) -> bool:
    """Whether HF's cache for this model holds recurrent state (Mamba, linear attention, convolutions: hybrid
    models), which the kvpass cache, keys and values only, does not. Read from the layers HF's own DynamicCache
    makes for the model's config (transformers versions without LinearAttentionCacheLayerMixin: False)."""
    from transformers import DynamicCache, cache_utils

    recurrent = getattr(cache_utils, "LinearAttentionCacheLayerMixin", None)
    if recurrent is None or not hasattr(model, "config"):
        return False
    try:
        layers = DynamicCache(config=model.config.get_text_config(decoder=True)).layers
    except Exception:  # noqa: BLE001 - a config HF's cache cannot read: HF would not make one either
        return False
    return any(isinstance(layer, recurrent) for layer in layers)


def takes_a_cache(model) -> bool:
    """Whether the model's forward takes a cache at all (OpenAI GPT's takes none)."""
    parameters = inspect.signature(type(model).forward).parameters
    return "cache" in parameters or "past_key_values" in parameters


def cache_argument(model) -> str:
    """The name under which this model's forward (and so generate) takes a cache: `cache` since transformers 5.2x
    renamed it (the old `past_key_values` still works there, with a FutureWarning), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


class _RuntimeLayer(CacheLayerMixin):
    """One decoder layer's view of the runtime store. Holds only the count of tokens seen."""

    is_sliding = False  # kvpass keeps every token; HF's masks apply sliding windows
    is_compileable = False

    def __init__(self, runtime_id: int, layer_idx: int):
        super().__init__()
        self.runtime_id = runtime_id
        self.layer_idx = layer_idx
        self.seen = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.is_initialized = True
        keys, values = torch.ops.kvpass.cache_update(key_states, value_states, self.runtime_id, self.layer_idx,
                                                     self.seen)
        self.seen += key_states.shape[-2]
        return keys, values

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen = 0

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("the kvpass cache does not support beam search, cropping or batch re-indexing "
                                  "yet; use greedy or sampling decoding (num_beams=1)")

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _unsupported


class KVCache(Cache):
    """HF cache backed by the kvpass runtime of `model`. Creating one starts a new sequence batch:
    whatever the runtime held before is dropped, so nothing leaks between generations."""

    def __init__(self, model: torch.nn.Module, capacity: int | None = None):
        """capacity: tokens per row the generation will reach (prompt + new tokens), if known: the runtime then
        allocates each layer's store once instead of growing it."""
        backend = backend_of(model, required=True)
        self.runtime = backend.runtime
        n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[_RuntimeLayer(self.runtime.id, i) for i in range(n_layers)])
        self.capacity = capacity
        self.runtime.begin_sequence(kind="cache", capacity=capacity)

    def reset(self):
        super().reset()
        self.runtime.begin_sequence(kind="cache", capacity=self.capacity)
