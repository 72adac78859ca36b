"""`kvpass.report(model)`: what the last compile of a model rewrote, and what its cache holds."""
from __future__ import annotations

from .backend import backend_of
from .methods import captured_decode_supported
from .ops import MODES


class Report(dict):
    """kvpass.report's result: a plain dict (JSON-ready) whose text form is one `key: value` line per entry,
    nested dicts and lists indented below their key, instead of one long line."""

    def __str__(self) -> str:
        return "\n".join(_lines(self, 0))


def _lines(value, depth: int):
    pad = "  " * depth
    for key, item in value.items():
        if isinstance(item, dict) and item:
            yield f"{pad}{key}:"
            yield from _lines(item, depth + 1)
        elif isinstance(item, list) and item:
            yield f"{pad}{key}:"
            for entry in item:
                yield f"{pad}  - {entry}"
        else:
            yield f"{pad}{key}: {item}"


def report(model) -> Report:
    """A plain dict: sites found and rewritten by the last compiled graph, unmatched sites with reasons,
    graphs compiled, attention calls by mode, the bytes the KV cache holds now and has allocated, and the decode
    engine's counts. `print(kvpass.report(model))` shows it one entry per line."""
    backend = backend_of(model)
    base = {"compiled": False, "attention_sites": 0, "ffn_sites": 0, "rewritten": {}, "unmatched": [], "layers": 0,
            "graphs": 0}
    if backend is None or not backend.records:
        how = ("it has a kvpass runtime (kvpass.attach) but was never compiled" if backend is not None else
               "it has no kvpass backend")
        base["note"] = (f"this model was never run through a kvpass backend: {how}. Note that torch.compile(model) "
                        f"returns a wrapper whose .generate runs the uncompiled model; use kvpass.compile(model, "
                        f"config) or model.compile(backend=kvpass.backend(config)) to compile in place")
        if backend is not None:
            base.update(_runtime_part(backend.runtime))
        return Report(base)
    last = next((r for r in reversed(backend.records) if r.attention_sites), backend.records[-1])
    base.update({
        "compiled": True,
        "config": backend.config.to_dict(),
        "attention_sites": last.attention_sites,
        "ffn_sites": last.ffn_sites,
        "rewritten": dict(last.rewritten),
        "found": dict(last.found),
        "unmatched": list(last.unmatched),
        "layers": last.layers,
        "graphs": len(backend.records),
        # Seconds the kvpass pass took over every graph compiled, beside the inner compiler's (Inductor's) seconds.
        "compile_seconds": {"kvpass_pass": sum(r.rewrite_seconds for r in backend.records),
                            "inner": sum(r.inner_compile_seconds for r in backend.records)},
        "attention_modes": {MODES[m]: n for m, n in last.modes.items()},
    })
    if backend.engine is not None:
        base["decode_engine"] = backend.engine.report()
    else:  # a method without the captured-decode contract (or a model bound by attach alone): said, not hidden
        base["decode_engine"] = {"captured": False, "not_captured": (
            f"{backend.config.attention!r} does not meet the captured-decode contract yet: its decode steps run "
            f"uncaptured, one kvpass::attention call per layer" if not captured_decode_supported(
                backend.config.attention) else "no decode engine: the model was not compiled in place "
            "(kvpass.compile(model, config) or model.compile(backend=...))")}
    plan = backend.runtime.chess_plan()
    if plan is not None:
        base["chess"] = {"sparse_ffn_sites": last.sparse_ffn_sites, "sparse_projections": last.sparse_projections,
                         "weight_copy_bytes": plan.nbytes(), "weights_relaid_out": plan.relaid_out()}
    base.update(_runtime_part(backend.runtime))
    return Report(base)


def _runtime_part(runtime) -> dict:
    held = runtime.nbytes()
    part = {"layer_stats": stats} if (stats := runtime.layer_stats()) else {}
    return {**part, "kv_bytes": sum(held.values()), "kv_bytes_by_part": held,
            "kv_bytes_allocated": runtime.allocated_nbytes(), "tokens_held": runtime.tokens_held(),
            "sequences": runtime.sequences_started,
            "attention_calls": {f"{mode}/{phase}": n for (mode, phase), n in sorted(runtime.calls.items())}}
