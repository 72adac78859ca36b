"""kvpass operators, registered with torch.library so Dynamo, AOTAutograd, Inductor and torch.export
treat them as opaque calls with known output shapes (`register_fake`).

- `kvpass::attention`: stateful attention keyed by (runtime id, layer id). Tagged cudagraph_unsafe so
  Inductor splits CUDA graphs around it (piecewise capture), and it copies what it stores, never
  keeping references to its inputs.
- `kvpass::decode_attention`: one decode step of the same, driven by the runtime's decode engine
  (kvpass/engine.py): it stores the new token at the position the runtime holds on the device and masks by
  the runtime's per-slot validity, so its arguments never change between steps and a CUDA graph recorded
  once replays it. It allocates nothing whose size depends on the length and never synchronizes.
- `kvpass::cache_update`: the kvpass HF cache's update. The attention rewrite fuses it into
  `kvpass::attention`; left unfused it still gives the right answer (stores the new k/v, returns all).
- `kvpass::static_attention`: attention over a KV store the caller passes and the op writes (no runtime): the
  op of an exported program (kvpass/portable.py), whose cache is the program's own buffers;
  `kvpass::static_attention_functional` returns the written stores instead (ONNX: the cache in, the cache out);
  `kvpass::static_kivi_attention` is the same over a KIVI store (quantized parts and exact rings), and
  `kvpass::static_antkv_attention` over an AnTKV store (codes, anchors, the window ring and the anchor counts),
  `kvpass::static_antkv_attention_functional` its functional form.
The stateless FFN ops (`kvpass::ffn`, `kvpass::sparse_linear`) are in kvpass/ffn_ops.py.
"""
from __future__ import annotations

import json

import torch
from torch import Tensor

from . import kernels_dispatch
from . import runtime as _runtime
from .config import KIVI, AnTKV
from .methods.antkv import STATE_NAMES as ANTKV_STATE_NAMES
from .methods.antkv import AnTKVStore, batch_rows
from .methods.base import AttentionSpec
from .methods.kivi import BUFFER_NAMES as KIVI_BUFFER_NAMES
from .methods.kivi import KIVIStore

# How the attention op finds its past: decided by the graph rewrite (kvpass.patterns.matchers), baked into each
# kvpass::attention call as its `mode` argument, read here (the runtime never sees a mode).
MODE_ONESHOT = 0  # the graph supplies all keys (no cache, or a foreign cache such as HF DynamicCache)
MODE_CACHED = 1   # keys of the new tokens only; the past is in the runtime (kvpass HF cache)
MODE_AUTO = 2     # keys of the new tokens only; use the open sequence if any, else behave as one-shot
MODES = {MODE_ONESHOT: "one-shot", MODE_CACHED: "kvpass-cache", MODE_AUTO: "auto"}

_UNSAFE_FOR_CUDAGRAPHS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


