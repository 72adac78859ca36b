"""FX helpers shared by the patterns: module paths, layer ids, and seeing through views and repeat_kv."""
from __future__ import annotations

import operator
import re

import torch
from torch import fx

_VIEW_METHODS = {"view", "reshape", "contiguous"}
_VIEW_FUNCTIONS = {torch.reshape, torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.contiguous}


# Dynamo names the module a node was traced in by a Python expression over the compiled frame's locals:
# L['self'].model.layers.3 for a plain forward, L['args'][0].model.layers.3 when the forward is wrapped by a
# decorator that takes *args (transformers 5.25 wraps it so). The root is that leading local expression.
_ROOT = re.compile(r"^L\['(\w+)'\]((?:\[\d+\])*)\.?")


def module_path(node: fx.Node) -> str:
    """The innermost module the node was traced in, relative to the compiled module, e.g.
    "model.layers.3.self_attn" ("" if unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return _ROOT.sub("", list(stack.values())[-1][0])


def module_root(node: fx.Node) -> tuple[str, tuple[int, ...]] | None:
    """Where the compiled module sits in the frame's locals: ("self", ()) for L['self'], ("args", (0,)) for
    L['args'][0]; None if the node carries no module path of that form."""
    stack = node.meta.get("nn_module_stack") or {}
    match = _ROOT.match(list(stack.values())[-1][0]) if stack else None
    if match is None:
        return None
    return match.group(1), tuple(int(i) for i in re.findall(r"\d+", match.group(2)))


def layer_of(node: fx.Node) -> int | None:
    """Layer index from the module path: the last integer component (layers.3, h.3, blocks.3, ...)."""
    numbers = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", module_path(node))
    return int(numbers[-1]) if numbers else None


def shape_of(node) -> tuple | None:
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def is_call(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def is_method(node, *names) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def through_views(node):
    """Walk up view/reshape/contiguous nodes (and p=0 dropouts) to the node that produced the data."""
    while isinstance(node, fx.Node):
        if is_method(node, *_VIEW_METHODS) or is_call(node, *_VIEW_FUNCTIONS):
            node = node.args[0]
        elif is_call(node, torch.nn.functional.dropout) and _dropout_is_identity(node):
            node = node.args[0]
        else:
            break
    return node


def _dropout_is_identity(node) -> bool:
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    return p == 0.0 or training is False


def strip_repeat_kv(node):
    """If `node` is HF's repeat_kv (x[:, :, None].expand(B, H, n, L, D).reshape(B, H*n, L, D)) or
    x.repeat_interleave(n, dim=1), return x (the KV heads); otherwise return node unchanged."""
    if is_method(node, "reshape", "view") or is_call(node, torch.reshape):
        expanded = node.args[0]
        if is_method(expanded, "expand") and isinstance(expanded.args[0], fx.Node):
            unsqueezed = expanded.args[0]
            if is_call(unsqueezed, operator.getitem) and _is_none_at_dim2(unsqueezed.args[1]):
                return unsqueezed.args[0]
            if is_method(unsqueezed, "unsqueeze") and unsqueezed.args[1:] == (2,):
                return unsqueezed.args[0]
    if (is_call(node, torch.repeat_interleave) or is_method(node, "repeat_interleave")) and \
            node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None) == 1:
        return node.args[0]
    return node


def _is_none_at_dim2(index) -> bool:
    return isinstance(index, tuple) and len(index) >= 3 and index[2] is None and all(
        isinstance(i, slice) and i == slice(None) for i in index[:2])



def real_values(gm: fx.GraphModule, example_inputs) -> dict[fx.Node, torch.Tensor]:
    """The real tensors behind gm's placeholders (Dynamo passes them as example inputs, weights included when
    modules are inlined), get_attr nodes (weights of non-inlined modules) and `to_local()` of either (a weight
    sharded by a tensor-parallel plan is a DTensor, whose local shard is what the graph multiplies by)."""
    values = {}
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if isinstance(value, torch.Tensor):
            values[node] = value
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part, None)
            if isinstance(value, torch.Tensor):
                values[node] = value
        elif (node.op == "call_method" and node.target == "to_local" and len(node.args) == 1
              and hasattr(values.get(node.args[0]), "to_local")):
            values[node] = values[node.args[0]].to_local()
    return values
