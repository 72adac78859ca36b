"""Tiny random-weight configurations of every supported model family: the test matrix.

Each entry builds a 2-layer model small enough to compile in seconds on 2 CPU cores, but with the
features that make the family's traced graph different (GQA, sliding windows, soft-capping, fused
gate_up, Conv1D, partial rotary, ...). The README's coverage table is checked against this list.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    make_config: Callable[[], object]
    attention: str  # "sdpa" or "eager": the attention implementation HF uses by default for it
    ffn: str        # the FFN catalogue variant its FFN must be classified as
    notes: str = ""
    attn_implementation: str | None = None  # force HF's implementation (None: the family's default)

    def build(self, seed: int = 0, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        extra = {"attn_implementation": self.attn_implementation} if self.attn_implementation else {}
        model = AutoModelForCausalLM.from_config(self.make_config(), dtype=dtype, **extra).eval()
        # Generate exactly the requested number of tokens: random weights hit any eos id by chance.
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        return model


VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _llama():
    from transformers import LlamaConfig
    return LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def _mistral():
    from transformers import MistralConfig
    return MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8)


def _qwen2():
    from transformers import Qwen2Config
    return Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2)


def _qwen3():
    from transformers import Qwen3Config
    return Qwen3Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def _gemma():
    from transformers import GemmaConfig
    return GemmaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=16)


def _gemma2():
    from transformers import Gemma2Config
    return Gemma2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
                        query_pre_attn_scalar=20)


def _gemma3():
    from transformers import Gemma3TextConfig
    return Gemma3TextConfig(**COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                            sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                            query_pre_attn_scalar=16)


def _phi3():
    from transformers import Phi3Config
    return Phi3Config(**COMMON, num_attention_heads=4, num_key_value_heads=2)


def _gpt2():
    from transformers import GPT2Config
    return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1,
                      eos_token_id=2)


def _gpt_neox():
    from transformers import GPTNeoXConfig
    return GPTNeoXConfig(**COMMON, num_attention_heads=4, rotary_pct=0.25)


def _opt():
    from transformers import OPTConfig
    return OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=256, word_embed_proj_dim=64, bos_token_id=1, eos_token_id=2,
                     pad_token_id=0)


FAMILIES = {f.name: f for f in [
    Family("llama", _llama, "sdpa", "glu-silu", "GQA 2:1"),
    Family("llama-eager", _llama, "eager", "glu-silu", "attn_implementation='eager'", attn_implementation="eager"),
    Family("mistral", _mistral, "sdpa", "glu-silu", "GQA 4:1, sliding window 8"),
    Family("qwen2", _qwen2, "sdpa", "glu-silu", "qkv bias"),
    Family("qwen3", _qwen3, "sdpa", "glu-silu", "q/k RMSNorm"),
    Family("gemma", _gemma, "sdpa", "glu-gelu_tanh", "MQA, tanh-GELU gate"),
    Family("gemma2", _gemma2, "eager", "glu-gelu_tanh", "eager attention, soft-capping 5.0, sliding window",
           attn_implementation="eager"),
    Family("gemma3", _gemma3, "sdpa", "glu-gelu_tanh", "sliding + global layers, custom scale"),
    Family("phi3", _phi3, "sdpa", "fused-glu-silu", "fused gate_up"),
    Family("gpt2", _gpt2, "sdpa", "conv1d-mlp-gelu_tanh", "Conv1D addmm, decomposed NewGELU"),
    Family("gpt_neox", _gpt_neox, "sdpa", "mlp-gelu", "partial rotary 25 %"),
    Family("opt", _opt, "sdpa", "mlp-relu", "learned positions, ReLU MLP"),
]}


def coverage_table() -> str:
    """The README's model-coverage table (tests/test_readme.py checks the README carries exactly this)."""
    rows = ["| family | HF class | attention | FFN pattern | what the tiny config exercises |", "|---|---|---|---|---|"]
    for f in FAMILIES.values():
        rows.append(f"| {f.name} | {type(f.build()).__name__} | {f.attention} | {f.ffn} | {f.notes} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(coverage_table())
