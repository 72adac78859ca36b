"""A kvpass model (dense or KIVI attention) as an ONNX model that onnxruntime runs without kvpass: the decoder with
its KV cache as inputs and outputs of every call (ONNX programs hold no state), in standard opset-23 operators.

    kvpass.portable_onnx.export(model, "model.onnx")                 # torch.onnx.export(dynamo=True) underneath
    tokens = kvpass.portable_onnx.generate("model.onnx", input_ids, attention_mask, max_new_tokens=32,
                                           cache_len=1024)          # onnxruntime

The model's inputs: input_ids, attention_mask, position_ids (B, L) int64, cache_position (L,) int64, `valid` (B, S)
bool and per layer its store, `<part>_<i>`: S is the cache's length, the caller's choice (zeros and all-False start
a sequence). Dense: `keys_<i>`, `values_<i>` (B, kv heads, S, head dim). KIVI (S a multiple of its group): the parts
of kvpass.portable.store_buffers, uint8 codes, scales and zeros, and the exact rings, written as the runtime's KIVI
store writes its own (kvpass.methods.kivi.write_tokens, in tensor operations). Outputs: the last token's `logits`
(B, V), then `valid` and the stores with the new tokens written, to pass to the next call. The model's metadata
`kvpass.attention` names the method (`generate` reads it).

kvpass's attention op becomes the standard `Attention` operator (over the dequantized store for KIVI). The other
methods' state and kernels have no ONNX form yet (AnTKV, the wave index and CHESS).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from .config import KIVI, Config, Dense
from .methods import kivi
from .portable import attention_implementation, check_method, serving, store_buffers, store_shapes

__all__ = ["export", "generate", "OnnxDecoder"]

OPSET = 23   # the first opset with the Attention operator (GQA, boolean masks, scale, softcap)


class OnnxDecoder(torch.nn.Module):
    """What the ONNX exporter traces: forward(input_ids, attention_mask, position_ids, cache_position, valid,
    *stores) -> (logits, valid, *stores), the stores ordered layer by layer, each its `parts` (see the module doc)."""

    def __init__(self, model, method: Dense | KIVI | None = None):
        super().__init__()
        self.model, self.method = model, method or Dense()
        self.parts = _parts(self.method)

    def attend(self, layer: int, query, key, value, scale: float, softcap: float, window: int) -> Tensor:
        """The layer's new tokens written into (new copies of) its store and attended
        (kvpass::static_attention_functional, over the dequantized store for KIVI)."""
        at = slice(len(self.parts) * layer, len(self.parts) * (layer + 1))
        if isinstance(self.method, KIVI):
            store = kivi.write_tokens(self.method, self.written[at], key, value, self.cache_position[0])
            end = self.cache_position[-1:] + 1
            keys, values = kivi.dequantized_view(self.method, store, *kivi.quantized_after(self.method, end), end)
            # The view holds the new tokens as the store does (quantized or exact): the op writes them unchanged.
            key, value = keys.index_select(2, self.cache_position), values.index_select(2, self.cache_position)
            out, _, _ = torch.ops.kvpass.static_attention_functional(query, key, value, keys, values, self.valid,
                                                                     self.cache_position, scale, softcap, window)
        else:
            out, *store = torch.ops.kvpass.static_attention_functional(
                query, key, value, *self.written[at], self.valid, self.cache_position, scale, softcap, window)
        self.written[at] = store
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


def _slot_dims(method: Dense | KIVI, slots, groups) -> dict[str, object]:
    """Each store part, in the order the program takes them (kvpass.portable.store_buffers), with its dynamic slot
    dimension (dim 2): the cache's slots, or its key groups; None: static (the KIVI rings)."""
    if isinstance(method, KIVI):
        return dict(zip(kivi.BUFFER_NAMES, (slots, groups, groups, slots, slots, slots, None, None)))
    return {"keys": slots, "values": slots}


def _parts(method: Dense | KIVI) -> list[str]:
    """The names of one layer's store parts, in the order the program takes them."""
    return list(_slot_dims(method, None, None))


