"""The `kvpass` ONNX domain: the nodes of kvpass methods that have no standard ONNX form (AnTKV's anchor choice
and coded attention), as kvpass.portable_onnx writes them and as onnx's reference evaluator runs them.

- `antkv_attention`: the exporter's translation of kvpass::static_antkv_attention_functional into one
  `kvpass.StaticAnTKVAttention` node (an onnxscript function the optimizer inlines). Inputs: q, k, v, the layer's
  state (kvpass.methods.antkv.STATE_NAMES order), book_k, book_v, whitening, inv_freq (empty where none), valid,
  cache_position; attributes rope_scaling, method, scale, softcap, window; outputs: the attention output, then the
  written state.
- `KVPASS_OPS`: `new_ops` for onnx.reference.ReferenceEvaluator, running each node with kvpass's op.

Imports onnx and onnxscript (the `export` extra).
"""
from __future__ import annotations

import numpy as np
import onnxscript
import torch
from onnx.reference.op_run import OpRun
from onnxscript.onnx_types import TensorType

from .methods.antkv import STATE_NAMES as ANTKV_STATE_NAMES

__all__ = ["DOMAIN", "KVPASS_OPS", "antkv_attention"]

DOMAIN = "kvpass"
_kvpass = onnxscript.values.Opset(DOMAIN, 1)
_ANTKV_OUTPUTS = tuple[(TensorType,) * (1 + len(ANTKV_STATE_NAMES))]   # the output, then the written state


@onnxscript.script(_kvpass)
def antkv_attention(q, k, v, codes_k, codes_v, anchor_slot, anchor_k, anchor_v, ring_k, ring_v, ring_stats,
                    exact_start, finalized_seen, anchor_count, weakest, position_offset, book_k, book_v, whitening,
                    inv_freq, rope_scaling: float, valid, cache_position, method: str, scale: float, softcap: float,
                    window: int) -> _ANTKV_OUTPUTS:
    (out, codes_k_out, codes_v_out, anchor_slot_out, anchor_k_out, anchor_v_out, ring_k_out, ring_v_out,
     ring_stats_out, exact_start_out, finalized_seen_out, anchor_count_out, weakest_out,
     position_offset_out) = _kvpass.StaticAnTKVAttention(
        q, k, v, codes_k, codes_v, anchor_slot, anchor_k, anchor_v, ring_k, ring_v, ring_stats, exact_start,
        finalized_seen, anchor_count, weakest, position_offset, book_k, book_v, whitening, inv_freq, valid,
        cache_position, rope_scaling=rope_scaling, method=method, scale=scale, softcap=softcap, window=window)
    return (out, codes_k_out, codes_v_out, anchor_slot_out, anchor_k_out, anchor_v_out, ring_k_out, ring_v_out,
            ring_stats_out, exact_start_out, finalized_seen_out, anchor_count_out, weakest_out, position_offset_out)


class StaticAnTKVAttention(OpRun):
    """kvpass.StaticAnTKVAttention in onnx's reference evaluator: kvpass::static_antkv_attention_functional over
    the node's inputs (numpy arrays, shared with torch without a copy where they are contiguous and writable)."""

    op_domain = DOMAIN

    def _run(self, *inputs, rope_scaling=None, method=None, scale=None, softcap=None, window=None):
        *tensors, valid, cache_position = (torch.from_numpy(np.require(x, requirements=("C", "W"))) for x in inputs)
        outputs = torch.ops.kvpass.static_antkv_attention_functional(
            *tensors, rope_scaling, valid, cache_position, method, scale, softcap, window)
        return tuple(t.numpy() for t in outputs)


KVPASS_OPS = [StaticAnTKVAttention]
