"""A kvpass-configured Hugging Face decoder as a portable program: `torch.export` of the model with its KV cache
as the program's own buffers, saved as a `.pt2` that `torch.export.load` opens in a fresh process.

    program = kvpass.export(model, kvpass.Config(), max_batch=2, max_cache_len=1024)
    kvpass.portable.save(program, "model.pt2", model_name="smollm2-135m")          # + model.json
    # elsewhere, with kvpass installed (it registers the op the program calls):
    program = torch.export.load("model.pt2")
    tokens = kvpass.portable.generate(program, input_ids, attention_mask, max_new_tokens=32)

How the program is built. `torch.export` traces the model's Python, not a Dynamo graph, so the kvpass graph
rewrite (a torch.compile backend) cannot run there. Instead the attention goes through transformers' own
attention-function registry: while tracing, every attention layer calls `kvpass::static_attention` (kvpass/ops.py)
on the new tokens' queries, keys and values and on that layer's store buffers, which the op writes and attends
(visibility from the per-slot `valid` buffer, causality and the layer's sliding window). The op stays one named
node per layer in the exported graph; the stores, like transformers' exportable static cache, are buffers mutated
in place, so a loaded program keeps its cache between calls and needs no kvpass runtime, registry or Python state.

The program's one entry point serves prefill and decode (the token count is a dynamic dimension):
`program(input_ids (B, L), attention_mask (B, L), position_ids (B, L), cache_position (L,))` -> the last token's
logits (B, V). A new sequence starts at cache_position 0; attention_mask marks left padding (0) of the new tokens.
The `.pt2` holds the weights and the zeroed cache (max_batch x max_cache_len tokens).

Methods: Dense attention, KIVI (`kvpass::static_kivi_attention`: its codes, scales and exact rings are the
program's buffers, written as the runtime's KIVI store writes its own) and AnTKV (`kvpass::static_antkv_attention`:
codes, anchors, the window ring and the anchor counts are buffers, the codebooks constants of the program, so the
loaded program needs no calibration artefact), each with the model's own FFN. The wave index keeps state a program
cannot carry yet (its clustering), and CHESS rewrites the FFN through the FX pass: export refuses them with a
ValueError.
"""
from __future__ import annotations

import dataclasses
import json
import platform
from importlib import metadata
from pathlib import Path

import torch
from torch import Tensor

from . import ops  # noqa: F401  (registers kvpass::static_attention, which the traced attention calls)
from .config import KIVI, AnTKV, Config, Dense, DenseFFN
from .methods import kivi
from .methods.antkv import STATE_NAMES as ANTKV_STATE_NAMES
from .methods.antkv import AnTKVStore

ATTENTION = "kvpass-static"
__all__ = ["export", "generate", "save", "PortableDecoder"]


class _Tracing:
    """The module whose forward is running (a PortableDecoder, or kvpass.portable_onnx's OnnxDecoder): the attention
    function hands it each layer's new tokens (its `attend`)."""
    module = None


def _static_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                      softcap=None, **kwargs):
    """transformers' attention-function signature: query (B, Hq, L, D), key/value (B, Hkv, L, D) of the new tokens
    (the model runs without an HF cache). Returns ((B, L, Hq, Dv), None) as transformers' functions do."""
    if _Tracing.module is None:
        raise RuntimeError(f"attn_implementation={ATTENTION!r} runs only inside a kvpass.export program")
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    out = _Tracing.module.attend(module.layer_idx, query, key, value, scale, float(softcap or 0.0),
                                 int(sliding_window or 0))
    return out.transpose(1, 2), None


class serving:
    """Makes `module` (with an `attend` method) the one the attention function serves for the duration of a block."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        _Tracing.module = self.module

    def __exit__(self, *exc):
        _Tracing.module = None


def _no_mask(*args, **kwargs):
    """The op takes visibility from the program's `valid` buffer, causality and the window: HF builds no mask."""
    return None


