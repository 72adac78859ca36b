"""Attention site matchers: `F.scaled_dot_product_attention` calls and HF "eager" attention
(matmul -> scale -> [soft-cap] -> [mask add] -> softmax -> matmul), in Dynamo FX graphs.

Each matcher returns an `AttentionSite` (what the op call needs) or a `Mismatch` (why not). The cache
plumbing feeding the keys decides the op's mode: `kvpass::cache_update` outputs (the kvpass HF cache)
are fused away; a `cat` of a graph input with the new keys along the sequence dim is a foreign cache
(HF DynamicCache) and the op runs one-shot over it; anything else is a cache-less model.

What kvpass attention cannot express is refused with a reason, so the site runs as the model wrote it and the
backend's warning names why: an additive bias in the logits or the mask (ALiBi, relative positions: only 0/-inf
masks are exact), attention sinks (a logit column concatenated before the softmax), 3-D batched attention, and
two sites that would share one layer id (one runtime store per layer).
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
    bias = _additive_bias(mask)
    if bias is not None:
        return Mismatch(node, _bias_reason("attn_mask", bias))
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
    """node: the final matmul(probs, v) (or a 3-D bmm, which is refused with its reason)."""
    if not is_call(node, torch.matmul, operator.matmul, torch.bmm):
        return None
    probs, v_rep = node.args[:2]
    probs = _through_casts(probs)
    sliced = None
    if is_call(probs, operator.getitem) and _is_softmax(_through_casts(probs.args[0])):
        sliced, probs = probs, _through_casts(probs.args[0])  # softmax over extra columns, some dropped after
    if not _is_softmax(probs):
        return None  # an ordinary matmul, not attention
    dim = probs.kwargs.get("dim", probs.args[1] if len(probs.args) > 1 else None)
    if dim not in (-1, 3):
        return Mismatch(node, f"softmax over dim {dim}, expected the key dim (-1)")
    logits = _without_max_subtraction(probs.args[0])
    if sliced is not None or is_call(through_views(logits), torch.cat):
        return Mismatch(node, "attention sinks: extra logit columns (the model's `sinks`, GPT-OSS style) are "
                              "concatenated to the scores before the softmax; kvpass attention has no sink term")
    terms = _additive_terms(logits)
    scores = [t for t in terms if _holds_scores(t)]
    others = [t for t in terms if not _holds_scores(t)]
    if len(scores) != 1:
        return Mismatch(node, "softmax input is not one q @ k^T term plus a mask")
    for term in others:
        bias = _additive_bias(term)
        if bias is not None:
            return Mismatch(node, _bias_reason("the attention logits", bias))
    logits = scores[0]
    product = through_views(logits)
    if is_method(product, "baddbmm") or is_call(product, torch.baddbmm):
        added = product.kwargs.get("input", product.args[0] if product.args else None)
        bias = _additive_bias(added)
        if bias is not None:
            return Mismatch(node, _bias_reason("baddbmm's input (added to q @ k^T)", bias))
    if node.target is torch.bmm:
        return Mismatch(node, "attention over 3-D (batch x heads) tensors with bmm/baddbmm; kvpass matches 4-D "
                              "(batch, heads, tokens, dim) attention")
    if len(others) > 1:
        return Mismatch(node, f"{len(others)} masks are added to the attention logits; kvpass takes one")
    mask = others[0] if others else None
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


def _through_casts(node):
    """Through views, identity dropouts and dtype casts (softmax in fp32, then back)."""
    node = through_views(node)
    while is_method(node, "to", "type", "float"):
        node = through_views(node.args[0])
    return node


def _is_softmax(node) -> bool:
    return is_call(node, F.softmax, torch.softmax) or is_method(node, "softmax")


def _without_max_subtraction(node):
    """x - x.max(-1, keepdim=True)[0] (a hand-written stable softmax) -> x; anything else unchanged."""
    if is_call(node, operator.sub, torch.sub) and isinstance(node.args[1], fx.Node):
        top = node.args[1]
        if is_call(top, operator.getitem) and top.args[1] == 0:
            top = top.args[0]
        if (is_method(top, "max", "amax") or is_call(top, torch.max, torch.amax)) and top.args[0] is node.args[0]:
            return node.args[0]
    return node


def _additive_terms(node) -> list:
    """The terms of a sum (a + b + ...), seen through views; a single term is [node]."""
    inner = through_views(node)
    if (is_call(inner, operator.add, torch.add) or is_method(inner, "add")) and len(inner.args) == 2 \
            and all(isinstance(a, fx.Node) for a in inner.args) and not inner.kwargs:
        return _additive_terms(inner.args[0]) + _additive_terms(inner.args[1])
    return [node]


def _holds_scores(node) -> bool:
    """Whether q @ k^T (matmul or baddbmm) is computed in this term, through scaling and soft-capping."""
    todo, seen = [node], set()
    while todo:
        item = todo.pop()
        if not isinstance(item, fx.Node) or item in seen or len(seen) > 16:
            continue
        seen.add(item)
        if is_call(item, torch.matmul, operator.matmul, torch.bmm, torch.baddbmm) or is_method(item, "baddbmm"):
            return True
        if is_call(item, operator.mul, torch.mul, operator.truediv, torch.div, torch.tanh) or \
                is_method(item, "tanh", "view", "reshape", "contiguous", "to", "float"):
            todo.extend(item.all_input_nodes)
    return False


# Float nodes that build a 0/-inf mask from boolean structure without adding values of their own.
_MASK_FUNCTIONS = {torch.where, torch.masked_fill, torch.full, torch.zeros, torch.ones, torch.empty, torch.full_like,
                   torch.zeros_like, torch.ones_like, torch.empty_like, torch.tensor, torch.scalar_tensor,
                   operator.getitem, torch.reshape, torch.unsqueeze, torch.squeeze, torch.transpose, torch.permute,
                   torch.cat, torch.Tensor.masked_fill, torch.Tensor.to}
_MASK_METHODS = {"masked_fill", "masked_fill_", "to", "type", "float", "half", "bfloat16", "double", "expand",
                 "expand_as", "view", "reshape", "contiguous", "unsqueeze", "squeeze", "clone", "new_zeros",
                 "new_full", "new_ones", "new_empty", "repeat", "permute", "transpose", "__getitem__", "where"}
_SCALAR_ARITHMETIC = {operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, torch.mul, torch.add,
                      torch.sub, torch.div, torch.neg}


def _is_tensor_node(value) -> bool:
    return isinstance(value, fx.Node) and isinstance(value.meta.get("example_value"), torch.Tensor)


def _is_model_tensor(node: fx.Node) -> bool:
    """A placeholder that Dynamo lifted from a module's parameters or buffers (not an input of the call)."""
    target = str(node.target)
    return isinstance(node.meta.get("example_value"), torch.nn.Parameter) or "_parameters_" in target or \
        "_buffers_" in target


