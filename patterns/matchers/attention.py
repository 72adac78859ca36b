"""Attention site matchers: `F.scaled_dot_product_attention` calls and HF "eager" attention
(matmul -> scale -> [soft-cap] -> [mask add] -> softmax -> matmul), in Dynamo FX graphs.

Each matcher returns an `AttentionSite` (what the op call needs) or a `Mismatch` (why not). The cache
plumbing feeding the keys decides the op's mode: `kvpass::cache_update` outputs (the kvpass HF cache)
are fused away; a `cat` of a graph input with the new keys along the sequence dim is a foreign cache
(HF DynamicCache) and the op runs one-shot over it; anything else is a cache-less model.
"""
from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.nn.functional as F
from torch import fx

from kvpass.ops import MODE_AUTO, MODE_CACHED, MODE_ONESHOT

from .graph import is_call, is_method, layer_of, module_path, shape_of, strip_repeat_kv, through_views


@dataclasses.dataclass
class Mismatch:
    node: fx.Node
    reason: str

    def describe(self) -> str:
        return f"{self.node.name} ({module_path(self.node) or 'no module'}): {self.reason}"


@dataclasses.dataclass
class AttentionSite:
    variant: str             # catalogue entry name
    output: fx.Node          # the node whose value the kvpass op replaces
    q: fx.Node
    k: fx.Node               # KV heads (repeat_kv stripped), new tokens or all keys (one-shot)
    v: fx.Node
    mask: fx.Node | None
    is_causal: bool
    scale: object            # float or a SymFloat-valued node
    softcap: float
    mode: int
    past: object             # int or SymInt node (the cache's length before this call)
    layer: int
    scale_divides: bool = False  # the graph divides by `scale` (a symbolic divisor): the op gets 1 / scale


def _cache_source(k: fx.Node, v: fx.Node):
    """-> (mode, k_new, v_new, past)."""
    if is_call(k, operator.getitem) and is_call(v, operator.getitem) and k.args[0] is v.args[0] \
            and is_call(k.args[0], torch.ops.kvpass.cache_update, torch.ops.kvpass.cache_update.default) and (k.args[1], v.args[1]) == (0, 1):
        update = k.args[0]
        k_new, v_new, _runtime, _layer, past = update.args
        return MODE_CACHED, k_new, v_new, past
    if is_call(k, torch.cat) and _cat_dim(k) in (-2, 2):
        return MODE_ONESHOT, k, v, 0
    return MODE_AUTO, k, v, 0


def _cat_dim(node):
    return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)


def _default_scale(q: fx.Node) -> float | None:
    shape = shape_of(q)
    return None if shape is None else 1.0 / math.sqrt(shape[-1])


def match_sdpa(node: fx.Node, layer: int) -> AttentionSite | Mismatch | None:
    if not is_call(node, F.scaled_dot_product_attention):
        return None
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    if args.get("dropout_p", 0.0) not in (0, 0.0):
        return Mismatch(node, f"dropout_p={args['dropout_p']} (kvpass attention is inference-only)")
    is_causal = args.get("is_causal", False)
    if not isinstance(is_causal, bool):
        return Mismatch(node, "is_causal is not a constant")
    q = args["query"]
    k_heads, v_heads = strip_repeat_kv(args["key"]), strip_repeat_kv(args["value"])
    mode, k, v, past = _cache_source(k_heads, v_heads)
    scale = args.get("scale")
    if scale is None:
        scale = _default_scale(q)
        if scale is None:
            return Mismatch(node, "no scale given and the query's head dim is unknown")
    variant = "sdpa"
    if args.get("enable_gqa") and k_heads is args["key"]:
        variant = "sdpa-native-gqa"
    elif k_heads is not args["key"]:
        variant = "sdpa-repeat-kv"
    mask = args.get("attn_mask")
    if mask is not None and is_causal:
        return Mismatch(node, "both attn_mask and is_causal are set")
    return AttentionSite(variant=variant + ("-mask" if mask is not None else ""), output=node, q=q, k=k, v=v,
                         mask=mask, is_causal=is_causal, scale=scale, softcap=0.0, mode=mode, past=past,
                         layer=layer)