class attention_implementation:
    """Sets the model's attention implementation (default: kvpass's, registered with transformers on entry) for the
    duration of a block, then puts the user's back."""

    def __init__(self, model, name: str = ATTENTION):
        self.config, self.name = model.config, name

    def __enter__(self):
        if self.name == ATTENTION:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface

            AttentionInterface.register(ATTENTION, _static_attention)
            AttentionMaskInterface.register(ATTENTION, _no_mask)
        self.previous = self.config._attn_implementation
        self.config._attn_implementation = self.name

    def __exit__(self, *exc):
        self.config._attn_implementation = self.previous


def store_shapes(model) -> dict[int, tuple[int, int, int, torch.dtype]]:
    """{layer index: (kv heads, key dim, value dim, dtype)} of every attention layer that calls transformers'
    attention interface, found by running one token through the model with a recording attention function; raises
    if some layer does not call it (its cache would not be the program's)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    shapes = {}

    def record(module, query, key, value, *args, **kwargs):
        shapes[module.layer_idx] = (key.shape[1], key.shape[3], value.shape[3], key.dtype)
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("kvpass-shapes", record)
    device = next(model.parameters()).device
    with attention_implementation(model, "kvpass-shapes"), torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    if sorted(shapes) != list(range(layers)):
        raise ValueError(f"kvpass.export: {len(shapes)} of the model's {layers} attention layers go through "
                         f"transformers' attention interface (found layers {sorted(shapes)}); the others would keep "
                         "no cache in the program: this model cannot be exported by kvpass")
    return shapes


def store_buffers(method: Dense | KIVI, batch: int, heads: int, slots: int, key_dim: int, value_dim: int,
                  dtype: torch.dtype, device) -> dict[str, Tensor]:
    """One layer's store as named zeroed buffers, in the order its op takes them: Dense `keys`, `values` (batch,
    heads, slots, key|value dim); KIVI the quantized parts of `slots` slots (rounded up as a KIVI store needs) and
    the exact rings (kvpass.methods.kivi)."""
    if isinstance(method, KIVI):
        keys, values = kivi.quantized_buffers(batch, heads, kivi.capacity_for(method, slots), key_dim, value_dim,
                                              dtype, device, method.group)
        rings = kivi.exact_rings(method, batch, heads, key_dim, value_dim, dtype, device)
        return dict(zip(kivi.BUFFER_NAMES, (*keys, *values, *rings)))
    return {name: torch.zeros(batch, heads, slots, dim, dtype=dtype, device=device)
            for name, dim in (("keys", key_dim), ("values", value_dim))}


ANTKV_CONSTANTS = ("book_k", "book_v", "whitening", "inv_freq")   # AnTKV's program constants, beside its state


class PortableDecoder(torch.nn.Module):
    """What torch.export traces: the model, and its KV cache as buffers `<part>_<layer>` (`store_buffers`: Dense
    `keys`, `values` of (max_batch, kv heads, max_cache_len, head dim) in the model's dtype; KIVI its codes,
    scales, zeros and exact rings; AnTKV its state (`AnTKVStore.program_state`) and codebooks); `valid`:
    (max_batch, max_cache_len) bool. calibration: AnTKV's (the codebooks the program carries)."""

    def __init__(self, model, max_batch: int, max_cache_len: int, method: Dense | KIVI | AnTKV | None = None,
                 calibration=None):
        super().__init__()
        self.model, self.method = model, method or Dense()
        device = next(model.parameters()).device
        self.parts: list[str] = []
        self.rope_scaling = 1.0
        for layer, (heads, key_dim, value_dim, dtype) in store_shapes(model).items():
            if isinstance(self.method, AnTKV):
                buffers, constants = AnTKVStore.program_state(self.method, calibration, layer, max_batch,
                                                              max_cache_len, key_dim, value_dim, heads, dtype, device)
                *tensors, self.rope_scaling = constants
                buffers.update((name, t) for name, t in zip(ANTKV_CONSTANTS, tensors) if t is not None)
            else:
                buffers = store_buffers(self.method, max_batch, heads, max_cache_len, key_dim, value_dim, dtype,
                                        device)
            self.parts = list(buffers)
            for part, buffer in buffers.items():
                self.register_buffer(f"{part}_{layer}", buffer)
        self.register_buffer("valid", torch.zeros(max_batch, max_cache_len, dtype=torch.bool, device=device))

    def attend(self, layer: int, query, key, value, scale: float, softcap: float, window: int) -> Tensor:
        """The layer's new tokens written into its store buffers and attended (kvpass::static_attention, or
        kvpass::static_kivi_attention, or kvpass::static_antkv_attention)."""
        if isinstance(self.method, AnTKV):
            state = [getattr(self, f"{name}_{layer}") for name in ANTKV_STATE_NAMES]
            constants = [getattr(self, f"{name}_{layer}", None) for name in ANTKV_CONSTANTS]
            return torch.ops.kvpass.static_antkv_attention(
                query, key, value, *state, *constants, self.rope_scaling, self.valid, self.cache_position,
                json.dumps(dataclasses.asdict(self.method)), scale, softcap, window)
        stores = [getattr(self, f"{part}_{layer}") for part in self.parts]
        if isinstance(self.method, KIVI):
            m = self.method
            return torch.ops.kvpass.static_kivi_attention(query, key, value, *stores, self.valid, self.cache_position,
                                                          m.bits, m.group, m.residual, scale, softcap, window)
        return torch.ops.kvpass.static_attention(query, key, value, *stores, self.valid, self.cache_position, scale,
                                                 softcap, window)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache_position: Tensor):
        batch = input_ids.shape[0]
        self.valid[:batch].index_copy_(1, cache_position, attention_mask.bool())
        self.cache_position = cache_position
        with serving(self):
            out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=1)
        return out.logits[:, -1]


