"""The weights CHESS's sparse decode kernels read, laid out input-major in place before the model is first traced.

The kernels read whole rows of the input channels that survive the thresholds: the down projection's (I, Ho) and,
with CHESS+, the query and output projections' (K, N). An nn.Linear stores (out, in), which scatters those rows, so
without this step the plan keeps an input-major copy of each such weight (3.5 GiB for Llama-3-8B's down projections,
5.5 GiB with the projections). Re-laying the parameter out in place (same shape, strides (1, out)) costs nothing
at run time: every dense product over it is a cuBLAS or Inductor GEMM that takes either layout.

Dynamo guards the strides of the weights it reads, so the layout must be final before the first trace of the model.
Which weights are the sites' is known from the same matchers the rewrite runs: `kvpass.compile` traces the model
once on a two-token input, with Dynamo and a backend that only finds the sites (no compiler), before it compiles.
"""
from __future__ import annotations

import inspect

import torch

from ._logging import logger
from .kernels_dispatch import use_triton
from .patterns.matchers import find_attention, find_ffn, find_projections, real_values


def relayout_for_sparse_kernels(model: torch.nn.Module, plan) -> int:
    """Store the parameters the sparse kernels of `plan` (kvpass.methods.chess.ChessPlan, or None) will read
    input-major, in place. Returns how many were re-laid out. A model the discovery trace cannot take whole (a graph
    break, a forward that needs more than input ids) is left as it is: the plan copies those weights instead."""
    if plan is None:
        return 0
    try:
        weights = _sparse_kernel_weights(model, plan)
    except Exception as error:  # noqa: BLE001 - an optimisation only: the rewrite's copies serve any model
        logger.info("CHESS weights not re-laid out in place (the discovery trace failed: %s: %s); the sparse kernels "
                    "read input-major copies", type(error).__name__, error)
        return 0
    by_address = {(p.data_ptr(), tuple(p.shape)): p for p in model.parameters()}
    before = plan.relaid_out()
    plan.relayout(by_address[key] for key in weights if key in by_address)
    return plan.relaid_out() - before


def _sparse_kernel_weights(model: torch.nn.Module, plan) -> set[tuple[int, tuple]]:
    """(data_ptr, shape) of each weight a rewritten site would read input-major, from one Dynamo trace of `model`
    on a (1, 2) input (fullgraph: a graph break would leave compiled frames of the model's own code behind)."""
    found: set[tuple[int, tuple]] = set()

    def discover(gm: torch.fx.GraphModule, example_inputs):
        values = real_values(gm, example_inputs)
        attention, _ = find_attention(gm.graph)
        for site in find_ffn(gm.graph)[0]:
            weight = values.get(site.down.weight)
            if weight is not None and not site.down.transposed and plan.wants_ffn(site.layer, weight, False):
                found.add((weight.data_ptr(), tuple(weight.shape)))
        for site in find_projections(attention)[0] if plan.selective else ():
            weight = values.get(site.projection.weight)
            if weight is not None and not site.projection.transposed and plan.wants_projection(
                    site.kind, site.layer, weight):
                found.add((weight.data_ptr(), tuple(weight.shape)))
        return gm.forward

    parameter = next(model.parameters(), None)
    if parameter is None or not use_triton(parameter):   # the dense path reads the weights as they are
        return found
    ids = torch.zeros((1, 2), dtype=torch.long, device=parameter.device)
    kwargs = {"use_cache": False} if "use_cache" in inspect.signature(type(model).forward).parameters else {}

    def run(ids):
        return model(input_ids=ids, **kwargs)

    try:
        with torch.no_grad():
            torch.compile(run, backend=discover, fullgraph=True, dynamic=False)(ids)
    finally:
        torch._C._dynamo.eval_frame.reset_code(run.__code__)  # the discovery's compiled frame goes with it
    return found
