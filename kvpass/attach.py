"""Binding a kvpass backend to a model: `compile`, `attach`, sequences, and the generate integration.

`torch.compile(model, backend=...)` returns a wrapper whose `.generate` runs the *uncompiled* model;
`model.compile(backend=...)` compiles in place, which is what makes HF `generate` run compiled.
`kvpass.compile(model, config)` does the latter and also makes `generate` use the kvpass cache from the
very first call (a backend given to `model.compile` directly only meets the model at its first compile).
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch

from .backend import Backend
from .config import Config

_ATTR = "_kvpass_backend"


def _unwrap(model):
    return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule


def backend_of(model, required: bool = False) -> Backend | None:
    backend = _unwrap(model).__dict__.get(_ATTR)
    if backend is None and required:
        raise ValueError(f"{type(model).__name__} has no kvpass backend attached; call kvpass.compile(model, config) "
                         f"(compiled) or kvpass.attach(model, config) (eager reference semantics) first")
    return backend


def attach(model: torch.nn.Module, config_or_backend: Config | Backend) -> Backend:
    """Give `model` a kvpass runtime without compiling it: HF generate then uses the kvpass cache and the
    method's eager reference semantics. Returns the backend (usable with model.compile)."""
    model = _unwrap(model)
    backend = config_or_backend if isinstance(config_or_backend, Backend) else Backend(config_or_backend)
    current = model.__dict__.get(_ATTR)
    if current is backend:
        return backend
    if current is not None:
        raise ValueError(f"{type(model).__name__} already has a kvpass backend; a model keeps one backend "
                         f"(call kvpass.detach(model) first to replace it)")
    backend.bind(model)
    model.__dict__[_ATTR] = backend
    if hasattr(model, "generate"):
        model.__dict__["generate"] = functools.partial(_generate_with_kvpass_cache, model, type(model).generate)
    return backend


def detach(model: torch.nn.Module) -> None:
    """Undo `attach`/`compile`: the model runs as plain (uncompiled) HF again."""
    model = _unwrap(model)
    backend = model.__dict__.pop(_ATTR, None)
    model.__dict__.pop("generate", None)
    if backend is not None:
        backend.unbind()
        compiled = model.__dict__.get("_compiled_call_impl")
        if compiled is not None and getattr(compiled, "_kvpass_backend", None) is backend:
            del model.__dict__["_compiled_call_impl"]
        elif backend.engine is not None and compiled is backend.engine:
            model.__dict__["_compiled_call_impl"] = backend.engine.compiled_call  # model.compile's own call stays
        backend.engine = None
        backend.runtime.static_decode = False


def compile(model: torch.nn.Module, config: Config, *, inner: str = "inductor", strict: bool = False,
            cudagraphs: bool = False, capture: bool = True, **compile_kwargs) -> torch.nn.Module:
    """Compile `model` in place with kvpass (so `model.generate` runs compiled through the kvpass cache).
    capture: replay each decode step from a CUDA graph (kvpass.engine; on CUDA, for methods that meet the
    captured-decode contract). Other arguments as for `kvpass.backend`; the rest go to `model.compile`."""
    backend = attach(model, Backend(config, inner=inner, strict=strict, cudagraphs=cudagraphs))
    backend.runtime.calibration()  # now, not inside the first generate: a wrong artefact fails here
    model = _unwrap(model)
    model.compile(backend=backend, **compile_kwargs)
    model._compiled_call_impl._kvpass_backend = backend  # lets detach() undo exactly this compile
    install_engine(model, backend, capture=capture and not cudagraphs)
    return model


def install_engine(model: torch.nn.Module, backend: Backend, *, capture: bool = True) -> None:
    """Put the decode engine in front of `model`'s compiled call (model.compile made it), if the attention method
    meets the captured-decode contract; its decode graphs then use kvpass::decode_attention. Inductor's own
    piecewise CUDA graphs (cudagraphs=True) cannot nest inside the engine's recording: capture is off with them."""
    from .engine import DecodeEngine
    from .methods import captured_decode_supported

    compiled = model.__dict__.get("_compiled_call_impl")
    if compiled is None or backend.engine is not None or not captured_decode_supported(backend.config.attention):
        return
    backend.engine = DecodeEngine(backend.runtime, compiled, capture=capture)
    backend.runtime.static_decode = True
    model.__dict__["_compiled_call_impl"] = backend.engine


def _generate_with_kvpass_cache(model, generate, *args, **kwargs):
    """HF generate with a fresh kvpass cache unless the caller chose a cache (or decoding) we cannot serve."""
    config = kwargs.get("generation_config") or model.generation_config
    num_beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    wants_own_cache = (kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
                       or kwargs.get("use_cache") is False
                       or kwargs.get("cache_implementation") is not None
                       or getattr(config, "cache_implementation", None) is not None)
    if not wants_own_cache:
        if num_beams > 1:
            warnings.warn("kvpass: beam search is not supported by the kvpass cache; this generate call uses HF's "
                          "own cache, and kvpass attention runs one-shot over it", stacklevel=2)
        else:
            from .cache import KVCache, cache_argument

            kwargs[cache_argument(model)] = KVCache(model, capacity=_expected_length(config, args, kwargs))
    return generate(model, *args, **kwargs)


def _expected_length(config, args, kwargs) -> int | None:
    """Prompt + new tokens of a generate call, when its arguments say (a hint for allocating the stores)."""
    ids = args[0] if args else kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        return None
    new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    return ids.shape[-1] + new if new else kwargs.get("max_length")


def reset(model: torch.nn.Module) -> None:
    """Start a new explicit sequence: drop all cached state; later calls of a model with no cache of its own
    (a plain decoder called with explicit positions) decode incrementally over it."""
    backend_of(model, required=True).runtime.begin_sequence(kind="explicit")


@contextlib.contextmanager
def sequence(model: torch.nn.Module):
    """`with kvpass.sequence(model): ...` — a fresh explicit sequence for the block, dropped after it."""
    runtime = backend_of(model, required=True).runtime
    runtime.begin_sequence(kind="explicit")
    try:
        yield runtime
    finally:
        runtime.end_sequence()
