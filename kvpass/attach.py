"""Binding a kvpass backend to a model: `backend`, `compile`, `attach`, sequences, and the generate integration.

`torch.compile(model, backend=...)` returns a wrapper whose `.generate` runs the *uncompiled* model;
`model.compile(backend=...)` compiles in place, which is what makes HF `generate` run compiled.
`kvpass.compile(model, config)` does the latter and also makes `generate` use the kvpass cache from the
very first call (a backend given to `model.compile` directly only meets the model at its first compile).

Binding is where a model gets what its runtime receives and never makes: the calibrations of its methods, resolved
here by the calibration tool (kvpass.calibration.resolve: the config's artefact, or the cached automatic one, made on
first use). That tool stands above the face and uses it, so the face does not import it: kvpass/__init__.py, which
assembles the package, hands it over (`resolve_calibrations_with`).
"""
from __future__ import annotations

import contextlib
import functools
import warnings
import weakref

import torch

from .backend import Backend, _unwrap, backend_of
from .config import Config
from .weight_layout import relayout_for_sparse_kernels

__all__ = ["attach", "backend", "backend_of", "compile", "detach", "install_engine", "reset", "resolve_calibrations_with",
           "sequence"]

_resolve_calibration = None  # (model, method config, artefact path or None) -> its loaded Calibration or None


def resolve_calibrations_with(resolve) -> None:
    """How bound runtimes get their calibrations: resolve(model, method, artefact) -> Calibration | None (None for a
    method without one). kvpass/__init__.py gives kvpass.calibration.resolve."""
    global _resolve_calibration
    _resolve_calibration = resolve


def backend(config: Config, *, inner: str = "inductor", strict: bool = False, cudagraphs: bool = False) -> Backend:
    """The kvpass compile backend for one model: `model.compile(backend=kvpass.backend(config))`.

    inner: the compiler of the rewritten graph ("inductor", "aot_eager", "eager"); strict: raise instead of
    warning when a site does not match; cudagraphs: capture the pieces between kvpass ops as CUDA graphs.
    The backend binds itself to the model at its first compile (_meet_model)."""
    return Backend(config, inner=inner, strict=strict, cudagraphs=cudagraphs, meet_model=_meet_model)


def _meet_model(root: torch.nn.Module, backend: Backend) -> None:
    """model.compile(backend=...) used directly: the backend meets its model only now, inside the first call.
    Bind now (report(model) works, later generate calls use the kvpass cache) and say what this call misses. A model
    met earlier, a submodule of `root`, is let go: the backend serves the outer model."""
    if backend.model is not None:
        detach(backend.model)
    attach(root, backend)
    install_engine(root, backend, capture=not backend.cudagraphs)  # model.compile made the call the engine fronts
    if hasattr(root, "generate"):
        warnings.warn(f"kvpass: the backend met its {type(root).__name__} at its first compile; a generate call "
                      f"already running keeps the cache HF made for it (kvpass attention reads it, correctly), "
                      f"and later calls use the kvpass cache. kvpass.compile(model, config) binds before the "
                      f"first call.", stacklevel=3)


def _calibrations(model: torch.nn.Module, artefact: str | None):
    """The resolver a bound runtime asks for its methods' calibrations (Runtime.use_calibrations): the package's
    resolver (resolve_calibrations_with) for `model`, held weakly as the backend holds it, and the config's artefact."""
    model = weakref.ref(model)

    def resolve(method):
        served = model()
        if served is None:
            raise RuntimeError(f"{method.method} needs a calibration, and the model this kvpass runtime served no "
                               f"longer exists")
        if _resolve_calibration is None:
            raise RuntimeError(f"{method.method} needs a calibration, and no calibration resolver was given to "
                               f"kvpass.attach (import kvpass gives it)")
        return _resolve_calibration(served, method, artefact)

    return resolve


