"""kvpass: a torch.compile backend that rewrites an LLM's attention and FFN into kvpass ops whose KV cache
lives in a runtime (dense, quantized, retrieved or offloaded), without touching the model's code.

    model.compile(backend=kvpass.backend(kvpass.Config(attention=kvpass.Dense())))   # or kvpass.compile(...)
    model.generate(...); print(kvpass.report(model))
"""
from .attach import attach, compile, detach, reset, sequence
from .backend import Backend, KvpassMatchError, backend
from .config import KIVI, AnTKV, Chess, Config, Dense, DenseFFN, WaveIndex
from .report import report

__version__ = "0.1.0"


def __getattr__(name):
    # The HF cache imports transformers: load it on first use, keeping `import kvpass` light.
    if name == "KVCache":
        from .cache import KVCache

        return KVCache
    raise AttributeError(f"module 'kvpass' has no attribute {name!r}")


__all__ = ["Config", "Dense", "AnTKV", "KIVI", "WaveIndex", "DenseFFN", "Chess", "backend", "Backend", "KvpassMatchError", "compile", "attach", "detach",
           "report", "reset", "sequence", "KVCache"]