def export(model, path, config: Config | None = None) -> Path:
    """Write `model` (an HF decoder, dense or KIVI kvpass attention) as an ONNX model to `path`; see the module
    doc."""
    config = config or Config()
    check_method(config, attention=(Dense, KIVI), to="kvpass.portable_onnx.export",
                 why="AnTKV's anchor choice runs in kvpass's op, which onnxruntime lacks; the wave index's clustering")
    method = config.attention
    module = OnnxDecoder(model, method).eval()
    shapes = store_shapes(model)
    device = next(model.parameters()).device
    batch, tokens = 2, 2                 # example sizes; they and the cache's are dynamic in the program
    groups = torch.export.Dim("groups", min=1)
    if isinstance(method, KIVI):        # the cache's slots: whole key groups, at least r + g
        cache = kivi.capacity_for(method, 2 * tokens)
        slots = method.group * groups
    else:
        cache, slots = 4, torch.export.Dim("cache", min=1)
    stores = [buffer for heads, key_dim, value_dim, dtype in shapes.values()
              for buffer in store_buffers(method, batch, heads, cache, key_dim, value_dim, dtype, device).values()]
    positions = torch.arange(tokens, device=device)
    args = (torch.ones(batch, tokens, dtype=torch.long, device=device), torch.ones(batch, tokens, dtype=torch.long,
            device=device), positions.repeat(batch, 1), positions,
            torch.zeros(batch, cache, dtype=torch.bool, device=device), *stores)
    b, t = torch.export.Dim("batch", min=1), torch.export.Dim("tokens", min=1)
    dims = _slot_dims(method, slots, groups)
    part_dims = [{0: b} if dims[part] is None else {0: b, 2: dims[part]} for _ in shapes for part in module.parts]
    dynamic = ({0: b, 1: t}, {0: b, 1: t}, {0: b, 1: t}, {0: t}, {0: b, 1: slots}, tuple(part_dims))
    names = [f"{part}_{layer}" for layer in shapes for part in module.parts]
    with attention_implementation(model), torch.no_grad():
        program = torch.onnx.export(
            module, args, dynamic_shapes=dynamic, dynamo=True, opset_version=OPSET, verbose=False,
            input_names=["input_ids", "attention_mask", "position_ids", "cache_position", "valid", *names],
            output_names=["logits", "valid_out", *(f"{name}_out" for name in names)],
            custom_translation_table={torch.ops.kvpass.static_attention_functional.default: _attention_in_onnx})
    program.model.metadata_props["kvpass.attention"] = json.dumps(config.to_dict()["attention"])
    path = Path(path)
    program.save(path)
    return path


def generate(model_path, input_ids: Tensor, attention_mask: Tensor | None = None, *, max_new_tokens: int,
             cache_len: int) -> Tensor:
    """Greedy decoding of an exported ONNX model in onnxruntime (CPU): input_ids (B, L) with left padding marked 0
    in attention_mask, a cache of cache_len slots per row (KIVI: rounded up to whole key groups); returns
    (B, L + max_new_tokens) ids."""
    import numpy as np
    import onnxruntime

    batch, length = input_ids.shape
    if length + max_new_tokens - 1 > cache_len:
        raise ValueError(f"cache_len={cache_len} holds fewer than the {length} + {max_new_tokens} tokens asked for")
    session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    method = Config.from_dict({"version": Config.VERSION, "ffn": None, "calibration": None, "attention": json.loads(
        session.get_modelmeta().custom_metadata_map["kvpass.attention"])}).attention
    slots = kivi.capacity_for(method, cache_len) if isinstance(method, KIVI) else cache_len
    groups = slots // method.group if isinstance(method, KIVI) else None
    kinds = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(uint8)": np.uint8}
    state = {"valid": np.zeros((batch, slots), dtype=bool)}
    for spec in session.get_inputs()[5:]:
        rows = _slot_dims(method, slots, groups)[spec.name.rsplit("_", 1)[0]] or spec.shape[2]
        state[spec.name] = np.zeros((batch, spec.shape[1], rows, spec.shape[3]), dtype=kinds[spec.type])
    ids = input_ids.numpy()
    mask = np.ones_like(ids) if attention_mask is None else attention_mask.numpy().astype(np.int64)
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    at = np.arange(length, dtype=np.int64)
    new = []
    for _ in range(max_new_tokens):
        logits, *written = session.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                                              "cache_position": at, **state})
        state = dict(zip(state, written))
        new.append(logits.argmax(-1))
        ids, mask = new[-1][:, None], np.ones((batch, 1), dtype=np.int64)
        positions, at = positions[:, -1:] + 1, at[-1:] + 1
    return torch.cat([input_ids, torch.from_numpy(np.stack(new, 1))], dim=1)