def check_method(config: Config, attention: tuple[type, ...] = (Dense, KIVI, AnTKV), to: str = "kvpass.export",
                 why: str = "the wave index's clustering") -> None:
    """Refuses (ValueError) the methods an exported program cannot carry: attention other than `attention`'s
    kinds (why: what they keep that the program cannot), an FFN rewritten by the compile pass."""
    if not isinstance(config.attention, attention):
        names = " or ".join(f"{kind.__name__}()" for kind in attention)
        raise ValueError(f"{to} takes attention={names} for now, got {type(config.attention).__name__}: its store "
                         f"keeps state an exported program cannot carry yet ({why}); export with kvpass.Config()")
    if config.ffn is not None and not isinstance(config.ffn, DenseFFN):
        raise ValueError(f"kvpass.export takes the model's own FFN (ffn=None or DenseFFN()), got "
                         f"{type(config.ffn).__name__}: it is rewritten by the torch.compile pass, which export "
                         "does not run")


def export(model, config: Config | None = None, *, max_batch: int = 1, max_cache_len: int = 2048,
           calibration=None) -> torch.export.ExportedProgram:
    """The exported program of `model` (an HF decoder) under `config` (default kvpass.Config(): dense attention)
    for up to `max_batch` rows and `max_cache_len` tokens per row (prompt and generated). calibration: the loaded
    calibration of the attention method, for AnTKV (`kvpass.export` resolves it as kvpass.compile does). See the
    module doc for its entry point; `save` writes it, `generate` runs it."""
    config = config or Config()
    check_method(config)
    for name, value, least in (("max_batch", max_batch, 1), ("max_cache_len", max_cache_len, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name}={value!r} must be an int >= {least}")
    if isinstance(config.attention, AnTKV) and calibration is None:
        raise ValueError("AnTKV's program carries its codebooks: export it with kvpass.export(model, config), which "
                         "resolves the calibration, or pass calibration=")
    program = PortableDecoder(model, max_batch, max_cache_len, config.attention, calibration).eval()
    device = program.valid.device
    # A prompt's example: transformers reads positions while tracing (packed-sequence detection), so they must
    # look like a real prompt's (all-zero positions trace a packed batch).
    slots = torch.arange(2, device=device)
    ids, positions = torch.ones(max_batch, 2, dtype=torch.long, device=device), slots.repeat(max_batch, 1)
    batch = torch.export.Dim("batch", min=1, max=max_batch) if max_batch > 1 else torch.export.Dim.STATIC
    tokens = torch.export.Dim("tokens", min=1, max=max_cache_len)
    rows = {0: batch, 1: tokens}
    with attention_implementation(model), torch.no_grad():
        return torch.export.export(program, (ids, torch.ones_like(ids), positions, slots),
                                   dynamic_shapes=(rows, rows, rows, {0: tokens}))


def _limits(module) -> tuple[int, int]:
    """(max_batch, max_cache_len) of a program, from its `valid` buffer."""
    return tuple(module.get_buffer("valid").shape)


@torch.no_grad()
def generate(program, input_ids: Tensor, attention_mask: Tensor | None = None, *, max_new_tokens: int) -> Tensor:
    """Greedy decoding with an exported program (an ExportedProgram or its `.module()`): input_ids (B, L) with
    left padding marked 0 in attention_mask; returns (B, L + max_new_tokens) ids. Starts a new sequence."""
    module = program.module() if isinstance(program, torch.export.ExportedProgram) else program
    max_batch, max_cache_len = _limits(module)
    batch, length = input_ids.shape
    if batch > max_batch or length + max_new_tokens - 1 > max_cache_len:
        raise ValueError(f"{batch} rows of {length} + {max_new_tokens} tokens do not fit this program "
                         f"(max_batch={max_batch}, max_cache_len={max_cache_len}): export it with larger limits")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    device = input_ids.device
    logits = module(input_ids, mask, positions, torch.arange(length, device=device))
    new, position = [logits.argmax(-1)], positions[:, -1:]
    ones = torch.ones(batch, 1, dtype=mask.dtype, device=device)
    for slot in range(length, length + max_new_tokens - 1):
        position = position + 1
        logits = module(new[-1][:, None], ones, position, torch.tensor([slot], device=device))
        new.append(logits.argmax(-1))
    return torch.cat([input_ids, torch.stack(new, 1)], dim=1)


def _versions() -> dict:
    found = {}
    for package in ("kvpass", "torch", "transformers", "triton"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def _constants_digest(program: torch.export.ExportedProgram) -> str | None:
    """sha256 of the calibrated constants a program carries (AnTKV's codebooks, whitening, RoPE frequencies), in
    buffer order; None for a program without any (dense, KIVI)."""
    import hashlib

    digest, found = hashlib.sha256(), False
    for name, buffer in program.named_buffers():
        if name.rsplit("_", 1)[0] in ANTKV_CONSTANTS:
            digest.update(name.encode())
            digest.update(buffer.detach().float().cpu().numpy().tobytes())
            found = True
    return digest.hexdigest() if found else None


def save(program: torch.export.ExportedProgram, path, *, config: Config | None = None,
         model_name: str | None = None) -> tuple[Path, Path]:
    """Write `path` (.pt2, torch.export.save) and its metadata beside it (.json: config, model, limits, versions,
    the entry point). Returns both paths."""
    path = Path(path)
    torch.export.save(program, path)
    max_batch, max_cache_len = _limits(program.module())
    meta = {"model": model_name, "config": (config or Config()).to_dict(), "max_batch": max_batch,
            "max_cache_len": max_cache_len, "versions": _versions(), "python": platform.python_version(),
            "calibration_digest": _constants_digest(program),
            "entry_point": "program(input_ids (B, L), attention_mask (B, L), position_ids (B, L), cache_position "
                           "(L,)) -> last-token logits (B, V); cache_position 0 starts a sequence",
            "needs": "import kvpass (registers kvpass::static_attention) before torch.export.load"}
    side = path.with_suffix(".json")
    side.write_text(json.dumps(meta, indent=2) + "\n")
    return path, side
