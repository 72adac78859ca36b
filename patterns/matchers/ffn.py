"""FFN site matcher: a down projection fed by an elementwise activation of one or two up projections.

Shapes found in HF models (the catalogue lists which family each came from):
  gated:  down(act(gate(x)) * up(x))                 Llama/Mistral/Qwen (SiLU), Gemma (tanh-GELU)
  fused:  down(up * act(gate)), gate, up = chunk(gate_up(x), 2)   Phi-3
  plain:  down(act(up(x)))                            GPT-NeoX (GELU), OPT (ReLU), GPT-2 (Conv1D addmm, NewGELU
                                                      decomposed into tanh arithmetic)
Projections are `F.linear` or `torch.addmm` (Conv1D, weight stored transposed). The activation is not
matched op by op: the elementwise region between projection and product is cut out of the graph and
evaluated on a probe, then named by comparison with the known activations. That recognises a
decomposed GELU as readily as `F.gelu`, and refuses anything that is not one of them.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.nn.functional as F
from torch import fx

from kvpass.kernels.sparse_ffn import ACTIVATIONS

from .attention import Mismatch
from .graph import is_call, is_method, layer_of, shape_of, through_views

_ELEMENTWISE_FUNCTIONS = {
    operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, operator.pow,
    torch.mul, torch.add, torch.sub, torch.div, torch.neg, torch.pow, torch.tanh, torch.sigmoid, torch.erf,
    torch.relu, F.silu, F.gelu, F.relu, F.sigmoid, torch.nn.functional.gelu,
    # not among the known activations, but elementwise: an FFN using them is found and refused with its reason
    torch.square, torch.abs, torch.exp, torch.expm1, torch.log1p, torch.clamp, torch.minimum, torch.maximum,
    torch.where, F.softplus, F.leaky_relu, F.elu, F.mish, F.hardswish, F.relu6,
}
_ELEMENTWISE_METHODS = {"mul", "add", "sub", "div", "neg", "pow", "tanh", "sigmoid", "relu", "to", "float", "type",
                        "square", "abs", "exp", "clamp", "clamp_min", "clamp_max"}
_CASTS = ("to", "float", "type", "half", "bfloat16")


@dataclasses.dataclass
class Projection:
    node: fx.Node            # the linear/addmm call
    x: fx.Node               # its input
    weight: fx.Node          # as stored (linear: (out, in); addmm: (in, out))
    bias: fx.Node | None
    transposed: bool         # True for Conv1D/addmm
    grouped: bool = False    # MoE experts: one weight per expert (E, ...), a grouped GEMM over routed tokens


@dataclasses.dataclass
class FFNSite:
    variant: str
    output: fx.Node          # the down projection, replaced by the op
    x: fx.Node
    up: Projection
    down: Projection
    gate: Projection | None
    chunked: bool            # gate/up are the two halves of one fused projection (`up`)
    activation: str
    layer: int


def projection_of(node) -> Projection | None:
    """The projection a node computes, else None: `F.linear`; Conv1D's `addmm`; `x @ W.T` (+ bias) with W a weight
    of the model (Falcon's FalconLinear); or a grouped GEMM of MoE experts over a stacked (E, ...) weight."""
    if is_call(node, F.linear, torch._C._nn.linear):
        bias = node.kwargs.get("bias", node.args[2] if len(node.args) > 2 else None)
        return Projection(node, node.args[0], node.args[1], bias, transposed=False)
    if is_call(node, torch.addmm) and not node.kwargs:
        return Projection(node, node.args[1], node.args[2], node.args[0], transposed=True)
    if is_call(node, operator.add, torch.add) and len(node.args) == 2 and not node.kwargs:
        for product, bias in (node.args, node.args[::-1]):
            inner = _weight_matmul(product)
            if inner is not None and _model_tensor(bias, dims=1):
                return dataclasses.replace(inner, node=node, bias=bias)
        return None
    matmul = _weight_matmul(node)
    if matmul is not None:
        return matmul
    if node.op == "call_function" and "grouped_mm" in str(node.target) and len(node.args) >= 2:
        weight = _transposed_weight(node.args[1], dims=3)
        if weight is not None:
            return Projection(node, node.args[0], weight, None, transposed=False, grouped=True)
    return None


def _weight_matmul(node) -> Projection | None:
    """x @ W.T (or W.t(), W.transpose(-1, -2)) with W a 2-D weight of the model: F.linear written out."""
    if not (is_call(node, operator.matmul, torch.matmul) and len(node.args) == 2):
        return None
    weight = _transposed_weight(node.args[1], dims=2)
    return None if weight is None else Projection(node, node.args[0], weight, None, transposed=False)


def _transposed_weight(node, dims: int):
    """W for W.T, W.t(), W.transpose(-2, -1) (or (0, 1) in 2-D) where W is a `dims`-D weight of the model."""
    if is_call(node, getattr) and node.args[1:] in (("T",), ("mT",)):
        inner = node.args[0]
    elif is_method(node, "t") or is_call(node, torch.t):
        inner = node.args[0]
    elif (is_method(node, "transpose") or is_call(node, torch.transpose)) and \
            sorted(a % dims if isinstance(a, int) else a for a in node.args[1:3]) == [dims - 2, dims - 1]:
        inner = node.args[0]
    else:
        return None
    return inner if _model_tensor(inner, dims) else None


def _model_tensor(node, dims: int) -> bool:
    """A parameter or buffer of the model with `dims` dims: what Dynamo lifts to a placeholder, or a get_attr."""
    if not isinstance(node, fx.Node) or node.op not in ("placeholder", "get_attr"):
        return False
    value = node.meta.get("example_value")
    target = str(node.target)
    lifted = node.op == "get_attr" or isinstance(value, torch.nn.Parameter) or "_parameters_" in target or \
        "_buffers_" in target
    return lifted and isinstance(value, torch.Tensor) and value.dim() == dims


def _is_elementwise(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS
    return node.op == "call_method" and node.target in _ELEMENTWISE_METHODS


def _activation_region(top: fx.Node):
    """Nodes from `top` upward while elementwise; -> (source node, region nodes in graph order) or None.
    The region must depend on exactly one non-elementwise source (a projection or chunk half)."""
    region, sources, todo = set(), set(), [top]
    while todo:
        node = todo.pop()
        if node in region:
            continue
        if not _is_elementwise(node) or projection_of(node) is not None:  # a biased x @ W.T + b ends in an add
            sources.add(node)
            continue
        region.add(node)
        todo.extend(arg for arg in node.all_input_nodes)
    if len(sources) != 1 or len(region) > 32:
        return None
    ordered = [n for n in top.graph.nodes if n in region]
    return next(iter(sources)), ordered


def _classify(source: fx.Node, region: list[fx.Node]) -> str | None:
    """Evaluate the region on a probe and name the activation it computes (None if unknown)."""
    if not region:
        return "identity"
    graph = fx.Graph()
    env = {source: graph.placeholder("x")}
    for node in region:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[region[-1]])
    probe = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    try:
        value = fx.GraphModule(torch.nn.Module(), graph)(probe).double()
    except Exception:  # noqa: BLE001 - a region we cannot evaluate is simply not an activation we know
        return None
    if torch.allclose(value, probe, atol=1e-6, rtol=0):
        return "identity"  # dtype casts only
    for name, fn in ACTIVATIONS.items():
        if torch.allclose(value, fn(probe), atol=2e-5, rtol=0):  # gelu vs gelu_tanh differ by up to 5e-4
            return name
    return None


def _branch(node):
    """-> (activation name, projection or chunk half, ...) for one operand of the gating product."""
    node = through_views(node)
    found = _activation_region(node) if _is_elementwise(node) else (node, [])
    if found is None:
        return None
    source, region = found
    return _classify(source, region), through_views(source)


def _chunk_half(node):
    """getitem(chunk(P, 2, dim=-1), i) -> (P's projection, i)."""
    if is_call(node, operator.getitem) and is_method(node.args[0], "chunk"):
        chunk = node.args[0]
        parts = chunk.args[1] if len(chunk.args) > 1 else chunk.kwargs.get("chunks")
        dim = chunk.kwargs.get("dim", chunk.args[2] if len(chunk.args) > 2 else 0)
        projection = projection_of(through_views(chunk.args[0]))
        if parts == 2 and dim in (-1, 2) and projection is not None:
            return projection, node.args[1]
    return None


def match_ffn(node: fx.Node) -> FFNSite | Mismatch | None:
    down = projection_of(node)
    if down is None or any(projection_of(user) is not None for user in node.users if user.op == "call_function"
                           and user.target in (operator.add, torch.add)):
        return None  # x @ W.T whose bias is added next: the add is the site
    top = through_views(down.x)
    layer = layer_of(node)
    if not isinstance(top, fx.Node) or not _is_elementwise(top):
        return None  # fed by attention, a norm, an embedding...: not an FFN down projection
    found = _activation_region(top)
    if found is not None:  # one source: a plain MLP (a decomposed GELU is a product, but of one source)
        up = projection_of(through_views(found[0]))
        if up is None:
            return None  # e.g. a projection of a norm or of a residual sum: not an FFN
        act = _classify(*found)
        if act == "identity":
            return None  # two projections in a row (a low-rank factorisation), not an FFN
        if up.grouped or down.grouped:
            return _experts(node, down, f"mlp-{act or 'unknown activation'}")
        if act is None:
            return Mismatch(node, "the activation between the projections is none of " + ", ".join(ACTIVATIONS))
        variant = ("conv1d-mlp-" if down.transposed else "mlp-") + act
        return FFNSite(variant, node, up.x, up, down, None, False, act, layer)
    while is_method(top, *_CASTS):  # experts cast the gated product to the weights' dtype
        top = through_views(top.args[0])
    if not (is_call(top, operator.mul, torch.mul) and all(isinstance(a, fx.Node) for a in top.args[:2])):
        return None
    branches = [_branch(a) for a in top.args[:2]]
    if None in branches:
        return None
    (act_a, src_a), (act_b, src_b) = branches
    if act_a == "identity":
        (act_a, src_a), (act_b, src_b) = (act_b, src_b), (act_a, src_a)
    gate_half, up_half = _chunk_half(src_a), _chunk_half(src_b)
    gate, up = projection_of(src_a), projection_of(src_b)
    if gate_half and up_half and gate_half[0].node is up_half[0].node and (gate_half[1], up_half[1]) == (0, 1):
        variant, fused = "fused-glu-", gate_half[0]
    elif gate is not None and up is not None and through_views(gate.x) is through_views(up.x):
        variant, fused = "glu-", None
    else:
        return None  # a product of other things (e.g. a norm's weight times its input)
    if down.grouped or (fused or up).grouped:
        return _experts(node, down, variant + (act_a if act_b == "identity" and act_a else "unknown activation"))
    if act_b != "identity" or act_a in (None, "identity"):
        return Mismatch(node, f"gated FFN whose branches compute {act_a!r} and {act_b!r}; expected one of "
                              f"{', '.join(ACTIVATIONS)} on the gate and a plain up projection")
    if fused is not None:
        return FFNSite(variant + act_a, node, fused.x, fused, down, None, True, act_a, layer)
    return FFNSite(variant + act_a, node, up.x, up, down, gate, False, act_a, layer)


def _experts(node: fx.Node, down: Projection, form: str) -> Mismatch:
    """MoE experts, found and refused with the reason: the grouped GEMM stays as the model wrote it (Inductor)."""
    shape = shape_of(down.weight)
    experts = f"{shape[0]} experts" if shape else "experts"
    return Mismatch(node, f"MoE experts ({experts}, {form}, a grouped GEMM over the routed tokens): found, left to "
                          f"the inner compiler; kvpass::ffn and CHESS's kernels take one dense FFN, and CHESS has no "
                          f"per-expert thresholds")


def find_ffn(graph: fx.Graph) -> tuple[list[FFNSite], list[Mismatch]]:
    sites, misses = [], []
    for node in graph.nodes:
        found = match_ffn(node) if node.op == "call_function" else None
        if isinstance(found, FFNSite):
            sites.append(found)
        elif isinstance(found, Mismatch):
            misses.append(found)
    return sites, misses


def weight_args(graph: fx.Graph, p: Projection, half: int | None):
    """(weight in (out, in) layout, bias) nodes for the op, slicing one half of a fused projection."""
    weight, bias = p.weight, p.bias
    if p.transposed:
        weight = graph.call_method("t", (weight,))
    if half is not None:
        rows = shape_of(p.node)[-1] // 2
        index = slice(0, rows) if half == 0 else slice(rows, 2 * rows)
        weight = graph.call_function(operator.getitem, (weight, index))
        if bias is not None:
            bias = graph.call_function(operator.getitem, (bias, index))
    return weight, bias


def rewrite_ffn(graph: fx.Graph, site: FFNSite, thresholds: fx.Node | None = None,
                w_down_t: fx.Node | None = None) -> fx.Node:
    """Replace the site by `kvpass::ffn`: exact, or with CHESS thresholds (I,) and the down weight's input-major
    copy (I, Ho) read from nodes already in the graph (kvpass.graph_inputs.add_tensor)."""
    with graph.inserting_before(site.output):
        if site.chunked:
            w_gate, b_gate = weight_args(graph, site.up, 0)
            w_up, b_up = weight_args(graph, site.up, 1)
        else:
            w_up, b_up = weight_args(graph, site.up, None)
            w_gate, b_gate = weight_args(graph, site.gate, None) if site.gate else (None, None)
        w_down, b_down = weight_args(graph, site.down, None)
        new = graph.call_function(torch.ops.kvpass.ffn.default, args=(
            site.x, w_up, b_up, w_down, b_down, w_gate, b_gate, thresholds, w_down_t, site.activation))
    replace_node(site.output, new)
    return new


def replace_node(old: fx.Node, new: fx.Node) -> None:
    """Point every user of `old` at `new`, which inherits its module stack (layer ids come from it)."""
    new.meta.update({k: old.meta[k] for k in ("nn_module_stack", "stack_trace") if k in old.meta})
    old.replace_all_uses_with(new)
