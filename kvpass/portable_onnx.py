"""A dense kvpass model as an ONNX model that onnxruntime runs without kvpass: the decoder with its KV cache as
inputs and outputs of every call (ONNX programs hold no state), and kvpass's attention op translated to the
standard opset-23 `Attention` operator.

    kvpass.portable_onnx.export(model, "model.onnx")                 # torch.onnx.export(dynamo=True) underneath
    tokens = kvpass.portable_onnx.generate("model.onnx", input_ids, attention_mask, max_new_tokens=32,
                                           cache_len=1024)          # onnxruntime

The model's inputs: input_ids, attention_mask, position_ids (B, L) int64, cache_position (L,) int64, `valid` (B, S)
bool and per layer `keys_<i>`, `values_<i>` (B, kv heads, S, head dim): S is the cache's length, the caller's choice
(zeros and all-False start a sequence). Outputs: the last token's `logits` (B, V), then `valid` and the stores with
the new tokens written, to pass to the next call. Dense attention only: the other methods' state and kernels have
no ONNX form yet (KIVI exports to a .pt2 through kvpass.export; AnTKV, the wave index and CHESS to neither).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .config import Config, Dense
from .portable import attention_implementation, check_method, serving, store_shapes

__all__ = ["export", "generate", "OnnxDecoder"]

OPSET = 23   # the first opset with the Attention operator (GQA, boolean masks, scale, softcap)


class OnnxDecoder(torch.nn.Module):
    """What the ONNX exporter traces: forward(input_ids, attention_mask, position_ids, cache_position, valid,
    *stores) -> (logits, valid, *stores), the stores ordered keys_0, values_0, keys_1, ... (see the module doc)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.layers = len(store_shapes(model))

    def attend(self, layer: int, query, key, value, scale: float, softcap: float, window: int) -> Tensor:
        """The layer's new tokens written into (new copies of) its stores and attended
        (kvpass::static_attention_functional)."""
        out, self.written[2 * layer], self.written[2 * layer + 1] = torch.ops.kvpass.static_attention_functional(
            query, key, value, self.written[2 * layer], self.written[2 * layer + 1], self.valid, self.cache_position,
            scale, softcap, window)
        return out

    def forward(self, input_ids, attention_mask, position_ids, cache_position, valid, *stores):
        self.valid = valid.index_copy(1, cache_position, attention_mask.bool())
        self.cache_position, self.written = cache_position, list(stores)
        with serving(self):
            out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=1)
        return (out.logits[:, -1], self.valid, *self.written)


def _attention_in_onnx(q, k, v, k_store, v_store, valid, cache_position, scale: float, softcap: float, window: int):
    """kvpass::static_attention_functional in standard ONNX (onnxscript, opset 23): the new tokens scattered into
    rows :B of the stores at cache_position, then Attention over the stores under the visibility rule of the
    kvpass kernels (valid slots, causal, window), rows that see nothing set to 0 as the kernels do."""
    from onnxscript import opset23 as op

    zero, one = op.Constant(value_ints=[0]), op.Constant(value_ints=[1])
    batch = op.Shape(q, start=0, end=1)
    rest = op.Constant(value_ints=[2**62])

    def write(store, new):
        rows = op.Slice(store, zero, batch, zero)
        tokens = op.Shape(new, start=2, end=3)
        slots = op.Expand(op.Reshape(cache_position, op.Concat(one, one, tokens, one, axis=0)), op.Shape(new))
        written = op.ScatterElements(rows, slots, op.CastLike(new, store), axis=2)
        return op.Concat(written, op.Slice(store, batch, rest, zero), axis=0), written

    k_all, k_rows = write(k_store, k)
    v_all, v_rows = write(v_store, v)
    slots = op.Range(op.Constant(value_int=0), op.Squeeze(op.Shape(k_store, start=2, end=3), zero),
                     op.Constant(value_int=1))                                     # (S,)
    key_slot, query_slot = op.Unsqueeze(slots, zero), op.Unsqueeze(cache_position, one)   # (1, S), (L, 1)
    visible = op.LessOrEqual(key_slot, query_slot)                                # (L, S): causal
    if window > 0:
        visible = op.And(visible, op.Greater(key_slot, op.Sub(query_slot, op.Constant(value_int=window))))
    mask = op.And(op.Unsqueeze(op.Slice(valid, zero, batch, zero), op.Constant(value_ints=[1, 2])),
                  op.Unsqueeze(visible, op.Constant(value_ints=[0, 1])))          # (B, 1, L, S)
    out = op.Attention(q, op.CastLike(k_rows, q), op.CastLike(v_rows, q), mask, scale=scale, softcap=softcap)[0]
    sees = op.ReduceMax(op.Cast(mask, to=1), op.Constant(value_ints=[3]), keepdims=1)   # (B, 1, L, 1): 1 or 0
    out = op.Where(op.Cast(sees, to=9), out, op.CastLike(op.Constant(value_float=0.0), out))
    return out, k_all, v_all


