"""Attention kvpass cannot express is refused at compile time with a reason, so the site runs as the model wrote it
(and computes what it did) and the backend's warning names the reason: additive biases (ALiBi), attention sinks,
3-D bmm attention, and sites that would share a layer id. Keys computed from the kvpass cache's output (MLA) make
a one-shot site."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kvpass
from kvpass.patterns.matchers import find_attention
from kvpass.patterns.matchers.attention import MODE_AUTO, MODE_ONESHOT

B, H, L, D = 1, 4, 6, 8


def _graph(module, *inputs, run=True):
    """The Dynamo graph of one call; run=False: traced only (its ops are never executed)."""
    torch._dynamo.reset()
    graphs = []

    def grab(gm, example_inputs):
        graphs.append(gm)
        return gm.forward if run else lambda *args: (torch.zeros(B, H, L, D),)

    torch.compile(module, backend=grab)(*inputs)
    assert len(graphs) == 1
    return graphs[0]


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g) for _ in range(3)]


def _alibi(length: int) -> torch.Tensor:
    """ALiBi as Falcon/Bloom build it: per-head slopes times key positions, a float bias over the keys."""
    slopes = torch.tensor(2.0 ** -8.0) ** torch.arange(1, H + 1)
    return (slopes[:, None] * torch.arange(length))[None, :, None, :]


class Layers(nn.Module):
    """Puts a block at layers.0 so layer ids come from module paths as in a real model."""

    def __init__(self, *blocks):
        super().__init__()
        self.layers = nn.ModuleList(blocks)

    def forward(self, *args):
        for layer in self.layers:
            args = (layer(*args), *args[1:])
        return args[0]


class AlibiSDPA(nn.Module):
    def forward(self, q, k, v):
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        mask = torch.zeros(L, L).masked_fill(~causal, torch.finfo(torch.float32).min)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask + _alibi(L), scale=0.3)


class MaskedSDPA(nn.Module):
    """A 0/-inf float mask built from boolean structure: a mask, not a bias."""

    def forward(self, q, k, v):
        causal = torch.arange(L)[None, :] <= torch.arange(L)[:, None]
        mask = torch.where(causal, torch.tensor(0.0), torch.finfo(torch.float32).min)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], scale=0.3)


class LearnedBiasEager(nn.Module):
    """Eager attention adding a learned relative-position bias (a parameter) and a mask to the logits."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(H, L, L))

    def forward(self, q, k, v):
        logits = torch.matmul(q, k.transpose(2, 3)) * 0.3
        mask = torch.zeros(L, L).masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), -1e9)
        probs = F.softmax(logits + self.bias + mask, dim=-1)
        return torch.matmul(probs, v)


class SinkEager(nn.Module):
    """GPT-OSS: a learned logit column per head joins the softmax and is dropped after it."""

    def __init__(self):
        super().__init__()
        self.sinks = nn.Parameter(torch.randn(H))

    def forward(self, q, k, v):
        logits = torch.matmul(q, k.transpose(2, 3)) * 0.3
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(B, -1, L, -1)
        combined = torch.cat([logits, sinks], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True)[0]
        probs = F.softmax(combined, dim=-1)[..., :-1]
        return torch.matmul(probs, v)


class BloomStyle(nn.Module):
    """Bloom: 3-D (batch x heads) attention whose logits start from the ALiBi bias through baddbmm."""

    def forward(self, q, k, v):
        bias = _alibi(L).expand(B, H, 1, L).reshape(B * H, 1, L)
        scores = bias.baddbmm(batch1=q.reshape(B * H, L, D), batch2=k.reshape(B * H, L, D).transpose(1, 2), beta=1.0,
                              alpha=0.3)
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        probs = F.softmax(scores.view(B, H, L, L) + torch.zeros(L, L).masked_fill(~causal, -1e9), dim=-1)
        probs = probs.view(B * H, L, L)
        return torch.bmm(probs, v.reshape(B * H, L, D)).view(B, H, L, D)


class TwoAttentions(nn.Module):
    """Two attention calls in one layer (self- and cross-attention of an encoder-decoder layer, say)."""

    def forward(self, q, k, v):
        first = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(first, v, k)