def _additive_bias(mask) -> fx.Node | None:
    """The node that makes `mask` (a float term added to the attention logits) more than a 0/-inf mask, or None.

    Walks the float part of the mask's computation: boolean and integer structure (positions, padding) and
    0/-inf builders (where, masked_fill, full, casts, views) are a mask; arithmetic between float tensors (an
    ALiBi slope times positions, a bias added to the mask) or a float tensor of the model's own (a learned
    bias) is not. A float mask handed in by the caller cannot be judged here (the op's run-time check can)."""
    seen, todo = set(), [mask]
    while todo:
        node = todo.pop()
        if not isinstance(node, fx.Node) or node in seen:
            continue
        seen.add(node)
        value = node.meta.get("example_value")
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            continue
        if node.op == "placeholder":
            if _is_model_tensor(node):
                return node
            continue
        if node.op == "get_attr":
            return node
        scalar_arithmetic = (node.target in _SCALAR_ARITHMETIC if node.op == "call_function" else
                             is_method(node, "mul", "add", "sub", "div", "neg", "__rsub__"))
        if scalar_arithmetic and sum(_is_tensor_node(a) for a in (*node.args, *node.kwargs.values())) > 1:
            return node
        if not scalar_arithmetic and not (is_call(node, *_MASK_FUNCTIONS) or is_method(node, *_MASK_METHODS)):
            return node
        todo.extend(node.all_input_nodes)
    return None


def _bias_reason(where: str, bias: fx.Node) -> str:
    what = bias.target if bias.op in ("call_method", "get_attr") else getattr(bias.target, "__name__", bias.target)
    source = "a tensor of the model" if bias.op in ("placeholder", "get_attr") else f"`{what}` on float tensors"
    return (f"additive attention bias (ALiBi or a relative-position bias): {where} carries {source} "
            f"(node {bias.name}), not just a 0/-inf mask; kvpass attention takes masks only")


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
    sites, shared = _one_site_per_layer(sites)
    misses += shared
    kept = []
    for site in sites:
        problem = _functional_kv(graph, site)
        if problem is not None:
            misses.append(Mismatch(site.output, problem))
            continue
        if site.mode == MODE_AUTO and (_reads_cache_update(site.k) or _reads_cache_update(site.v)):
            # keys derived from the kvpass cache's output (MLA expands its cached latents): they already hold
            # the whole past, so the op attends over them as given
            site.mode, site.past = MODE_ONESHOT, 0
        kept.append(site)
    return kept, misses


