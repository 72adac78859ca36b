"""Tensors the rewrite adds to a Dynamo graph (CHESS thresholds, input-major weight copies), and how they reach the
inner compiler as graph inputs.

The rewrite reads them through `get_attr` nodes of non-persistent buffers of the GraphModule, named with
`PREFIX`: the rewritten graph then runs as it is (inner="eager"). AOTAutograd refuses such constants (it traces
under fake tensors, and a module's parameters must all come from Dynamo), so for the other inner compilers
`lift` turns them into trailing placeholders of a copy of the graph, marked static the way Dynamo marks a
model's parameters: CUDA graphs read them in place rather than copying them before every replay (the copies of
Llama-3-8B's down projections are 3.5 GiB). The compiled function is wrapped to pass them.

Dynamo keeps using the graph it handed to the backend after the backend returns (its placeholders are its
graph arguments), hence a copy rather than new placeholders in place.

What AOTAutograd reads from a Dynamo graph is not public API: the graph module's `meta["dynamo_compile_id"]` and
`_param_name_to_source`, each placeholder's `_dynamo_source`, and `meta["tensor_dict"]["_dynamo_static_input_type"]`
for inputs that CUDA graphs must not copy (torch._functorch._aot_autograd.frontend_utils, the same fields
DDPOptimizer's split graphs carry). tests/test_graph_inputs.py checks the static indices AOTAutograd derives, on
torch 2.13 (CPU) and 2.11 (H100).
"""
from __future__ import annotations

import torch
from torch import fx
from torch._guards import detect_fake_mode

PREFIX = "_kvpass_tensor_"


def add_tensor(gm: fx.GraphModule, tensor: torch.Tensor) -> fx.Node:
    """A get_attr node reading `tensor`, registered on gm as a non-persistent buffer under a fresh PREFIX name
    (insert with graph.inserting_*)."""
    name = f"{PREFIX}{sum(1 for name in gm._buffers if name.startswith(PREFIX))}"
    gm.register_buffer(name, tensor, persistent=False)
    return gm.graph.get_attr(name)


def lift(gm: fx.GraphModule, example_inputs) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """(graph module, tensors): a copy of gm whose added tensors are trailing placeholders, and those tensors in
    placeholder order; gm itself when it reads none."""
    reads = [node for node in gm.graph.nodes if node.op == "get_attr" and node.target.startswith(PREFIX)]
    if not reads:
        return gm, []
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, env)
    for old, new in env.items():
        if old.op == "placeholder":   # AOTAutograd takes Dynamo's sources from here (parameters are static)
            new._dynamo_source = getattr(old, "_dynamo_source", None)
    fake_mode = detect_fake_mode(example_inputs)
    tensors = []
    with graph.inserting_after(next(reversed(graph.find_nodes(op="placeholder")))):
        for read in reversed(reads):   # each insertion goes right after the last placeholder: reverse keeps order
            tensor = getattr(gm, read.target)
            placeholder = graph.placeholder(read.target)
            placeholder._dynamo_source = None
            fake = tensor if fake_mode is None else fake_mode.from_tensor(tensor, static_shapes=True)
            placeholder.meta.update(example_value=fake, val=fake,
                                    tensor_dict={"_dynamo_static_input_type": "unguarded"})
            env[read].replace_all_uses_with(placeholder)
            graph.erase_node(env[read])
            tensors.append(tensor)
    tensors.reverse()
    graph.output(output)
    lifted = fx.GraphModule(gm, graph)
    lifted.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        lifted._param_name_to_source = gm._param_name_to_source
    return lifted, tensors


def passing(compiled, tensors: list[torch.Tensor]):
    """`compiled`, called with the lifted tensors after Dynamo's arguments (Dynamo calls a backend's result with
    positional arguments)."""
    if not tensors:
        return compiled

    def call(*args):
        return compiled(*args, *tensors)

    return call
