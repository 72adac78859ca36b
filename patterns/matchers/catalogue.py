"""The pattern catalogue: every graph variant kvpass rewrites, the family it was traced from, and a
small example module + inputs that produces it under Dynamo (tests trace each example and check that
exactly its variant matches; `kvpass inspect --catalogue` prints the table).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str       # the variant name the matcher reports
    kind: str       # "attention" or "ffn"
    families: str   # where the variant was traced from (transformers version noted where it matters)
    example: Callable[[], tuple[nn.Module, tuple]]


class _Layer0(nn.Module):
    """Puts a block at `layers.0` so the layer index is recovered as in a real model."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList([block])

    def forward(self, *args):
        return self.layers[0](*args)


class _Attention(nn.Module):
    def __init__(self, form: str, softcap: float = 0.0):
        super().__init__()
        self.form, self.softcap = form, softcap

    def forward(self, q, k, v, mask):
        if self.form == "sdpa-native-gqa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
        rep = q.shape[1] // k.shape[1]
        if rep > 1:  # HF repeat_kv
            B, H, L, D = k.shape
            k = k[:, :, None].expand(B, H, rep, L, D).reshape(B, H * rep, L, D)
            v = v[:, :, None].expand(B, H, rep, L, D).reshape(B, H * rep, L, D)
        if self.form == "sdpa-causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)
        if self.form.startswith("sdpa"):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25)
        logits = torch.matmul(q, k.transpose(2, 3)) * 0.25
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        probs = F.softmax(logits + mask, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v)


def _attention_example(form: str, kv_heads: int, float_mask: bool = False, softcap: float = 0.0):
    def build():
        B, H, L, D = 1, 4, 5, 16
        q, k, v = torch.randn(B, H, L, D), torch.randn(B, kv_heads, L, D), torch.randn(B, kv_heads, L, D)
        causal = torch.ones(L, L, dtype=torch.bool).tril()[None, None]
        mask = torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min) if float_mask else causal
        return _Layer0(_Attention(form, softcap)), (q, k, v, mask)

    return build


class _FFN(nn.Module):
    def __init__(self, form: str, act: Callable):
        super().__init__()
        self.form, self.act = form, act
        hidden, inner = 16, 24
        if form == "conv1d":  # GPT-2 Conv1D: weight stored (in, out), applied with addmm
            self.w_fc, self.b_fc = nn.Parameter(torch.randn(hidden, inner)), nn.Parameter(torch.randn(inner))
            self.w_proj, self.b_proj = nn.Parameter(torch.randn(inner, hidden)), nn.Parameter(torch.randn(hidden))
            return
        self.up = nn.Linear(hidden, inner * (2 if form == "fused" else 1), bias=form == "mlp")
        self.gate = nn.Linear(hidden, inner, bias=False) if form == "glu" else None
        self.down = nn.Linear(inner, hidden, bias=form == "mlp")

    def forward(self, x):
        if self.form == "conv1d":
            h = torch.addmm(self.b_fc, x.view(-1, x.shape[-1]), self.w_fc)
            return torch.addmm(self.b_proj, self.act(h), self.w_proj).view(x.shape)
        if self.form == "fused":
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(up * self.act(gate))
        if self.form == "glu":
            return self.down(self.act(self.gate(x)) * self.up(x))
        return self.down(self.act(self.up(x)))


def _new_gelu(x):  # GPT-2's NewGELUActivation, written out as the traced graph has it
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3.0))))


def _ffn_example(form: str, act: Callable):
    def build():
        return _Layer0(_FFN(form, act)), (torch.randn(1, 5, 16),)

    return build


CATALOGUE: tuple[Entry, ...] = (
    Entry("sdpa-repeat-kv-mask", "attention", "Llama, Mistral, Qwen2/3, Gemma, Gemma3, Phi-3 (GQA; transformers 5.17 "
          "under compile, 5.23 with a materialized mask)", _attention_example("sdpa", kv_heads=2)),
    Entry("sdpa-native-gqa", "attention", "Llama and GQA families on transformers 5.23 with a cache and no padding "
          "(enable_gqa=True, is_causal, no mask)", _attention_example("sdpa-native-gqa", kv_heads=2)),
    Entry("sdpa", "attention", "GPT-2, GPT-NeoX, OPT without padding (is_causal, no mask)",
          _attention_example("sdpa-causal", kv_heads=4)),
    Entry("sdpa-mask", "attention", "GPT-2, GPT-NeoX, OPT (multi-head: no repeat_kv)", _attention_example("sdpa", kv_heads=4)),
    Entry("eager-mask", "attention", "any HF model with attn_implementation='eager'",
          _attention_example("eager", kv_heads=2, float_mask=True)),
    Entry("eager-softcap-mask", "attention", "Gemma-2 (eager attention with tanh soft-capping)",
          _attention_example("eager", kv_heads=2, float_mask=True, softcap=5.0)),
    Entry("glu-silu", "ffn", "Llama, Mistral, Qwen2/3 (SwiGLU)", _ffn_example("glu", F.silu)),
    Entry("glu-gelu_tanh", "ffn", "Gemma, Gemma-2, Gemma-3 (GeGLU, tanh GELU)",
          _ffn_example("glu", lambda x: F.gelu(x, approximate="tanh"))),
    Entry("fused-glu-silu", "ffn", "Phi-3 (fused gate_up, chunk(2))", _ffn_example("fused", F.silu)),
    Entry("mlp-gelu", "ffn", "GPT-NeoX (GELU MLP)", _ffn_example("mlp", F.gelu)),
    Entry("mlp-relu", "ffn", "OPT (ReLU MLP)", _ffn_example("mlp", F.relu)),
    Entry("conv1d-mlp-gelu_tanh", "ffn", "GPT-2 (Conv1D addmm, NewGELU decomposed)", _ffn_example("conv1d", _new_gelu)),
)
