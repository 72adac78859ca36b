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

kvpass's attention op becomes the standard `Attention` operator (over the dequantized store for KIVI). AnTKV
(`export(..., calibration=)`; kvpass.export_onnx resolves it) becomes one node per layer in the `kvpass` domain,
`kvpass.StaticAnTKVAttention` (its anchor choice and coded attention have no standard form): its inputs are the
layer's q, k, v, its state (kvpass.methods.antkv.STATE_NAMES, for a cache of `cache_len` slots fixed at export),
the codebooks (initializers), key whitening and RoPE frequencies (empty where the configuration has none), valid
and cache_position; attributes rope_scaling, method (AnTKV's configuration as JSON), scale, softcap, window; its
outputs the attention output and the written state. onnxruntime has no kernel for it: `generate` runs such a
model in onnx's reference evaluator with kvpass.onnx_domain.KVPASS_OPS, which executes the node with kvpass's own
op, so it needs kvpass installed. The wave index and CHESS have no ONNX form yet.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .config import KIVI, AnTKV, Config, Dense
from .methods import kivi
from .methods.antkv import STATE_NAMES as ANTKV_STATE_NAMES
from .methods.antkv import AnTKVStore, batch_dim
from .portable import ANTKV_CONSTANTS, attention_implementation, check_method, serving, store_buffers, store_shapes

__all__ = ["export", "generate", "OnnxDecoder"]

OPSET = 23   # the first opset with the Attention operator (GQA, boolean masks, scale, softcap)


class OnnxDecoder(torch.nn.Module):
    """What the ONNX exporter traces: forward(input_ids, attention_mask, position_ids, cache_position, valid,
    *stores) -> (logits, valid, *stores), the stores ordered layer by layer, each its `parts` (see the module doc).
    AnTKV's constants (codebooks, whitening, RoPE frequencies) are buffers `<name>_<layer>`: the ONNX model's
    initializers."""

    def __init__(self, model, method: Dense | KIVI | AnTKV | None = None, constants: dict | None = None):
        """constants: AnTKV's, {layer: (book_k, book_v, whitening or None, inv_freq or None, rope scaling)}
        (AnTKVStore.program_state)."""
        super().__init__()
        self.model, self.method = model, method or Dense()
        self.parts = _parts(self.method)
        self.rope_scaling = 1.0
        for layer, (*tensors, self.rope_scaling) in (constants or {}).items():
            for name, tensor in zip(ANTKV_CONSTANTS, tensors):   # an ONNX node's inputs are positional: none left out
                self.register_buffer(f"{name}_{layer}", tensors[0].new_zeros(0) if tensor is None else tensor)

    def attend(self, layer: int, query, key, value, scale: float, softcap: float, window: int) -> Tensor:
        """The layer's new tokens written into (new copies of) its store and attended
        (kvpass::static_attention_functional, over the dequantized store for KIVI;
        kvpass::static_antkv_attention_functional for AnTKV)."""
        at = slice(len(self.parts) * layer, len(self.parts) * (layer + 1))
        if isinstance(self.method, AnTKV):
            constants = [getattr(self, f"{name}_{layer}") for name in ANTKV_CONSTANTS]
            out, *store = torch.ops.kvpass.static_antkv_attention_functional(
                query, key, value, *self.written[at], *constants, self.rope_scaling, self.valid, self.cache_position,
                json.dumps(dataclasses.asdict(self.method)), scale, softcap, window)
        elif isinstance(self.method, KIVI):
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


def _dynamic_dims(method: Dense | KIVI | AnTKV, part: str, batch, slots, groups) -> dict[int, object]:
    """The dynamic dimensions of one layer's store part {dim: Dim}: its rows over the batch, and for Dense and KIVI
    its slots (dim 2: the cache's slots, or its key groups; the KIVI rings have none). AnTKV's slots are fixed at
    export (its anchor rows are sized by them)."""
    if isinstance(method, AnTKV):
        at = batch_dim(part)
        return {} if at is None else {at: batch}
    if isinstance(method, KIVI):
        slot = dict(zip(kivi.BUFFER_NAMES, (slots, groups, groups, slots, slots, slots, None, None)))[part]
    else:
        slot = slots
    return {0: batch} if slot is None else {0: batch, 2: slot}


def _parts(method: Dense | KIVI | AnTKV) -> list[str]:
    """The names of one layer's store parts, in the order the program takes them."""
    if isinstance(method, AnTKV):
        return list(ANTKV_STATE_NAMES)
    return list(kivi.BUFFER_NAMES) if isinstance(method, KIVI) else ["keys", "values"]


def export(model, path, config: Config | None = None, *, calibration=None, cache_len: int = 2048) -> Path:
    """Write `model` (an HF decoder; dense, KIVI or AnTKV kvpass attention) as an ONNX model to `path`; see the
    module doc. AnTKV: calibration, its loaded calibration (kvpass.export_onnx resolves it as kvpass.compile does);
    cache_len, the slots per row its state holds (prompt and generated tokens)."""
    config = config or Config()
    check_method(config, attention=(Dense, KIVI, AnTKV), to="kvpass.portable_onnx.export",
                 why="the wave index's clustering")
    method = config.attention
    if isinstance(method, AnTKV):
        if calibration is None:
            raise ValueError("AnTKV's ONNX model carries its codebooks: export it with kvpass.export_onnx(model, path, "
                             "config), which resolves the calibration, or pass calibration=")
        if isinstance(cache_len, bool) or not isinstance(cache_len, int) or cache_len < 2:
            raise ValueError(f"cache_len={cache_len!r} must be an int >= 2 (AnTKV's slots per row)")
    shapes = store_shapes(model)
    device = next(model.parameters()).device
    batch, tokens = 2, 2                 # example sizes; they and the cache's (but AnTKV's) are dynamic
    groups = torch.export.Dim("groups", min=1)
    if isinstance(method, AnTKV):
        cache = slots = cache_len
    elif isinstance(method, KIVI):      # the cache's slots: whole key groups, at least r + g
        cache = kivi.capacity_for(method, 2 * tokens)
        slots = method.group * groups
    else:
        cache, slots = 4, torch.export.Dim("cache", min=1)
    stores, constants = [], {}
    for layer, (heads, key_dim, value_dim, dtype) in shapes.items():
        if isinstance(method, AnTKV):
            state, constants[layer] = AnTKVStore.program_state(method, calibration, layer, batch, cache, key_dim,
                                                               value_dim, heads, dtype, device)
            stores += [state[name] for name in ANTKV_STATE_NAMES]
        else:
            stores += store_buffers(method, batch, heads, cache, key_dim, value_dim, dtype, device).values()
    module = OnnxDecoder(model, method, constants).eval()
    positions = torch.arange(tokens, device=device)
    args = (torch.ones(batch, tokens, dtype=torch.long, device=device), torch.ones(batch, tokens, dtype=torch.long,
            device=device), positions.repeat(batch, 1), positions,
            torch.zeros(batch, cache, dtype=torch.bool, device=device), *stores)
    b, t = torch.export.Dim("batch", min=1), torch.export.Dim("tokens", min=1)
    part_dims = [_dynamic_dims(method, part, b, slots, groups) for _ in shapes for part in module.parts]
    valid_dims = {0: b} if isinstance(method, AnTKV) else {0: b, 1: slots}
    dynamic = ({0: b, 1: t}, {0: b, 1: t}, {0: b, 1: t}, {0: t}, valid_dims, tuple(part_dims))
    names = [f"{part}_{layer}" for layer in shapes for part in module.parts]
    translations = {torch.ops.kvpass.static_attention_functional.default: _attention_in_onnx}
    if isinstance(method, AnTKV):
        from .onnx_domain import antkv_attention   # onnxscript at import: the export extra

        translations[torch.ops.kvpass.static_antkv_attention_functional.default] = antkv_attention
    with attention_implementation(model), torch.no_grad():
        program = torch.onnx.export(
            module, args, dynamic_shapes=dynamic, dynamo=True, opset_version=OPSET, verbose=False,
            input_names=["input_ids", "attention_mask", "position_ids", "cache_position", "valid", *names],
            output_names=["logits", "valid_out", *(f"{name}_out" for name in names)],
            custom_translation_table=translations)
    program.model.metadata_props["kvpass.attention"] = json.dumps(config.to_dict()["attention"])
    path = Path(path)
    program.save(path)
    return path


def _session(model_path):
    """(run(feeds) -> outputs, [(name, shape, numpy dtype)] of the inputs, metadata) of the ONNX model: onnxruntime,
    or onnx's reference evaluator with kvpass.onnx_domain.KVPASS_OPS where the model holds kvpass-domain nodes
    (onnxruntime has no kernel for them). Shapes: ints, and the exporter's names for the dynamic dimensions."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    meta = {prop.key: prop.value for prop in proto.metadata_props}
    inputs = [(spec.name, [d.dim_param or d.dim_value for d in spec.type.tensor_type.shape.dim],
               onnx.helper.tensor_dtype_to_np_dtype(spec.type.tensor_type.elem_type)) for spec in proto.graph.input]
    if any(node.domain not in ("", "ai.onnx") for node in proto.graph.node):   # kvpass.onnx_domain's nodes
        from onnx.reference import ReferenceEvaluator

        from .onnx_domain import KVPASS_OPS

        evaluator = ReferenceEvaluator(onnx.load(str(model_path)), new_ops=KVPASS_OPS)
        return (lambda feeds: evaluator.run(None, feeds)), inputs, meta
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return (lambda feeds: session.run(None, feeds)), inputs, meta


def _size(dim: int | str, sizes: dict[str, int]) -> int:
    """A dimension of an input's shape: an int, or the exporter's name of a dynamic one, a product of named
    dimensions and ints ("4*groups": KIVI's slots, whole key groups)."""
    if isinstance(dim, int):
        return dim
    return math.prod(int(factor) if factor.isdigit() else sizes[factor] for factor in dim.split("*"))


def generate(model_path, input_ids: Tensor, attention_mask: Tensor | None = None, *, max_new_tokens: int,
             cache_len: int) -> Tensor:
    """Greedy decoding of an exported ONNX model on the CPU (onnxruntime; onnx's reference evaluator with kvpass's
    op for AnTKV): input_ids (B, L) with left padding marked 0 in attention_mask, a cache of cache_len slots per row
    (KIVI: rounded up to whole key groups; AnTKV: at most the slots fixed at export, which it then holds); returns
    (B, L + max_new_tokens) ids."""
    batch, length = input_ids.shape
    if length + max_new_tokens - 1 > cache_len:
        raise ValueError(f"cache_len={cache_len} holds fewer than the {length} + {max_new_tokens} tokens asked for")
    run, inputs, meta = _session(model_path)
    method = Config.from_dict({"version": Config.VERSION, "ffn": None, "calibration": None,
                               "attention": json.loads(meta["kvpass.attention"])}).attention
    if isinstance(method, AnTKV):
        fixed = dict((name, shape) for name, shape, _ in inputs)["valid"][1]
        if cache_len > fixed:
            raise ValueError(f"cache_len={cache_len} exceeds the {fixed} slots this AnTKV model was exported with; "
                             f"export it with cache_len >= {cache_len}")
        slots = fixed
    else:
        slots = kivi.capacity_for(method, cache_len) if isinstance(method, KIVI) else cache_len
    sizes = {"batch": batch, "cache": slots, "groups": slots // method.group if isinstance(method, KIVI) else None}
    # A new sequence starts from zeros (AnTKV's op resets its counts when cache_position starts at 0).
    state = {name: np.zeros([_size(d, sizes) for d in shape], dtype=dtype) for name, shape, dtype in inputs[4:]}
    ids = input_ids.numpy()
    mask = np.ones_like(ids) if attention_mask is None else attention_mask.numpy().astype(np.int64)
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    at = np.arange(length, dtype=np.int64)
    new = []
    for _ in range(max_new_tokens):
        logits, *written = run({"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                                "cache_position": at, **state})
        state = dict(zip(state, written))
        new.append(logits.argmax(-1))
        ids, mask = new[-1][:, None], np.ones((batch, 1), dtype=np.int64)
        positions, at = positions[:, -1:] + 1, at[-1:] + 1
    return torch.cat([input_ids, torch.from_numpy(np.stack(new, 1))], dim=1)