def _is_scalar(value) -> bool:
    """A Python number, or a graph node holding one (with dynamic=True module floats arrive as SymFloat)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    return isinstance(value, fx.Node) and isinstance(value.meta.get("example_value"), (int, float, torch.SymInt,
                                                                                        torch.SymFloat))


def _scalar_arg(node: fx.Node):
    """For mul(x, c) / truediv(x, c) with a scalar c: (x, c); else (None, None)."""
    a, b = node.args[:2]
    if _is_scalar(b) and not _is_scalar(a):
        return a, b
    if _is_scalar(a) and not _is_scalar(b) and node.target in (operator.mul, torch.mul):
        return b, a
    return None, None


def match_eager(node: fx.Node, layer: int) -> AttentionSite | Mismatch | None:
    """node: the final matmul(probs, v)."""
    if not is_call(node, torch.matmul, operator.matmul):
        return None
    probs, v_rep = node.args[:2]
    probs = through_views(probs)
    while is_method(probs, "to", "type", "float"):
        probs = probs.args[0]
    if not (is_call(probs, F.softmax, torch.softmax) or is_method(probs, "softmax")):
        return None  # an ordinary matmul, not attention
    dim = probs.kwargs.get("dim", probs.args[1] if len(probs.args) > 1 else None)
    if dim not in (-1, 3):
        return Mismatch(node, f"softmax over dim {dim}, expected the key dim (-1)")
    logits = probs.args[0]
    mask = None
    if is_call(logits, operator.add, torch.add):
        logits, mask = logits.args[:2]
    softcap = 0.0
    if is_call(logits, operator.mul, torch.mul):
        tanh_node, cap = _scalar_arg(logits)
        if is_call(tanh_node, torch.tanh) or is_method(tanh_node, "tanh"):
            inner, cap_div = _scalar_arg(tanh_node.args[0])
            same_cap = cap_div is cap or (not isinstance(cap, fx.Node) and cap_div == cap) or \
                (isinstance(cap, fx.Node) and isinstance(cap_div, fx.Node))  # symbolic: both read the same attribute
            if cap_div is None or not same_cap or tanh_node.args[0].target not in (operator.truediv, torch.div):
                return Mismatch(node, "tanh soft-capping of an unexpected form")
            logits, softcap = inner, cap
    scaled, scale, scale_divides = logits, None, False
    if is_call(scaled, operator.mul, torch.mul, operator.truediv, torch.div):
        base, c = _scalar_arg(scaled)
        if c is not None:
            scale, scale_divides, scaled = c, scaled.target in (operator.truediv, torch.div), base
    if not is_call(scaled, torch.matmul, operator.matmul):
        return Mismatch(node, f"softmax input is {scaled.target if isinstance(scaled, fx.Node) else scaled!r}, "
                              f"not a scaled q @ k^T")
    q, k_t = scaled.args[:2]
    if not (is_method(k_t, "transpose") and sorted(k_t.args[1:]) in ([2, 3], [-2, -1])):
        return Mismatch(node, "keys are not transposed with transpose(2, 3)")
    if scale is None:
        scale = 1.0  # q was scaled before the matmul (or the model uses no scale)
    elif scale_divides and not isinstance(scale, fx.Node):
        scale, scale_divides = 1.0 / scale, False
    k_heads, v_heads = strip_repeat_kv(k_t.args[0]), strip_repeat_kv(v_rep)
    mode, k, v, past = _cache_source(k_heads, v_heads)
    variant = "eager" + ("-softcap" if softcap else "") + ("-mask" if mask is not None else "")
    return AttentionSite(variant=variant, output=node, q=q, k=k, v=v, mask=mask, is_causal=False, scale=scale,
                         softcap=softcap, mode=mode, past=past, layer=layer, scale_divides=scale_divides)


MATCHERS = (match_sdpa, match_eager)


def find_attention(graph: fx.Graph) -> tuple[list[AttentionSite], list[Mismatch]]:
    sites, misses = [], []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        layer = layer_of(node)
        for matcher in MATCHERS:
            found = matcher(node, -1 if layer is None else layer)
            if found is not None:
                (sites if isinstance(found, AttentionSite) else misses).append(found)
                break
    # A model without numbered layers (e.g. one attention block) still gets distinct ids.
    if any(site.layer < 0 for site in sites):
        for i, site in enumerate(sites):
            site.layer = i
    return sites, misses


def is_decode_step(site: AttentionSite) -> bool:
    """The site attends one new token per row over the kvpass cache: a decode step (Dynamo specializes a
    length of 1, so a decode graph knows it statically)."""
    shape = shape_of(site.q)
    return site.mode == MODE_CACHED and shape is not None and len(shape) == 4 and shape[2] == 1


def rewrite_attention(graph: fx.Graph, site: AttentionSite, runtime_id: int, window: int,
                      captured_decode: bool = False) -> fx.Node:
    """Replace the site's output with one kvpass op call; returns the new node.

    captured_decode: a decode step (is_decode_step) becomes kvpass::decode_attention, which reads its position
    and padding from the runtime's device state rather than HF's mask and a Python int, so one graph serves
    every step and can be replayed from a CUDA graph (kvpass.engine). Otherwise kvpass::attention."""
    with graph.inserting_before(site.output):
        scale = graph.call_function(operator.truediv, (1.0, site.scale)) if site.scale_divides else site.scale
        if captured_decode and is_decode_step(site):
            new = graph.call_function(torch.ops.kvpass.decode_attention.default, args=(
                site.q, site.k, site.v, scale, site.softcap, window, runtime_id, site.layer))
        else:
            new = graph.call_function(torch.ops.kvpass.attention.default, args=(
                site.q, site.k, site.v, site.mask, site.is_causal, scale, site.softcap, window, site.mode,
                runtime_id, site.layer, site.past))
    new.meta.update({key: site.output.meta[key] for key in ("nn_module_stack", "stack_trace", "source_fn_stack")
                     if key in site.output.meta})
    site.output.replace_all_uses_with(new)
    return new