@pytest.mark.parametrize("module, reason", [
    (AlibiSDPA(), "additive attention bias"),
    (LearnedBiasEager(), "additive attention bias"),
    (SinkEager(), "attention sinks"),
    (BloomStyle(), "additive attention bias"),
], ids=["alibi-sdpa", "learned-bias-eager", "sinks", "bloom-baddbmm"])
def test_unexpressible_attention_is_refused_with_its_reason_and_runs_unchanged(module, reason):
    model = Layers(module)
    q, k, v = _qkv()
    sites, misses = find_attention(_graph(model, q, k, v).graph)
    assert sites == [] and len(misses) == 1 and reason in misses[0].reason, [m.reason for m in misses]
    with torch.no_grad():
        expected = model(q, k, v)
        compiled = torch.compile(model, backend=kvpass.backend(kvpass.Config(), inner="eager"))
        with pytest.warns(UserWarning, match=reason):
            got = compiled(q, k, v)
    torch.testing.assert_close(got, expected)


def test_a_mask_built_from_booleans_is_not_a_bias():
    model = Layers(MaskedSDPA())
    q, k, v = _qkv(1)
    sites, misses = find_attention(_graph(model, q, k, v).graph)
    assert [s.variant for s in sites] == ["sdpa-mask"] and misses == []
    with torch.no_grad():
        compiled = torch.compile(model, backend=kvpass.backend(kvpass.Config(), inner="eager", strict=True))
        torch.testing.assert_close(compiled(q, k, v), model(q, k, v))


def test_sites_sharing_a_layer_id_are_all_left_unrewritten():
    model = Layers(TwoAttentions())
    q, k, v = _qkv(2)
    sites, misses = find_attention(_graph(model, q, k, v).graph)
    assert sites == [] and len(misses) == 2
    assert all("layer id 0 is shared by 2 attention sites" in m.reason for m in misses)
    with torch.no_grad():
        compiled = torch.compile(model, backend=kvpass.backend(kvpass.Config(), inner="eager"))
        with pytest.warns(UserWarning, match="layer id 0 is shared"):
            torch.testing.assert_close(compiled(q, k, v), model(q, k, v))


def test_one_attention_per_layer_keeps_its_own_id():
    model = Layers(MaskedSDPA(), MaskedSDPA())
    sites, misses = find_attention(_graph(model, *_qkv(3)).graph)
    assert [s.layer for s in sites] == [0, 1] and misses == []


class LatentCache(nn.Module):
    """MLA's shape: the kvpass cache stores a latent, keys and values are expanded from all of it (past included),
    and the value head dim differs from the query/key head dim."""

    def __init__(self):
        super().__init__()
        self.expand_k, self.expand_v = nn.Linear(4, H * D), nn.Linear(4, H * 2 * D)

    def forward(self, q, latent, past: int):
        stored, _ = torch.ops.kvpass.cache_update(latent, latent, 0, 0, past)
        length = stored.shape[2]
        k = self.expand_k(stored).view(B, length, H, D).transpose(1, 2)
        v = self.expand_v(stored).view(B, length, H, 2 * D).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_keys_computed_from_the_kvpass_cache_make_a_one_shot_site():
    q, latent = torch.randn(B, H, L, D), torch.randn(B, 1, L, 4)
    gm = _graph(Layers(LatentCache()), q, latent, 0, run=False)  # no runtime needed to trace
    (site,), misses = find_attention(gm.graph)
    assert misses == [] and site.mode == MODE_ONESHOT and site.past == 0


def test_keys_of_the_new_tokens_alone_stay_auto():
    (site,), _ = find_attention(_graph(Layers(MaskedSDPA()), *_qkv(4)).graph)
    assert site.mode == MODE_AUTO


def test_unequal_value_head_dim_is_attended_exactly():
    """The op's contract has (B, Hkv, Lk, Dv) values: MLA's Dv != D needs nothing of its own."""
    model = Layers(MaskedSDPA())
    q, k = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    v = torch.randn(B, H, L, 2 * D)
    with torch.no_grad():
        compiled = torch.compile(model, backend=kvpass.backend(kvpass.Config(), inner="eager", strict=True))
        torch.testing.assert_close(compiled(q, k, v), model(q, k, v))
