"""The graph pass: find attention and FFN sites in a Dynamo FX graph and replace them with kvpass ops.

`rewrite(gm, ...)` runs every matcher, rewrites what the config asks for, and returns a `Record`
(the match table, what was rewritten, what did not match and why). Rewriting happens on the Dynamo
graph, before AOTAutograd: after it SDPA becomes a device- and dtype-specific aten op, and matching
those silently dropped masks on CPU and matched nothing on CUDA (DESIGN.md).
"""
from __future__ import annotations

import collections
import dataclasses

import torch
from torch import fx

from kvpass import ffn_ops  # noqa: F401  (registers torch.ops.kvpass.ffn and sparse_linear, which the rewrite emits)
from kvpass.graph_inputs import add_tensor
from kvpass.ops import MODE_CACHED, MODES
from kvpass.patterns.matchers import (Mismatch, find_attention, find_ffn, find_projections, is_decode_step, module_path,
                                     real_values, rewrite_attention, rewrite_ffn, rewrite_projection)
from kvpass.patterns.matchers.effects import eliminate_dead_code

__all__ = ["Record", "rewrite"]


@dataclasses.dataclass
class Record:
    """What one compiled graph contained and what kvpass did to it."""

    attention_sites: int = 0
    ffn_sites: int = 0
    sparse_ffn_sites: int = 0        # FFN sites given CHESS thresholds
    sparse_projections: int = 0      # query/output projections given CHESS+ thresholds
    layers: int = 0
    rewritten: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    found: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    modes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    unmatched_attention: list[str] = dataclasses.field(default_factory=list)
    unmatched_ffn: list[str] = dataclasses.field(default_factory=list)
    nodes: int = 0
    captured_decode_sites: int = 0   # decode steps given kvpass::decode_attention (replayable, kvpass.engine)
    decode_needs_hf_mask: bool = False  # an attention left as HF wrote it (or reading the cache unfused) is here
    rewrite_seconds: float = 0.0     # the kvpass pass over this graph (match, rewrite, dead-code pass)
    inner_compile_seconds: float = 0.0  # the inner compiler (Inductor, ...) over the rewritten graph

    @property
    def unmatched(self) -> list[str]:
        return self.unmatched_attention + self.unmatched_ffn

    def table(self) -> str:
        rows = [f"{'pattern':28s} {'found':>5s} {'rewritten':>9s}"]
        for name in sorted(self.found):
            rows.append(f"{name:28s} {self.found[name]:5d} {self.rewritten.get(name, 0):9d}")
        modes = ", ".join(f"{MODES[m]}: {n}" for m, n in sorted(self.modes.items())) or "-"
        rows.append(f"attention sites {self.attention_sites}, FFN sites {self.ffn_sites}, layers {self.layers}, "
                    f"attention modes {{{modes}}}, unmatched {len(self.unmatched)}")
        if self.captured_decode_sites:
            rows.append(f"decode steps for the decode engine (kvpass::decode_attention): {self.captured_decode_sites}")
        if self.sparse_ffn_sites or self.sparse_projections:
            rows.append(f"sparse (CHESS): {self.sparse_ffn_sites} FFN sites, {self.sparse_projections} projections")
        rows += [f"  unmatched: {u}" for u in self.unmatched]
        return "\n".join(rows)


def _window_of(root: torch.nn.Module | None, node: fx.Node) -> int:
    """Sliding window of the attention module a site was traced in (0 if none). HF's prefill masks apply it; the
    decode step, which reads no HF mask, and callers that pass none need it. HF says it three ways: the module's
    `sliding_window` (Qwen2, Gemma-2/3: None on full-attention layers), else the config's `layer_types` entry for
    the module's layer, else the config's `sliding_window` for every layer (Mistral passes it at call time).
    The runtime checks the prefill mask against it (Runtime._check_window)."""
    if root is None:
        return 0
    try:
        module = root.get_submodule(module_path(node))
    except AttributeError:
        return 0
    if hasattr(module, "sliding_window"):
        window = module.sliding_window
    else:
        config = getattr(module, "config", None)
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        layer = getattr(module, "layer_idx", None)
        if layer_types is not None and isinstance(layer, int) and layer < len(layer_types):
            window = window if layer_types[layer] == "sliding_attention" else None
    return int(window) if isinstance(window, int) and window > 0 else 0


