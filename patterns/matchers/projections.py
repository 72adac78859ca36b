"""Attention projection matcher: the query projection feeding an attention site and the output projection it
feeds, found from the site itself (never by module names), for CHESS+'s selective sparsity.

  query:  linear(x) -> view/transpose -> [q-norm] -> [RoPE] -> attention's q   (the one projection above q)
  output: attention -> transpose/reshape/contiguous ... -> linear               (the one projection below it)

A query projection that also produces keys or values (a fused qkv projection, Phi-3 and GPT-NeoX) is refused
with a reason: thresholding its input would sparsify the keys and values too, which CHESS+ never does.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import fx

from .attention import AttentionSite, Mismatch
from .ffn import Projection, projection_of, replace_node, weight_args
from .graph import is_call, is_method

_PASS_THROUGH_METHODS = {"view", "reshape", "contiguous", "transpose", "permute", "flatten"}
_PASS_THROUGH_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute, torch.flatten}


@dataclasses.dataclass
class ProjectionSite:
    kind: str                # "q" (query projection) or "o" (output projection)
    projection: Projection
    layer: int


def _projections_above(node: fx.Node) -> set[fx.Node]:
    """The projection nodes reached walking up from `node` without passing through a projection."""
    found, seen, todo = set(), set(), [node]
    while todo:
        current = todo.pop()
        if current in seen or not isinstance(current, fx.Node):
            continue
        seen.add(current)
        if projection_of(current) is not None:
            found.add(current)
            continue
        todo.extend(current.all_input_nodes)
    return found


def query_projection(site: AttentionSite) -> ProjectionSite | Mismatch:
    above_q = _projections_above(site.q)
    if len(above_q) != 1:
        return Mismatch(site.output, f"the query comes from {len(above_q)} projections, not one")
    (node,) = above_q
    if node in _projections_above(site.k) | _projections_above(site.v):
        return Mismatch(site.output, "fused qkv projection: thresholding its input would also sparsify the keys and "
                                     "values (selective sparsity leaves this layer's query input dense)")
    return ProjectionSite("q", projection_of(node), site.layer)


def output_projection(site: AttentionSite) -> ProjectionSite | Mismatch:
    node = site.output
    while len(node.users) == 1:
        (user,) = node.users
        projection = projection_of(user)
        if projection is not None and projection.x is node:
            return ProjectionSite("o", projection, site.layer)
        if not (is_method(user, *_PASS_THROUGH_METHODS) or is_call(user, *_PASS_THROUGH_FUNCTIONS)):
            break
        node = user
    return Mismatch(site.output, "the attention output does not reach a projection through views alone")


def find_projections(sites: list[AttentionSite]) -> tuple[list[ProjectionSite], list[Mismatch]]:
    """The query and output projections of each attention site; those not found come back as mismatches."""
    found, misses = [], []
    for site in sites:
        for result in (query_projection(site), output_projection(site)):
            (found if isinstance(result, ProjectionSite) else misses).append(result)
    return found, misses


def rewrite_projection(graph: fx.Graph, site: ProjectionSite, threshold: float, w_t: fx.Node | None = None) -> fx.Node:
    """Replace the projection by `kvpass::sparse_linear`, its input zeroed below `threshold`; w_t: None or a node
    reading the weight's input-major copy (K, N) for the sparse kernel."""
    p = site.projection
    with graph.inserting_before(p.node):
        weight, bias = weight_args(graph, p, None)
        new = graph.call_function(torch.ops.kvpass.sparse_linear.default,
                                  args=(p.x, weight, bias, float(threshold), w_t))
    replace_node(p.node, new)
    return new
