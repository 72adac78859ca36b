"""FFN sites beyond F.linear: Falcon's `x @ W.T` MLP is an FFN site (rewritten exactly), MoE experts are found and
refused with their reason (a grouped GEMM stays with the inner compiler), an activation kvpass does not know is
named, and dead-code removal keeps the in-place writes of a model's graph."""
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import kvpass
from kvpass.patterns.matchers import find_ffn
from kvpass.patterns.matchers.effects import eliminate_dead_code, has_side_effects

from families import build_tiny


def _graph(module, *inputs):
    torch._dynamo.reset()
    graphs = []

    def grab(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(module, backend=grab)(*inputs)
    assert len(graphs) == 1
    return graphs[0]


class MatmulLinear(nn.Linear):
    """Falcon's FalconLinear: the projection written as x @ W.T (+ bias)."""

    def forward(self, x):
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


class Block(nn.Module):
    def __init__(self, act, bias: bool):
        super().__init__()
        self.up, self.act, self.down = MatmulLinear(16, 24, bias=bias), act, MatmulLinear(24, 16, bias=bias)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class Layers(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.layers = nn.ModuleList([block])

    def forward(self, *args):
        return self.layers[0](*args)


@pytest.mark.parametrize("bias", [False, True], ids=["falcon", "biased"])
def test_matmul_mlp_is_an_ffn_site_rewritten_exactly(bias):
    torch.manual_seed(0)
    model, x = Layers(Block(nn.GELU(), bias)).eval(), torch.randn(1, 5, 16)
    sites, misses = find_ffn(_graph(model, x).graph)
    assert [(s.variant, s.layer) for s in sites] == [("mlp-gelu", 0)] and misses == []
    assert (sites[0].up.bias is not None) == bias and (sites[0].down.bias is not None) == bias
    backend = kvpass.backend(kvpass.Config(ffn=kvpass.DenseFFN()), inner="eager")
    with torch.no_grad(), pytest.warns(UserWarning, match="no attention site"):
        got = torch.compile(model, backend=backend)(x)
    torch.testing.assert_close(got, model(x))
    assert backend.records[0].rewritten["mlp-gelu"] == 1


def test_unknown_activation_is_found_and_named():
    model, x = Layers(Block(nn.Sequential(nn.ReLU(), _Square()), bias=False)).eval(), torch.randn(1, 5, 16)
    sites, misses = find_ffn(_graph(model, x).graph)
    assert sites == [] and len(misses) == 1 and "activation between the projections is none of" in misses[0].reason


class _Square(nn.Module):  # ReLU² (Arcee, Nemotron, nanochat): not among the activations kvpass::ffn computes
    def forward(self, x):
        return torch.square(x)


def _traced(model):
    torch._dynamo.reset()
    graphs = []

    def grab(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=grab)(torch.randint(3, 100, (1, 7)), use_cache=False)
    return graphs[0]


@pytest.mark.parametrize("name, dense", [("qwen3_moe", []), ("qwen2_moe", ["glu-silu", "glu-silu"]),
                                         ("falcon", ["mlp-gelu", "mlp-gelu"])])
def test_family_ffn_sites_and_experts(name, dense):
    """Qwen3-MoE: experts only; Qwen2-MoE: a dense shared expert per layer plus the routed experts; Falcon: its
    x @ W.T MLP. Experts are counted among the unmatched with their reason, never rewritten."""
    gm = _traced(build_tiny(name))
    sites, misses = find_ffn(gm.graph)
    assert [s.variant for s in sites] == dense
    experts = [m for m in misses if m.reason.startswith("MoE experts (4 experts, fused-glu-silu")]
    assert len(experts) == (0 if name == "falcon" else 2) and len(misses) == len(experts)
    assert all("left to the inner compiler" in m.reason for m in experts)


def test_dead_code_removal_keeps_in_place_writes():
    """fx's own pass drops every call_method whose result is unused, in-place writes included (what made tiny
    DeepSeek-V3 generate wrong tokens: its MLA keys are `new_empty` + two `copy_`, its router a `scatter_`)."""

    def build():
        graph = fx.Graph()
        a, b = graph.placeholder("a"), graph.placeholder("b")
        buffer = graph.call_method("new_zeros", (a, (2, 8)))
        graph.call_method("copy_", (graph.call_function(operator.getitem, (buffer, (Ellipsis, slice(0, 4)))), a))
        graph.call_method("add_", (graph.call_function(operator.getitem, (buffer, (Ellipsis, slice(4, 8)))), b))
        graph.call_function(operator.iadd, (buffer, 1.0))
        graph.output(buffer)
        return fx.GraphModule(nn.Module(), graph)

    a, b = torch.randn(2, 4), torch.randn(2, 4)
    expected = torch.cat([a, b], -1) + 1.0
    plain, kept = build(), build()
    plain.graph.eliminate_dead_code()
    plain.recompile()
    assert not torch.equal(plain(a, b), expected)  # why the pass below exists
    eliminate_dead_code(kept.graph)
    kept.recompile()
    torch.testing.assert_close(kept(a, b), expected)
    assert [n.target for n in kept.graph.nodes if has_side_effects(n) and n.op.startswith("call")] == \
        ["copy_", "add_", operator.iadd]


class InPlaceKeys(nn.Module):
    """MLA's way of building keys: a fresh buffer, two slice copies, then attention."""

    def forward(self, q, k_nope, k_rope, v):
        keys = k_nope.new_empty(*k_nope.shape[:-1], k_nope.shape[-1] + k_rope.shape[-1])
        keys[..., : k_nope.shape[-1]].copy_(k_nope)
        keys[..., k_nope.shape[-1]:].copy_(k_rope)
        return F.scaled_dot_product_attention(q, keys, v, is_causal=True)


class InPlaceBias(InPlaceKeys):
    """GPT-OSS's experts add their bias in place (`out.add_(bias)`), the result of add_ unused."""

    def forward(self, q, k_nope, k_rope, v):
        out = super().forward(q, k_nope, k_rope, v)
        out.add_(v.mean())
        return out


def _in_place_inputs():
    torch.manual_seed(0)
    return torch.randn(1, 2, 5, 12), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 6)


def test_keys_built_in_place_are_matched_and_exact():
    """The attention matcher turns MLA's in-place keys into one cat (tiny DeepSeek-V3's keys were read
    uninitialized once the rewrite's dead-code pass dropped the copies)."""
    inputs, model = _in_place_inputs(), Layers(InPlaceKeys())
    backend = kvpass.backend(kvpass.Config(), inner="eager", strict=True)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=backend)(*inputs), model(*inputs))
    assert backend.records[0].rewritten == {"sdpa": 1}


def test_the_rewrite_keeps_in_place_writes():
    inputs, model = _in_place_inputs(), Layers(InPlaceBias())
    with torch.no_grad():
        compiled = torch.compile(model, backend=kvpass.backend(kvpass.Config(), inner="eager"))
        torch.testing.assert_close(compiled(*inputs), model(*inputs))