def rewrite(gm: fx.GraphModule, runtime_id: int, rewrite_ffn_sites: bool, root: torch.nn.Module | None = None,
            explain: set[str] = frozenset(), plan=None, example_inputs=(),
            captured_decode: bool = False) -> tuple[Record, list[Mismatch]]:
    """Rewrite `gm` in place. Returns the record and the mismatches (for warnings and explanations).

    captured_decode: decode-step sites become kvpass::decode_attention (the runtime's decode engine drives them),
    unless an attention of the graph stays unrewritten or a cache update stays unfused: HF's own attention then
    runs and needs HF's mask, which the engine does not pass (Record.decode_needs_hf_mask says so).

    plan: None, or the runtime's kvpass.methods.chess.ChessPlan: FFN sites of calibrated layers become thresholded
    and, when selective, so do the query/output projections; example_inputs: the real inputs of gm's placeholders,
    from which the plan makes the sparse kernels' weight copies now (not at the first decode step). The thresholds
    and copies are stored on gm and read by get_attr nodes (kvpass.graph_inputs)."""
    graph = gm.graph
    record = Record(nodes=len(graph.nodes))
    attention, attention_misses = find_attention(graph)
    ffns, ffn_misses = find_ffn(graph)
    record.attention_sites, record.ffn_sites = len(attention), len(ffns)
    record.layers = len({site.layer for site in attention})
    projections = []
    if plan is not None and plan.selective:
        projections, projection_misses = find_projections(attention)
        ffn_misses += projection_misses
    values = real_values(gm, example_inputs) if plan is not None else {}
    updates = sum(1 for node in graph.nodes if node.op == "call_function"
                  and node.target in (torch.ops.kvpass.cache_update, torch.ops.kvpass.cache_update.default))
    record.decode_needs_hf_mask = bool(attention_misses) or updates > sum(site.mode == MODE_CACHED for site in attention)
    captured_decode = captured_decode and not record.decode_needs_hf_mask

    for site in attention:
        record.found[site.variant] += 1
        record.modes[site.mode] += 1
        rewrite_attention(graph, site, runtime_id, _window_of(root, site.output), captured_decode)
        record.captured_decode_sites += captured_decode and is_decode_step(site)
        record.rewritten[site.variant] += 1
    for site in ffns:
        record.found[site.variant] += 1
        tensors = None
        if plan is not None:
            down = values.get(site.down.weight)
            tensors = None if down is None else plan.ffn_tensors(site.layer, down, site.down.transposed)
            if tensors is None:
                ffn_misses.append(Mismatch(site.output, f"no CHESS thresholds for layer {site.layer} in the "
                                                        f"calibration (or its down weight is unknown): this FFN "
                                                        f"stays exact"))
            else:
                record.sparse_ffn_sites += 1
        if rewrite_ffn_sites:
            with graph.inserting_before(site.output):
                reads = [None if t is None else add_tensor(gm, t) for t in tensors or (None, None)]
            rewrite_ffn(graph, site, *reads)
            record.rewritten[site.variant] += 1
    for site in projections:
        threshold = plan.projection_threshold(site.kind, site.layer)
        name = f"{site.kind}-projection"
        record.found[name] += 1
        if threshold is None:
            ffn_misses.append(Mismatch(site.projection.node, f"no calibrated {name} input threshold for layer "
                                                             f"{site.layer}: it stays dense"))
            continue
        weight = values.get(site.projection.weight)
        copy = None if weight is None else plan.projection_copy(weight, site.projection.transposed)
        with graph.inserting_before(site.projection.node):
            read = None if copy is None else add_tensor(gm, copy)
        rewrite_projection(graph, site, threshold, read)
        record.rewritten[name] += 1
        record.sparse_projections += 1

    # drops replaced sites and the cache updates fused into kvpass::attention, keeping in-place writes whose
    # result nothing reads (MLA's key copies, a router's scatter_): FX's own pass would drop those too
    eliminate_dead_code(graph)
    for node in graph.nodes:  # cache updates no attention site consumed: correct, but the past is copied
        if node.op == "call_function" and node.target in (torch.ops.kvpass.cache_update, torch.ops.kvpass.cache_update.default):
            attention_misses.append(Mismatch(node, "kvpass cache update not fused into an attention op (the attention that "
                                         "reads it did not match): every step materializes the whole past"))
    record.unmatched_attention = [m.describe() for m in attention_misses]
    record.unmatched_ffn = [m.describe() for m in ffn_misses]
    misses = attention_misses + ffn_misses
    graph.lint()
    gm.recompile()
    for name in explain:
        record_explanation(name, attention, ffns, misses)
    return record, misses


def record_explanation(name, attention, ffns, misses) -> None:
    from kvpass._logging import logger

    for site in attention + ffns:
        if site.output.name == name:
            logger.warning("KVPASS_EXPLAIN %s: matched %s (layer %s)", name, site.variant, site.layer)
            return
    for miss in misses:
        if miss.node.name == name:
            logger.warning("KVPASS_EXPLAIN %s: not matched: %s", name, miss.reason)
            return
    logger.warning("KVPASS_EXPLAIN %s: not a candidate (not an SDPA call, attention matmul, or projection fed by "
                   "an activation), or not in this graph", name)