def _names(layers: int) -> list[str]:
    return [f"{part}_{layer}" for layer in range(layers) for part in ("keys", "values")]


def export(model, path, config: Config | None = None) -> Path:
    """Write `model` (an HF decoder, dense kvpass attention) as an ONNX model to `path`; see the module doc."""
    config = config or Config()
    check_method(config, attention=(Dense,), to="kvpass.portable_onnx.export")
    module = OnnxDecoder(model).eval()
    shapes = store_shapes(model)
    device = next(model.parameters()).device
    batch, tokens, cache = 2, 2, 4       # example sizes; all three are dynamic in the program
    slots = torch.arange(tokens, device=device)
    stores = [torch.zeros(batch, heads, cache, dim, dtype=dtype, device=device)
              for heads, key_dim, value_dim, dtype in shapes.values() for dim in (key_dim, value_dim)]
    args = (torch.ones(batch, tokens, dtype=torch.long, device=device), torch.ones(batch, tokens, dtype=torch.long,
            device=device), slots.repeat(batch, 1), slots, torch.zeros(batch, cache, dtype=torch.bool, device=device),
            *stores)
    b, t, s = (torch.export.Dim(name, min=1) for name in ("batch", "tokens", "cache"))
    dynamic = ({0: b, 1: t}, {0: b, 1: t}, {0: b, 1: t}, {0: t}, {0: b, 1: s}, tuple({0: b, 2: s} for _ in stores))
    names = _names(len(shapes))
    with attention_implementation(model), torch.no_grad():
        program = torch.onnx.export(
            module, args, dynamic_shapes=dynamic, dynamo=True, opset_version=OPSET, verbose=False,
            input_names=["input_ids", "attention_mask", "position_ids", "cache_position", "valid", *names],
            output_names=["logits", "valid_out", *(f"{name}_out" for name in names)],
            custom_translation_table={torch.ops.kvpass.static_attention_functional.default: _attention_in_onnx})
    path = Path(path)
    program.save(path)
    return path


def generate(model_path, input_ids: Tensor, attention_mask: Tensor | None = None, *, max_new_tokens: int,
             cache_len: int) -> Tensor:
    """Greedy decoding of an exported ONNX model in onnxruntime (CPU): input_ids (B, L) with left padding marked 0
    in attention_mask, a cache of cache_len slots per row; returns (B, L + max_new_tokens) ids."""
    import numpy as np
    import onnxruntime

    batch, length = input_ids.shape
    if length + max_new_tokens - 1 > cache_len:
        raise ValueError(f"cache_len={cache_len} holds fewer than the {length} + {max_new_tokens} tokens asked for")
    session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    kinds = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
    state = {"valid": np.zeros((batch, cache_len), dtype=bool)}
    for spec in session.get_inputs()[5:]:
        state[spec.name] = np.zeros((batch, spec.shape[1], cache_len, spec.shape[3]), dtype=kinds[spec.type])
    ids = input_ids.numpy()
    mask = np.ones_like(ids) if attention_mask is None else attention_mask.numpy().astype(np.int64)
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    slots = np.arange(length, dtype=np.int64)
    new = []
    for _ in range(max_new_tokens):
        logits, *written = session.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                                              "cache_position": slots, **state})
        state = dict(zip(state, written))
        new.append(logits.argmax(-1))
        ids, mask = new[-1][:, None], np.ones((batch, 1), dtype=np.int64)
        positions, slots = positions[:, -1:] + 1, slots[-1:] + 1
    return torch.cat([input_ids, torch.from_numpy(np.stack(new, 1))], dim=1)
