"""A Dynamo backend that shows calibration what the rewrite will touch: every FFN site and every attention's query
and output projection, found by the same matchers, computed exactly by an observer that records them.

The graph runs as Python (no inner compiler): calibration runs each shape once or a few times, and the
observers are plain Python functions.
"""
from __future__ import annotations

from torch import fx

from kvpass import ffn_ops  # noqa: F401  (registers torch.ops.kvpass.ffn and sparse_linear, the nodes rewritten here)
from kvpass.patterns.matchers import find_attention, find_ffn, find_projections, rewrite_ffn, rewrite_projection
from kvpass.patterns.matchers.effects import eliminate_dead_code


def recording_backend(recorder):
    """recorder: has `ffn(<kvpass::ffn args>, layer)` and `projection(<kvpass::sparse_linear args>, kind, layer)`
    (kvpass.calibration.chess.Recorder); returns a torch.compile backend."""

    def backend(gm: fx.GraphModule, example_inputs):
        graph = gm.graph
        sites, _ = find_attention(graph)
        projections, _ = find_projections(sites)
        for site in find_ffn(graph)[0]:
            node = rewrite_ffn(graph, site)
            node.target, node.args = recorder.ffn, (*node.args, site.layer)
        for site in projections:
            node = rewrite_projection(graph, site, 0.0)
            node.target, node.args = recorder.projection, (*node.args, site.kind, site.layer)
        eliminate_dead_code(graph)  # keeps in-place writes (kvpass.patterns.matchers.effects)
        gm.recompile()
        return gm.forward

    return backend
