"""Which nodes of a Dynamo FX graph a dead-code pass must keep although nothing reads their result.

`fx.Graph.eliminate_dead_code()` keeps a node only if `Node.is_impure()` says so, and that answers False for every
`call_method` node and for Python's in-place operators: `buf[..., :16].copy_(k_nope)`, `mask.scatter_(1, idx, 1)`,
`out.add_(bias)` and `x += y` disappear when their result is unused, and whatever they were writing into is read
uninitialized or unchanged. Dynamo graphs of HF models carry such writes: DeepSeek-V2/V3's MLA keys (`new_empty`
then two `copy_`), DeepSeek-V3's grouped router (`scatter_`), GPT-OSS's expert biases (`add_`). A pass that removes
dead code from a model's graph passes `is_impure_node=has_side_effects`.
"""
from __future__ import annotations

import operator

from torch import fx

_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.setitem}


def _inplace_name(name) -> bool:
    """PyTorch's naming rule for in-place ops: a trailing underscore (add_, copy_, index_add_), not a dunder."""
    return isinstance(name, str) and name.endswith("_") and not name.startswith("_")


def has_side_effects(node: fx.Node) -> bool:
    """Whether removing `node` could change what the graph computes, even if no node reads its result."""
    if node.is_impure():
        return True
    if node.op == "call_method":
        return _inplace_name(node.target) or "out" in node.kwargs
    if node.op == "call_function":
        return node.target in _INPLACE_OPERATORS or _inplace_name(getattr(node.target, "__name__", None)) \
            or "out" in node.kwargs
    return False


def eliminate_dead_code(graph: fx.Graph) -> bool:
    """`graph.eliminate_dead_code()` that keeps in-place writes; True if anything was removed."""
    return graph.eliminate_dead_code(is_impure_node=has_side_effects)
