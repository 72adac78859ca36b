"""kvpass: a torch.compile backend that rewrites an LLM's attention and FFN into kvpass ops whose KV cache
lives in a runtime (dense, quantized, retrieved or offloaded), without touching the model's code.

    model.compile(backend=kvpass.backend(kvpass.Config(attention=kvpass.Dense())))   # or kvpass.compile(...)
    model.generate(...); print(kvpass.report(model))
"""
from .attach import attach, backend, compile, detach, reset, sequence
from .attach import resolve_calibrations_with as _resolve_calibrations_with
from .backend import Backend, KvpassMatchError
from .config import KIVI, AnTKV, Chess, Config, Dense, DenseFFN, WaveIndex
from . import portable
from .report import report

__version__ = "0.1.0"


def _resolve_calibration(model, method, artefact):
    # The calibration tool stands above the face (it runs models, reads texts); the package hands it to the face,
    # which gives each bound runtime the calibrations it needs. Imported when a method first needs one.
    from .calibration import resolve

    return resolve(model, method, artefact)


_resolve_calibrations_with(_resolve_calibration)


def export(model, config: Config | None = None, **limits):
    """`kvpass.portable.export` (max_batch, max_cache_len) with the calibration its attention method needs, resolved
    as kvpass.compile resolves it: the config's artefact, or the cached automatic one."""
    config = config or Config()
    portable.check_method(config)   # before calibrating for a method that would be refused
    return portable.export(model, config, calibration=_resolve_calibration(model, config.attention,
                                                                           config.calibration), **limits)


def export_onnx(model, path, config: Config | None = None, **options):
    """`kvpass.portable_onnx.export` (path; cache_len for AnTKV) with the calibration its attention method needs,
    resolved as kvpass.compile resolves it. Needs the `export` extra (onnx, onnxscript; onnxruntime to run it)."""
    from . import portable_onnx

    config = config or Config()
    portable.check_method(config, attention=(Dense, KIVI, AnTKV), to="kvpass.export_onnx")
    return portable_onnx.export(model, path, config, calibration=_resolve_calibration(
        model, config.attention, config.calibration), **options)


def __getattr__(name):
    # The HF cache imports transformers: load it on first use, keeping `import kvpass` light.
    if name == "KVCache":
        from .cache import KVCache

        return KVCache
    raise AttributeError(f"module 'kvpass' has no attribute {name!r}")


__all__ = ["Config", "Dense", "AnTKV", "KIVI", "WaveIndex", "DenseFFN", "Chess", "backend", "Backend", "KvpassMatchError", "compile", "attach", "detach", "export", "export_onnx", "portable",
           "report", "reset", "sequence", "KVCache"]
