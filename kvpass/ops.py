"""kvpass operators, registered with torch.library so Dynamo, AOTAutograd, Inductor and torch.export
treat them as opaque calls with known output shapes (`register_fake`).

- `kvpass::attention`: stateful attention keyed by (runtime id, layer id). Tagged cudagraph_unsafe so
  Inductor splits CUDA graphs around it (piecewise capture), and it copies what it stores, never
  keeping references to its inputs.
- `kvpass::cache_update`: the kvpass HF cache's update. The attention rewrite fuses it into
  `kvpass::attention`; left unfused it still gives the right answer (stores the new k/v, returns all).
- `kvpass::ffn`: a whole FFN site (gated or plain) as one call, exact or with CHESS thresholds.
- `kvpass::sparse_linear`: a projection whose small inputs are zeroed (CHESS+ query and output projections).
Both take their thresholds and the input-major weight copies the sparse kernels read from the runtime's CHESS
plan (graph constants would have to pass AOTAutograd's check that every parameter comes from Dynamo).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import kernels_dispatch
from . import runtime as _runtime
from .methods.base import AttentionSpec
from .methods.ffn import ACTIVATIONS

_UNSAFE_FOR_CUDAGRAPHS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


def _attend_mask(mask: Tensor | None) -> Tensor | None:
    """HF passes bool masks (True = attend) to SDPA and additive float masks (0 / dtype min) to eager
    attention; methods take bool. Other additive biases (ALiBi-like) are not supported: refuse them."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    attend = mask == 0
    if not mask.is_cuda:  # the check syncs the device: only where it is free
        blocked = mask <= torch.finfo(mask.dtype).min / 2
        if not bool((attend | blocked).all()):
            raise NotImplementedError("kvpass attention got an additive mask with biases other than 0 and -inf; "
                                      "only padding/causal/window masks are supported")
    return attend


@torch.library.custom_op("kvpass::attention", mutates_args=(), tags=_UNSAFE_FOR_CUDAGRAPHS)
def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, scale: float,
              softcap: float, window: int, mode: int, runtime: int, layer: int, past: int) -> Tensor:
    """q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D|Dv) with Lk = Lq (cached/auto modes: the new tokens) or
    the whole key range (one-shot); mask: None or (Bm, Hm, Lq, past + Lq) bool/additive over all keys.
    Returns (B, Hq, Lq, Dv), contiguous."""
    spec = AttentionSpec(scale=float(scale), softcap=float(softcap), window=int(window))
    rt = _runtime.lookup(runtime)
    return rt.attention(q, k, v, _attend_mask(mask), is_causal, spec, mode, layer, past).contiguous()


@attention.register_fake
def _(q, k, v, mask, is_causal, scale, softcap, window, mode, runtime, layer, past):
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


@torch.library.custom_op("kvpass::ffn", mutates_args=())
def ffn(x: Tensor, w_up: Tensor, b_up: Tensor | None, w_down: Tensor, b_down: Tensor | None,
        w_gate: Tensor | None, b_gate: Tensor | None, activation: str, runtime: int, layer: int) -> Tensor:
    """x: (..., H); w_* in nn.Linear layout (out, in). Returns (..., w_down.shape[0]): the exact FFN, or with the
    runtime's CHESS thresholds for `layer` its thresholded form (kvpass.methods.chess)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not one of {sorted(ACTIVATIONS)}")
    plan = _runtime.lookup(runtime).chess_plan()
    thresholds = None if plan is None else plan.ffn_thresholds(layer, w_down.shape[1], x.device)
    return kernels_dispatch.ffn(x, w_up, b_up, w_down, b_down, w_gate, b_gate, activation, thresholds,
                                None if plan is None else plan.input_major).contiguous()


@ffn.register_fake
def _(x, w_up, b_up, w_down, b_down, w_gate, b_gate, activation, runtime, layer):
    return x.new_empty(*x.shape[:-1], w_down.shape[0])


@torch.library.custom_op("kvpass::sparse_linear", mutates_args=())
def sparse_linear(x: Tensor, weight: Tensor, bias: Tensor | None, threshold: float, runtime: int) -> Tensor:
    """x: (..., K) with entries |x| < threshold zeroed, through a projection weight: (N, K) in nn.Linear layout,
    plus bias. Returns (..., N): CHESS+'s thresholded query and output projections."""
    plan = _runtime.lookup(runtime).chess_plan()
    return kernels_dispatch.sparse_linear(x, weight, bias, float(threshold), plan.input_major).contiguous()


@sparse_linear.register_fake
def _(x, weight, bias, threshold, runtime):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