def _attend_mask(mask: Tensor | None) -> Tensor | None:
    """HF passes bool masks (True = attend) to SDPA and additive float masks (0 / dtype min) to eager
    attention; methods take bool. Other additive biases (ALiBi-like) are not supported: refuse them.

    The rewrite refuses the biases it sees in the graph at compile time; this catches one hidden in the mask's
    values. The check reads the mask on the host, a device sync: on a GPU only for masks of several query rows
    (a prefill, run once per prompt and never captured), which a model with biases always passes first; a
    one-row mask (an uncaptured decode step) is checked on the CPU only, where it costs nothing."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    attend = mask == 0
    if not mask.is_cuda or mask.shape[-2] > 1:
        blocked = mask <= torch.finfo(mask.dtype).min / 2
        if not bool((attend | blocked).all()):
            raise NotImplementedError("kvpass attention got an additive mask with biases other than 0 and -inf "
                                      "(ALiBi or relative positions?); kvpass takes padding/causal/window masks only: "
                                      "run this model without kvpass attention")
    return attend


@torch.library.custom_op("kvpass::attention", mutates_args=(), tags=_UNSAFE_FOR_CUDAGRAPHS)
def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, scale: float,
              softcap: float, window: int, mode: int, runtime: int, layer: int, past: int) -> Tensor:
    """q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D|Dv) with Lk = Lq (cached/auto modes: the new tokens) or
    the whole key range (one-shot); mask: None or (Bm, Hm, Lq, past + Lq) bool/additive over all keys.
    Returns (B, Hq, Lq, Dv), contiguous."""
    spec = AttentionSpec(scale=float(scale), softcap=float(softcap), window=int(window))
    rt = _runtime.lookup(runtime)
    mask = _attend_mask(mask)
    if mode == MODE_CACHED or (mode == MODE_AUTO and rt.sequence_kind == "explicit"):
        out = rt.attend_stored(q, k, v, mask, is_causal, spec, layer, past if mode == MODE_CACHED else None,
                               MODES[mode])
    else:
        out = rt.attend_one_shot(q, k, v, mask, is_causal, spec, layer, MODES[MODE_ONESHOT])
    return out.contiguous()


@attention.register_fake
def _(q, k, v, mask, is_causal, scale, softcap, window, mode, runtime, layer, past):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@torch.library.custom_op("kvpass::decode_attention", mutates_args=(), tags=_UNSAFE_FOR_CUDAGRAPHS)
def decode_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: float, window: int, runtime: int,
                     layer: int) -> Tensor:
    """q: (B, Hq, 1, D); k, v: (B, Hkv, 1, D|Dv), the new token. Returns (B, Hq, 1, Dv), contiguous.
    The runtime (kvpass.runtime.Runtime.decode) stores k, v and attends over everything stored."""
    spec = AttentionSpec(scale=float(scale), softcap=float(softcap), window=int(window))
    return _runtime.lookup(runtime).decode(q, k, v, spec, layer).contiguous()


@decode_attention.register_fake
def _(q, k, v, scale, softcap, window, runtime, layer):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@torch.library.custom_op("kvpass::cache_update", mutates_args=(), tags=_UNSAFE_FOR_CUDAGRAPHS)
def cache_update(k: Tensor, v: Tensor, runtime: int, layer: int, past: int) -> tuple[Tensor, Tensor]:
    """k, v: (B, Hkv, L, D) new tokens; returns (B, Hkv, past + L, D) keys and values of everything stored."""
    keys, values = _runtime.lookup(runtime).cache_update(k, v, layer, past)
    return keys.contiguous(), values.contiguous()


@cache_update.register_fake
def _(k, v, runtime, layer, past):
    B, H, L, _ = k.shape
    return k.new_empty(B, H, past + L, k.shape[-1]), v.new_empty(B, H, past + L, v.shape[-1])


@torch.library.custom_op("kvpass::static_attention", mutates_args=("k_store", "v_store"))
def static_attention(q: Tensor, k: Tensor, v: Tensor, k_store: Tensor, v_store: Tensor, valid: Tensor,
                     cache_position: Tensor, scale: float, softcap: float, window: int) -> Tensor:
    """Attention of new tokens over a KV store the caller owns (no runtime): an exported program's cache
    (kvpass.portable), whose buffers travel with the program.

    q: (B, Hq, L, D); k, v: (B, Hkv, L, D|Dv), the new tokens, written into k_store, v_store (Bmax, Hkv, S, D|Dv)
    at slots cache_position (L,) int64, consecutive; rows B.. of the stores are left alone. valid: (Bmax, S) bool,
    False for padding slots (the caller keeps it). The new tokens see the valid slots up to their own (causal),
    within the sliding window if window > 0. Returns (B, Hq, L, Dv), contiguous."""
    batch = q.shape[0]
    k_store[:batch].index_copy_(2, cache_position, k.to(k_store.dtype))
    v_store[:batch].index_copy_(2, cache_position, v.to(v_store.dtype))
    out = kernels_dispatch.attention(q, k_store[:batch], v_store[:batch], mask=None, is_causal=True, scale=scale,
                                     softcap=softcap, window=window, valid=valid[:batch],
                                     q_start=cache_position[:1])
    return out.contiguous()


@static_attention.register_fake
def _(q, k, v, k_store, v_store, valid, cache_position, scale, softcap, window):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@torch.library.custom_op("kvpass::static_kivi_attention", mutates_args=KIVI_BUFFER_NAMES)
def static_kivi_attention(q: Tensor, k: Tensor, v: Tensor, key_codes: Tensor, key_scale: Tensor, key_zero: Tensor,
                          value_codes: Tensor, value_scale: Tensor, value_zero: Tensor, ring_k: Tensor, ring_v: Tensor,
                          valid: Tensor, cache_position: Tensor, bits: int, group: int, residual: int, scale: float,
                          softcap: float, window: int) -> Tensor:
    """`static_attention` over a KIVI store the caller owns (an exported program's, kvpass.portable): the buffers of
    `kvpass.methods.kivi.quantized_buffers` and `exact_rings` for Bmax rows, of which rows :B are the batch's. The
    new tokens enter the store as KIVIStore appends them (the oldest exact ones leave and are quantized), then
    attend over the held tokens dequantized, with the same visibility as `static_attention`. The store's length is
    cache_position[0] (read on the host: the program runs eagerly, one call per prompt or token). Returns
    (B, Hq, L, Dv), contiguous."""
    batch = q.shape[0]
    keys, values = (key_codes, key_scale, key_zero), (value_codes, value_scale, value_zero)
    store = KIVIStore.over_buffers(KIVI(bits=bits, group=group, residual=residual),
                                   [part[:batch] for part in keys], [part[:batch] for part in values],
                                   ring_k[:batch], ring_v[:batch], length=int(cache_position[0]))
    store.append(k, v)
    held_k, held_v = store.materialize()
    out = kernels_dispatch.attention(q, held_k, held_v, mask=None, is_causal=True, scale=scale, softcap=softcap,
                                     window=window, valid=valid[:batch, : held_k.shape[2]], q_start=cache_position[:1])
    return out.contiguous()


@static_kivi_attention.register_fake
def _(q, k, v, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, ring_k, ring_v, valid,
      cache_position, bits, group, residual, scale, softcap, window):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@torch.library.custom_op("kvpass::static_antkv_attention", mutates_args=ANTKV_STATE_NAMES)
def static_antkv_attention(q: Tensor, k: Tensor, v: Tensor, codes_k: Tensor, codes_v: Tensor, anchor_slot: Tensor,
                           anchor_k: Tensor, anchor_v: Tensor, ring_k: Tensor, ring_v: Tensor, ring_stats: Tensor,
                           exact_start: Tensor, finalized_seen: Tensor, anchor_count: Tensor, weakest: Tensor,
                           position_offset: Tensor, book_k: Tensor, book_v: Tensor, whitening: Tensor | None,
                           inv_freq: Tensor | None, rope_scaling: float, valid: Tensor, cache_position: Tensor,
                           method: str, scale: float, softcap: float, window: int) -> Tensor:
    """`static_attention` over an AnTKV store the caller owns (an exported program's, kvpass.portable): the state
    buffers of `AnTKVStore.program_state` for Bmax rows (rows :B are the batch's) and its constants (codebooks, key
    whitening, RoPE frequencies). method: the AnTKV configuration as JSON (AnTKV.to_dict()). The new tokens are
    appended and attended as AnTKVStore.attend does (their scores choose the anchors), with the visibility of
    `static_attention`; the store's length is cache_position[0] (read on the host: the program runs eagerly, one
    call per prompt or token). Returns (B, Hq, L, Dv), contiguous."""
    batch, count = q.shape[0], q.shape[2]
    buffers = (codes_k, codes_v, anchor_slot, anchor_k, anchor_v, ring_k, ring_v, ring_stats, exact_start,
               finalized_seen, anchor_count, weakest, position_offset)
    state = {name: batch_rows(name, buffer, batch) for name, buffer in zip(ANTKV_STATE_NAMES, buffers)}
    length = int(cache_position[0])
    constants = (book_k, book_v, whitening, inv_freq, rope_scaling)
    store = AnTKVStore.over_buffers(AnTKV(**json.loads(method)), state, constants, length)
    store.append(k, v)
    # HF's boolean mask for these queries (True = attend): the valid slots up to each query's own, in the window.
    keys = torch.arange(length + count, device=q.device)
    queries = cache_position[:, None]
    seen = (keys <= queries) & valid[:batch, None, None, : length + count]
    if window:
        seen = seen & (keys > queries - window)
    out = store.attend(q, seen, True, AttentionSpec(scale=scale, softcap=softcap, window=window))
    store.write_back(state)
    return out.contiguous()


@static_antkv_attention.register_fake
def _(q, k, v, *args):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@torch.library.custom_op("kvpass::static_antkv_attention_functional", mutates_args=())
def static_antkv_attention_functional(
        q: Tensor, k: Tensor, v: Tensor, codes_k: Tensor, codes_v: Tensor, anchor_slot: Tensor, anchor_k: Tensor,
        anchor_v: Tensor, ring_k: Tensor, ring_v: Tensor, ring_stats: Tensor, exact_start: Tensor,
        finalized_seen: Tensor, anchor_count: Tensor, weakest: Tensor, position_offset: Tensor, book_k: Tensor,
        book_v: Tensor, whitening: Tensor, inv_freq: Tensor, rope_scaling: float, valid: Tensor,
        cache_position: Tensor, method: str, scale: float, softcap: float,
        window: int) -> tuple[(Tensor,) * (1 + len(ANTKV_STATE_NAMES))]:
    """`static_antkv_attention` that returns the written state (new tensors, in ANTKV_STATE_NAMES order) after the
    output instead of writing the caller's: the form of programs that hold no state (ONNX, kvpass.portable_onnx).
    whitening and inv_freq: empty tensors where the configuration has none (an ONNX node's inputs are
    positional, so none is left out)."""
    state = [t.clone() for t in (codes_k, codes_v, anchor_slot, anchor_k, anchor_v, ring_k, ring_v, ring_stats,
                                 exact_start, finalized_seen, anchor_count, weakest, position_offset)]
    out = static_antkv_attention(q, k, v, *state, book_k, book_v, whitening if whitening.numel() else None,
                                 inv_freq if inv_freq.numel() else None, rope_scaling, valid, cache_position, method,
                                 scale, softcap, window)
    return (out, *state)


@static_antkv_attention_functional.register_fake
def _(q, k, v, *args):
    state = args[:len(ANTKV_STATE_NAMES)]
    return (q.new_empty(*q.shape[:-1], v.shape[-1]), *(torch.empty_like(t) for t in state))


@torch.library.custom_op("kvpass::static_attention_functional", mutates_args=())
def static_attention_functional(q: Tensor, k: Tensor, v: Tensor, k_store: Tensor, v_store: Tensor, valid: Tensor,
                                cache_position: Tensor, scale: float, softcap: float,
                                window: int) -> tuple[Tensor, Tensor, Tensor]:
    """`static_attention` that returns the written stores (new tensors) instead of writing the caller's: the form
    for runtimes whose programs hold no state, such as ONNX, where the cache is an input and an output of each
    call (kvpass.portable_onnx). Returns (out, k_store written, v_store written)."""
    k_store, v_store = k_store.clone(), v_store.clone()
    return static_attention(q, k, v, k_store, v_store, valid, cache_position, scale, softcap, window), k_store, v_store


@static_attention_functional.register_fake
def _(q, k, v, k_store, v_store, valid, cache_position, scale, softcap, window):
    return q.new_empty(*q.shape[:-1], v.shape[-1]), torch.empty_like(k_store), torch.empty_like(v_store)
