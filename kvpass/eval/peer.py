"""The fp16 peer: a gpt-fast-style decode step over the same weights, the speed a compressed cache has to beat.

Static K/V buffers of (batch, kv heads, capacity, head dim) per layer, written in place at the step's slot; SDPA
over the whole static cache (unmasked, as the peer of DESIGN.md §6-7 was measured: its bytes are what a correct
fp16 step at that context must read, plus the few slots not yet written); the step compiled by Inductor and
replayed from one CUDA graph. It reuses the model's own modules (embedding, norms, projections, MLP, rotary
embedding, LM head), so it runs Llama-style decoders (q/k/v/o projections, a gated gate/up/down MLP, pre-norm
residual blocks, RoPE). Weights a kvpass method stores input-major in place (CHESS) are read from row-major copies.
Its logits equal the model's own only when the cache is exactly full (no unwritten slot); the benchmark uses it
for time, and tests/test_engine.py checks it at that point.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PeerDecoder:
    """One decode step of `model` (a Llama-style HF decoder) over a static fp16 cache of `capacity` tokens."""

    def __init__(self, model, *, batch: int, capacity: int):
        self.model = model
        cfg = model.config.get_text_config(decoder=True)
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        param = next(model.parameters())
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=param.dtype, device=param.device) for _ in model.model.layers]
        self.values = [torch.zeros(shape, dtype=param.dtype, device=param.device) for _ in model.model.layers]
        # Row-major copies of weights kvpass laid out input-major (CHESS's sparse kernels read them so; the peer is
        # what a user would otherwise run, over the weights as the model stores them). Empty for other configs.
        self._row_major = {id(m): m.weight.contiguous() for m in model.modules()
                           if isinstance(m, torch.nn.Linear) and not m.weight.is_contiguous()}
        self.slot = torch.zeros(1, dtype=torch.long, device=param.device)
        self.input_ids = torch.zeros(batch, 1, dtype=torch.long, device=param.device)
        self._compiled = torch.compile(self._step, fullgraph=True)
        self._eager_steps = 0
        self._graph = None
        self._logits = None

    def fill(self, context: int, generator: torch.Generator) -> None:
        """Random K/V in the first `context` slots of every layer (decode speed does not depend on the values)."""
        for k, v in zip(self.keys, self.values):
            k[:, :, :context].normal_(generator=generator)
            v[:, :, :context].normal_(generator=generator)
        self.slot.fill_(context)

    @torch.no_grad()
    def _step(self, input_ids: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """input_ids: (B, 1); slot: (1,) int64, the new token's slot (= its position). Returns (B, vocab) logits."""
        inner = self.model.model
        B = input_ids.shape[0]
        h = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(h, slot.expand(B, 1))
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for layer, k_cache, v_cache in zip(inner.layers, self.keys, self.values):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = self._linear(attn.q_proj, x).view(B, 1, self.heads, self.head_dim).transpose(1, 2)
            k = self._linear(attn.k_proj, x).view(B, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = self._linear(attn.v_proj, x).view(B, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            k_cache.index_copy_(2, slot, k)
            v_cache.index_copy_(2, slot, v)
            o = F.scaled_dot_product_attention(q, k_cache, v_cache, scale=attn.scaling, enable_gqa=True)
            h = h + self._linear(attn.o_proj, o.transpose(1, 2).reshape(B, 1, -1))
            x = layer.post_attention_layernorm(h)
            mlp = layer.mlp
            h = h + self._linear(mlp.down_proj, mlp.act_fn(self._linear(mlp.gate_proj, x)) * self._linear(mlp.up_proj, x))
        return self.model.lm_head(inner.norm(h))[:, -1]

    def _linear(self, module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._row_major.get(id(module), module.weight), module.bias)

    def release(self) -> None:
        """Free the cache and the recorded graph now: the peer, its compiled step and the bound method that step
        wraps form a reference cycle, which would hold the whole cache until Python's garbage collector runs."""
        self.keys, self.values, self._row_major = [], [], {}
        self._graph = self._logits = None

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """One decode step at the current slot, then the slot advances. Returns (B, vocab) logits (a buffer the
        next step rewrites on CUDA). The first two calls run compiled code eagerly (compile, warm-up); the third
        records the CUDA graph that every later call replays."""
        self.input_ids.copy_(input_ids)
        if not self.input_ids.is_cuda or (self._graph is None and self._eager_steps < 2):
            self._eager_steps += 1
            logits = self._compiled(self.input_ids, self.slot)
        else:
            if self._graph is None:
                self._graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self._graph):
                    self._logits = self._compiled(self.input_ids, self.slot)
            self._graph.replay()
            logits = self._logits
        self.slot.add_(1)
        return logits