def _one_site_per_layer(sites: list[AttentionSite]) -> tuple[list[AttentionSite], list[Mismatch]]:
    """The runtime keeps one store per layer id: sites that would share one (self- and cross-attention of one
    decoder layer, a block applied at several depths, two attentions in one module) are all left unrewritten."""
    groups: dict[int, list[AttentionSite]] = {}
    for site in sites:
        groups.setdefault(site.layer, []).append(site)
    kept, misses = [], []
    for site in sites:
        group = groups[site.layer]
        if len(group) == 1:
            kept.append(site)
            continue
        where = ", ".join(f"{s.output.name} in {module_path(s.output) or 'no module'}" for s in group)
        misses.append(Mismatch(site.output, f"layer id {site.layer} is shared by {len(group)} attention sites "
                                            f"({where}); the kvpass cache keeps one store per layer id, so none of "
                                            f"them is rewritten"))
    return kept, misses


_FRESH_METHODS = ("new_empty", "new_zeros")
_FRESH_FUNCTIONS = (torch.empty, torch.zeros, torch.empty_like, torch.zeros_like)


def _functional_kv(graph: fx.Graph, site: AttentionSite) -> str | None:
    """Keys or values written in place into a fresh buffer (MLA: `new_empty`, then `copy_` of the no-RoPE and the
    RoPE part into slices of the last dim) become one `torch.cat` of the parts, so the op's input no longer
    depends on in-place writes (a dead-code pass keeps no `copy_` whose result is unused). Returns a reason when
    the buffer is written in a way this cannot follow, else None."""
    for name in ("k", "v"):
        buffer = getattr(site, name)
        if not (is_method(buffer, *_FRESH_METHODS) or is_call(buffer, *_FRESH_FUNCTIONS)):
            continue
        pieces, readers = [], []
        for user in buffer.users:
            copy = next(iter(user.users)) if is_call(user, operator.getitem) and len(user.users) == 1 else None
            if is_method(copy, "copy_") and copy.args[0] is user and not copy.users:
                pieces.append((_last_dim_span(user.args[1]), user, copy.args[1]))
            else:
                readers.append(user)
        if not pieces:
            continue
        width = (shape_of(buffer) or (None,))[-1]
        spans = sorted(span for span, _, _ in pieces) if None not in [p[0] for p in pieces] else None
        tiles = spans is not None and spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])) \
            and spans[-1][1] in (None, width)
        if len(readers) != 1 or not tiles:
            return (f"{'keys' if name == 'k' else 'values'} are written in place into {buffer.name} in a way kvpass "
                    f"cannot follow (it follows slice copies that tile the last dim)")
        with graph.inserting_before(site.output):
            parts = [graph.call_method("expand_as", (source, view))
                     for _, view, source in sorted(pieces, key=lambda p: p[0])]
            joined = graph.call_function(torch.cat, (parts,), {"dim": -1})
        joined.meta.update({key: buffer.meta[key] for key in ("example_value", "nn_module_stack", "stack_trace")
                            if key in buffer.meta})
        setattr(site, name, joined)
    return None


def _last_dim_span(index) -> tuple[int, int | None] | None:
    """(start, stop) of an index that slices only the last dim (x[..., a:b] or x[:, :, :, a:b]), else None."""
    if not isinstance(index, tuple) or not index or not isinstance(index[-1], slice):
        return None
    last, leading = index[-1], index[:-1]
    if last.step not in (None, 1) or not all(i is Ellipsis or i == slice(None) for i in leading):
        return None
    start, stop = last.start or 0, last.stop
    if not isinstance(start, int) or not (stop is None or isinstance(stop, int)):
        return None
    return start, stop


def _reads_cache_update(node) -> bool:
    """Whether `node` is computed from a kvpass::cache_update output (the kvpass cache's keys and values)."""
    seen, todo = set(), [node]
    while todo:
        item = todo.pop()
        if not isinstance(item, fx.Node) or item in seen:
            continue
        seen.add(item)
        if is_call(item, torch.ops.kvpass.cache_update, torch.ops.kvpass.cache_update.default):
            return True
        todo.extend(item.all_input_nodes)
    return False


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