def attach(model: torch.nn.Module, config_or_backend: Config | Backend) -> Backend:
    """Give `model` a kvpass runtime without compiling it: HF generate then uses the kvpass cache and the
    method's eager reference semantics. Returns the backend (usable with model.compile)."""
    model = _unwrap(model)
    backend = (config_or_backend if isinstance(config_or_backend, Backend)
               else Backend(config_or_backend, meet_model=_meet_model))
    current = backend_of(model)
    if current is backend:
        return backend
    if current is not None:
        raise ValueError(f"{type(model).__name__} already has a kvpass backend; a model keeps one backend "
                         f"(call kvpass.detach(model) first to replace it)")
    backend.bind(model, calibrations=_calibrations(model, backend.config.calibration))
    if hasattr(model, "generate"):
        model.__dict__["generate"] = functools.partial(_generate_with_kvpass_cache, model, type(model).generate)
    return backend


def detach(model: torch.nn.Module) -> None:
    """Undo `attach`/`compile`: the model runs as plain (uncompiled) HF again."""
    model = _unwrap(model)
    backend = backend_of(model)
    model.__dict__.pop("generate", None)
    if backend is not None:
        backend.unbind()  # backend_of(model) is None from here
        compiled = model.__dict__.get("_compiled_call_impl")
        if backend.engine is not None and compiled is backend.engine:
            compiled = model.__dict__["_compiled_call_impl"] = backend.engine.compiled_call   # the call it fronted
        if compiled is not None and getattr(compiled, "_kvpass_backend", None) is backend:
            del model.__dict__["_compiled_call_impl"]   # kvpass.compile's own compile goes too (model.compile's stays)
        backend.engine = None
        backend.runtime.static_decode = False


def compile(model: torch.nn.Module, config: Config, *, inner: str = "inductor", strict: bool = False,
            cudagraphs: bool = False, capture: bool = True, **compile_kwargs) -> torch.nn.Module:
    """Compile `model` in place with kvpass (so `model.generate` runs compiled through the kvpass cache).
    capture: replay each decode step from a CUDA graph (kvpass.engine; on CUDA, for methods that meet the
    captured-decode contract). Other arguments as for `kvpass.backend`; the rest go to `model.compile`."""
    backend = attach(model, Backend(config, inner=inner, strict=strict, cudagraphs=cudagraphs, meet_model=_meet_model))
    try:  # now, not inside the first generate, where Dynamo would wrap a wrong artefact's error in its own
        for method in (backend.config.attention, backend.config.ffn):
            backend.runtime.calibration(method)
    except Exception:
        detach(model)  # the model stays as it was: a corrected config can be compiled next
        raise
    model = _unwrap(model)
    # Before the first trace, which guards the weights' strides: the sparse CHESS kernels then read no copies.
    relayout_for_sparse_kernels(model, backend.runtime.chess_plan())
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
    # HF makes no cache where the call or the generation config says use_cache=False (MPT's does), where the model
    # supplies its own (HF's _supports_default_dynamic_cache) or where its forward takes none (OpenAI GPT): a kvpass
    # cache there would be refused, or fed the whole sequence again at every step.
    from .cache import KVCache, cache_argument, recurrent_layers, takes_a_cache

    supports = getattr(type(model), "_supports_default_dynamic_cache", lambda: True)
    wants_own_cache = (kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
                       or kwargs.get("use_cache", getattr(config, "use_cache", True)) is False
                       or not supports() or not takes_a_cache(model)
                       or kwargs.get("cache_implementation") is not None
                       or getattr(config, "cache_implementation", None) is not None)
    if not wants_own_cache:
        if num_beams > 1:
            warnings.warn("kvpass: beam search is not supported by the kvpass cache; this generate call uses HF's "
                          "own cache, and kvpass attention runs one-shot over it", stacklevel=2)
        elif recurrent_layers(model):
            warnings.warn(f"kvpass: {type(model).__name__} has recurrent layers (Mamba, linear attention or "
                          f"convolutions) whose state the kvpass cache does not hold; generate uses HF's own cache, "
                          f"and kvpass attention runs one-shot over it", stacklevel=2)
        else:
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
