"""Tiny random-weight configurations of every supported model family: the test matrix.

Each entry builds a 2-layer model small enough to compile in seconds on 2 CPU cores, but with the
features that make the family's traced graph different (GQA, sliding windows, soft-capping, fused
gate_up, Conv1D, partial rotary, ...). The README's coverage table is checked against this list.
"""
from __future__ import annotations

import dataclasses
import inspect
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



# -- the generated family matrix --------------------------------------------------------------------------------
# Every text-decoder class of the installed transformers that AutoModelForCausalLM builds (its causal-LM mapping:
# the *ForCausalLM classes and the older *LMHeadModel names), built tiny from its own config class, so that a new
# family appears here by itself. tests/test_family_matrix.py checks each against MATRIX_EXPECTED below.

# Sizes applied wherever a config has the attribute with an integer default (None stays None: a feature off).
TINY_SIZES = {
    "vocab_size": VOCAB, "hidden_size": 64, "d_model": 64, "n_embd": 64, "embed_dim": 64, "dim": 64,
    "intermediate_size": 96, "ffn_dim": 96, "decoder_ffn_dim": 96, "encoder_ffn_dim": 96, "n_inner": 96,
    "ffn_hidden_size": 96, "inner_hidden_size": 96, "dim_ff": 96,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "decoder_layers": 2, "encoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "attention_head_dim": 16,
    "kv_channels": 16, "dim_head": 16,
    "max_position_embeddings": 256, "n_positions": 256, "n_ctx": 256, "max_seq_len": 256, "max_seq_length": 256,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "shared_intermediate_size": 32,
    "expert_intermediate_size": 32,
    "num_experts": 4, "n_routed_experts": 4, "num_local_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2, "top_k": 2,
    "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1,
    "n_group": 1, "topk_group": 1, "num_expert_group": 1, "first_k_dense_replace": 1, "num_dense_layers": 1,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "mamba_d_state": 16, "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_n_groups": 1, "state_size": 16,
    "mamba_expand": 2, "expand": 2, "mamba_chunk_size": 32, "chunk_size": 32,
    "rotary_dim": 8, "dff": 96, "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
    "expert_layer_offset": 1,
    "num_nextn_predict_layers": 0, "embedding_size": 64, "hidden_size_per_layer_input": 16,
    "vocab_size_per_layer_input": VOCAB,
}
TINY_TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
# Per-family changes on top of TINY_SIZES (features the generic sizes would switch off, or sizes it gets wrong).
TINY_OVERRIDES: dict[str, dict] = {
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "mamba2": {"num_heads": 8},
    "zaya": {"num_experts_per_tok": 1},
    "gemma4_assistant": {"hidden_size_per_layer_input": 0},
    "reformer": {"is_decoder": True, "axial_pos_embds_dim": [32, 32], "axial_pos_shape": [16, 16]},
    "bamba": {"attn_layer_indices": [1]},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "deepseek_v2": {"num_experts_per_tok": 2, "n_group": 1, "topk_group": 1},
    "falcon_h1": {"mamba_d_ssm": 128},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "zamba": {"layer_types": ["hybrid", "hybrid"]},
    "zamba2": {"layer_types": ["linear_attention", "hybrid"], "hybrid_layer_ids": [1]},
    "gemma3n_text": {"num_kv_shared_layers": 0, "activation_sparsity_pattern": [0.0, 0.0]},
}


def causal_lm_families() -> dict[str, tuple[str, type]]:
    """model type -> (class name, config class) for every class AutoModelForCausalLM builds, one entry per
    (class, config class): a composite config (text + vision) is replaced by the class's own text config, and
    a model type whose pair another type already covers is left out."""
    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    pairs: dict[tuple[str, type], list[str]] = {}
    for model_type, class_name in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()):
        model_class = getattr(transformers, class_name, None)
        config_class = CONFIG_MAPPING[model_type]
        if model_class is not None and config_class.sub_configs and model_class.config_class is not config_class:
            config_class = model_class.config_class  # e.g. Llama4ForCausalLM takes Llama4TextConfig
        pairs.setdefault((class_name, config_class), []).append(model_type)
    found = {}
    for (class_name, config_class), types in pairs.items():  # gpt2 rather than gpt-sw3: the config's own type
        found[config_class.model_type if config_class.model_type in types else types[0]] = (class_name, config_class)
    return dict(sorted(found.items()))


def tiny_config(model_type: str, **changes):
    """The family's config class with TINY_SIZES applied to the integer sizes it has (TINY_OVERRIDES, then
    `changes`, on top)."""
    _, config_class = causal_lm_families()[model_type]
    default = config_class()
    names = set(default.to_dict()) | set(getattr(config_class, "attribute_map", {}))
    kwargs = {}
    for key, value in TINY_SIZES.items():
        current = getattr(default, key, None) if key in names else None
        if isinstance(current, int) and not isinstance(current, bool):
            kwargs[key] = value
    for key in ("head_dim", "num_key_value_heads"):  # None there means "derive it": derive it from the tiny sizes
        if key in names and key not in kwargs and getattr(default, key, 0) is None:
            kwargs[key] = TINY_SIZES[key]
    if "qk_rope_head_dim" in kwargs:  # MLA: head_dim names the rotary part, and keys have one head per query head
        kwargs.update({key: kwargs[source] for key, source in (("head_dim", "qk_rope_head_dim"),
                                                                ("num_key_value_heads", "num_attention_heads"))
                       if key in kwargs and source in kwargs})
    kinds = getattr(default, "layer_types", None)
    settable = "layer_types" in inspect.signature(config_class.__init__).parameters
    if isinstance(kinds, (list, tuple)) and kinds and settable:
        # two layers of the first two kinds the family mixes (sliding + full, linear + full, ...)
        kwargs["layer_types"] = [kinds[0], next((kind for kind in kinds if kind != kinds[0]), kinds[0])]
    kwargs.update({key: value for key, value in TINY_TOKENS.items() if key in names})
    kwargs.update(TINY_OVERRIDES.get(model_type, {}))
    kwargs.update(changes)
    return config_class(**kwargs)


TINY_MAX_PARAMETERS = 20_000_000


class TooLarge(ValueError):
    """The generic shrink left the model large (a size attribute it does not know)."""


def build_tiny(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **changes):
    import transformers

    config = tiny_config(model_type, **changes)
    model_class = getattr(transformers, causal_lm_families()[model_type][0])
    with torch.device("meta"):  # count first: a size the generic shrink missed can need gigabytes
        parameters = sum(p.numel() for p in model_class._from_config(config).parameters())
    if parameters > TINY_MAX_PARAMETERS:
        raise TooLarge(f"{parameters:,} parameters after shrinking (limit {TINY_MAX_PARAMETERS:,})")
    torch.manual_seed(seed)
    model = model_class._from_config(config, dtype=dtype).eval()
    if hasattr(model, "set_default_language"):  # X-MOD: one adapter per language
        model.set_default_language(next(iter(config.languages)))
    model.generation_config.eos_token_id = None  # random weights hit any eos id by chance
    model.generation_config.pad_token_id = 0
    return model


@dataclasses.dataclass
class Outcome:
    """What one family did in the matrix: HF's greedy tokens vs kvpass's, and what the rewrite found."""
    family: str
    class_name: str
    layers: int = 0
    attention_sites: int = 0            # found and rewritten (prefill graph)
    ffn_sites: int = 0                  # found (prefill graph)
    unmatched: tuple = ()               # record.unmatched of the prefill graph
    warnings: tuple = ()                # kvpass warnings of the compile
    hf_tokens: tuple = ()
    kvpass_tokens: tuple = ()
    max_logit_diff: float = float("nan")
    error: str = ""                     # what failed, if anything did
    seconds: float = 0.0

    @property
    def equal(self) -> bool:
        return not self.error and self.hf_tokens == self.kvpass_tokens and self.max_logit_diff <= LOGIT_TOLERANCE


MATRIX_PROMPT_LEN, MATRIX_NEW_TOKENS = 9, 8
LOGIT_TOLERANCE = 1e-3  # fp32, inner="eager": kvpass attention sums in another order than HF's (seen: <= 5e-7)


# The three calls the design card promises bind kvpass to a model (tests/test_family_matrix.py runs each).
CALLS = ("kvpass.compile", "model.compile", "torch.compile")


def run_family(model_type: str, new_tokens: int = MATRIX_NEW_TOKENS, call: str = "kvpass.compile") -> Outcome:
    """Build the family tiny, greedy-generate with HF, then with kvpass (Dense, inner="eager") bound by `call`:
    - "kvpass.compile": kvpass.compile(model, config), then generate;
    - "model.compile": model.compile(backend=kvpass.backend(config)), then generate twice: the backend meets the
      model inside the first (HF's cache, said in a warning), the second runs on the kvpass cache and is compared;
    - "torch.compile": the wrapper torch.compile(model, backend=...) is called on the prompt (its logits are compared
      with HF's prefill logits, and it binds the model), then the wrapper's .generate (the uncompiled model: torch
      compiles the wrapper's forward only) runs over the kvpass cache and its tokens are compared."""
    import copy
    import time
    import traceback
    import warnings

    import kvpass
    from kvpass.attach import backend_of

    start = time.perf_counter()
    class_name = causal_lm_families()[model_type][0]
    outcome = Outcome(model_type, class_name)
    stage = "build"
    try:
        reference = build_tiny(model_type)
        outcome.class_name = type(reference).__name__
        outcome.layers = reference.config.get_text_config(decoder=True).num_hidden_layers
        model = copy.deepcopy(reference)
        prompt = torch.randint(3, VOCAB - 8, (1, MATRIX_PROMPT_LEN), generator=torch.Generator().manual_seed(0))
        options = dict(max_new_tokens=new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True)
        stage = "HF generate"
        with torch.no_grad():
            expected = reference.generate(prompt, **options)
        outcome.hf_tokens = tuple(expected.sequences[0, MATRIX_PROMPT_LEN:].tolist())
        stage = f"kvpass {call}"
        config = kvpass.Config(attention=kvpass.Dense())
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            if call == "torch.compile":
                backend = kvpass.backend(config, inner="eager")
                wrapper = torch.compile(model, backend=backend)
                prefill = wrapper(prompt).logits[:, -1]
                if backend_of(model) is not backend or not kvpass.report(wrapper)["compiled"]:
                    raise AssertionError("torch.compile(model, backend=...): the backend did not bind the model")
                got = wrapper.generate(prompt, **options)  # the uncompiled model over the kvpass cache
                outcome.kvpass_tokens = tuple(got.sequences[0, MATRIX_PROMPT_LEN:].tolist())
                got_logits, expected_logits = (prefill, *got.logits), (reference(prompt).logits[:, -1], *expected.logits)
            else:
                if call == "model.compile":
                    backend = kvpass.backend(config, inner="eager")
                    model.compile(backend=backend)
                    model.generate(prompt, **options)  # binds; HF's cache this once (warned)
                    if backend_of(model) is not backend:
                        raise AssertionError("model.compile(backend=...): the backend did not bind the model")
                else:
                    backend = backend_of(kvpass.compile(model, config, inner="eager"))
                got = model.generate(prompt, **options)
                outcome.kvpass_tokens = tuple(got.sequences[0, MATRIX_PROMPT_LEN:].tolist())
                got_logits, expected_logits = got.logits, expected.logits
        outcome.warnings = tuple(str(w.message) for w in caught if str(w.message).startswith("kvpass"))
        if len(expected_logits) == len(got_logits):  # NaN stays NaN (a plain max() would skip it)
            outcome.max_logit_diff = float(torch.stack([(a - b).abs().max() for a, b in zip(expected_logits,
                                                                                              got_logits)]).max())
        records = backend.records
        if records:
            first = records[0]
            outcome.attention_sites, outcome.ffn_sites = first.attention_sites, first.ffn_sites
            outcome.unmatched = tuple(first.unmatched)
    except Exception as error:  # noqa: BLE001 - the matrix records what failed and where
        outcome.error = f"{stage}: {type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
        outcome.error += " @ " + traceback.extract_tb(error.__traceback__)[-1].filename.split("site-packages/")[-1]
    finally:
        torch._dynamo.reset()
    outcome.seconds = round(time.perf_counter() - start, 2)
    return outcome


# -- what each family of the matrix is expected to do --------------------------------------------------------------
REWRITTEN = "rewritten, HF's tokens"
UNREWRITTEN = "unrewritten with a warning, HF's tokens"
KNOWN_BUG = "wrong or failing: a kvpass bug"
NOT_BUILT = "not in the matrix"
STATUSES = (REWRITTEN, UNREWRITTEN, KNOWN_BUG, NOT_BUILT)


@dataclasses.dataclass(frozen=True)
class Expect:
    """status: one of STATUSES. reason: for UNREWRITTEN a phrase kvpass's warning must contain; for KNOWN_BUG and
    NOT_BUILT the cause, in words. attention: attention sites rewritten in the prefill graph (None: one per
    layer for REWRITTEN, 0 otherwise). ffn, ffn_reason: FFN sites found, and why not one per layer."""
    status: str
    reason: str = ""
    attention: int | None = None
    ffn: int | None = None   # FFN sites found in the prefill graph (None: one per layer)
    ffn_reason: str = ""     # why they are fewer (or more)
    ffn_forward: int | None = None  # FFN sites of a plain forward (the torch.compile run), where not `ffn`
    note: str = ""           # what the family's attention is, where that explains the outcome


# Reasons shared by several families (the README's table groups families by them).
_SHARED_LAYER = "layer id 0 is shared"
_SINKS = "attention sinks"
_BIAS = "additive attention bias"
_BMM = "attention over 3-D (batch x heads) tensors"
_UNMATCHED_FORM = "softmax input is"
_NO_ATTENTION = "no attention site was rewritten"
_RECURRENT = "has recurrent layers"  # kvpass's warning: HF's own cache, kvpass attention one-shot over it
_HYBRID_NOTE = "hybrid: HF's cache, kvpass attention one-shot over it"
_HYBRID_FFN = "the hybrid's own layer mix: FFN forms in its recurrent or expert layers not matched (not investigated)"
_ESCAPED = ("recurrent layers, and Dynamo fails on the model's own cache handling under kvpass.compile (RuntimeError: "
            "a tensor escaped from inside a compiled graph)")
_OWN_CACHE = "the model keeps a cache kvpass's cache does not provide (an indexer, compression weights, its own class)"
_SYNC = "kvpass cache out of sync: the model calls the cache in a way the runtime does not follow"
_EXPERTS = "MoE experts only: found and left to the inner compiler with their reason (docs/chess.md)"
_ACTIVATION = "an activation kvpass::ffn does not compute (ReLU², ...): found and named among the unmatched"
_FFN_UNMATCHED = "no FFN candidate matched (xIELU, BitLinear's quantized weights, or a shape the matcher does not follow)"
_TWO_STREAMS = "two FFN calls per layer (XLNet's content and query streams)"
_MULTIMODAL = "multimodal or audio: a vision or audio tower, or codebook inputs, that the generic tiny sizes do not build"
_TINY = "the generic tiny shrink does not build it"

MATRIX_EXPECTED: dict[str, Expect] = {
    "apertus": Expect(REWRITTEN, ffn=0, ffn_reason=_FFN_UNMATCHED),
    "apertus1p5_text": Expect(REWRITTEN, ffn=0, ffn_reason=_FFN_UNMATCHED),
    "arcee": Expect(REWRITTEN, ffn=0, ffn_reason=_ACTIVATION),
    "axk1": Expect(REWRITTEN, note="MLA: keys and values expanded from the cached latent, one-shot"),
    "axk2": Expect(KNOWN_BUG, _OWN_CACHE, attention=0),
    "bailing_hybrid": Expect(REWRITTEN, attention=1, note=_HYBRID_NOTE),
    "bamba": Expect(REWRITTEN, attention=1, note=_HYBRID_NOTE),
    "big_bird": Expect(UNREWRITTEN, _NO_ATTENTION, ffn=0, ffn_reason=_FFN_UNMATCHED),
    "bitnet": Expect(REWRITTEN, ffn=0, ffn_reason=_FFN_UNMATCHED),
    "bloom": Expect(UNREWRITTEN, _BIAS, note="ALiBi through baddbmm"),
    "blt": Expect(NOT_BUILT, _TINY, note="hash embeddings of millions of rows"),
    "cohere_compass_text": Expect(NOT_BUILT, _TINY, note="rope parameters keyed by layer type: a KeyError"),
    "cpmant": Expect(UNREWRITTEN, _NO_ATTENTION),
    "ctrl": Expect(UNREWRITTEN, _NO_ATTENTION, ffn=0, ffn_reason=_FFN_UNMATCHED),
    "dbrx": Expect(NOT_BUILT, _TINY, note="DbrxConfig itself fails on 5.25"),
    "deepseek_v2": Expect(REWRITTEN, note="MLA: keys and values expanded from the cached latent, one-shot"),
    "deepseek_v3": Expect(REWRITTEN, note="MLA: keys and values expanded from the cached latent, one-shot"),
    "deepseek_v32": Expect(KNOWN_BUG, _OWN_CACHE, attention=0),
    "deepseek_v4": Expect(KNOWN_BUG, _OWN_CACHE, attention=0),
    "diffllama": Expect(UNREWRITTEN, _SHARED_LAYER, note="differential attention: two per layer"),
    "doge": Expect(UNREWRITTEN, _BIAS, note="a bias added to the mask"),
    "dory": Expect(UNREWRITTEN, _SHARED_LAYER, ffn=0, ffn_reason=_FFN_UNMATCHED, note="two attentions per layer"),
    "dots3_note_text": Expect(NOT_BUILT, _TINY, note="per-layer heads"),
    "ergo": Expect(REWRITTEN, ffn=0, ffn_reason=_ACTIVATION),
    "falcon_h1": Expect(REWRITTEN, note=_HYBRID_NOTE),
    "falcon_mamba": Expect(KNOWN_BUG, _ESCAPED, attention=0),
    "flex_olmo": Expect(REWRITTEN, ffn=0, ffn_reason=_EXPERTS),
    "flint": Expect(UNREWRITTEN, _SINKS),
    "fuyu": Expect(NOT_BUILT, _MULTIMODAL),
    "gemma3": Expect(NOT_BUILT, _MULTIMODAL),
    "gemma3n": Expect(NOT_BUILT, _MULTIMODAL),
    "gemma4": Expect(NOT_BUILT, _MULTIMODAL),
    "gemma4_assistant": Expect(NOT_BUILT, _TINY, note="its config validator rejects the tiny sizes"),
    "gemma4_text": Expect(NOT_BUILT, _TINY, note="per-layer head_dim"),
    "gemma4_unified": Expect(NOT_BUILT, _MULTIMODAL),
    "gemma4_unified_assistant": Expect(NOT_BUILT, _MULTIMODAL),
    "gemma4_unified_text": Expect(NOT_BUILT, _TINY, note="per-layer head_dim"),
    "git": Expect(NOT_BUILT, _MULTIMODAL),
    "glm4_moe_lite": Expect(REWRITTEN, note="MLA: keys and values expanded from the cached latent, one-shot"),
    "glm_moe_dsa": Expect(KNOWN_BUG, _OWN_CACHE, attention=0),
    "got_ocr2": Expect(NOT_BUILT, _MULTIMODAL),
    "gpt_neo": Expect(UNREWRITTEN, _UNMATCHED_FORM, note="local attention through torch.where"),
    "gpt_neox_japanese": Expect(UNREWRITTEN, _UNMATCHED_FORM),
    "gpt_oss": Expect(UNREWRITTEN, _SINKS, ffn=0, ffn_reason=_FFN_UNMATCHED),
    "granite_swa": Expect(KNOWN_BUG, _SYNC, attention=0),
    "granitemoe": Expect(REWRITTEN, ffn=0, ffn_reason=_EXPERTS),
    "granitemoe_swa": Expect(KNOWN_BUG, _SYNC, attention=0),
    "granitemoehybrid": Expect(REWRITTEN, attention=1, note=_HYBRID_NOTE),
    "hrm_text": Expect(UNREWRITTEN, _SHARED_LAYER, note="blocks applied in several cycles"),
    "hy_v4": Expect(KNOWN_BUG, _OWN_CACHE, attention=0),
    "inkling2_loop_text": Expect(NOT_BUILT, _TINY, note="HF generate fails: token ids past its embedding"),
    "inkling2_text": Expect(NOT_BUILT, _TINY, note="HF generate fails: token ids past its embedding"),
    "inkling_text": Expect(UNREWRITTEN, _RECURRENT, ffn=0, ffn_reason=_HYBRID_FFN, note="hybrid: HF's cache"),
    "jais2": Expect(REWRITTEN, ffn=0, ffn_reason=_ACTIVATION),
    "jamba": Expect(KNOWN_BUG, _ESCAPED, attention=0),
    "jetmoe": Expect(UNREWRITTEN, _NO_ATTENTION, ffn=0, ffn_reason=_FFN_UNMATCHED, note="mixture of attention heads"),
    "kimi_linear": Expect(REWRITTEN, attention=1, note=_HYBRID_NOTE),
    "kolibri1_1": Expect(NOT_BUILT, _TINY, note="its config validator rejects the tiny sizes"),
    "lara_mini": Expect(REWRITTEN, attention=1, note=_HYBRID_NOTE),
    "lfm2_moe": Expect(REWRITTEN, attention=1, ffn=1, ffn_reason=_HYBRID_FFN, note=_HYBRID_NOTE),
    "lfm3": Expect(REWRITTEN, attention=1, note=_HYBRID_NOTE),
    "longcat_flash": Expect(UNREWRITTEN, _SHARED_LAYER, note="two attentions per layer"),
    "mamba": Expect(KNOWN_BUG, _ESCAPED, attention=0),
    "mamba2": Expect(UNREWRITTEN, _RECURRENT, ffn=0, ffn_reason=_HYBRID_FFN, note="state-space: HF's cache"),
    "mellum": Expect(REWRITTEN, ffn=0, ffn_reason=_EXPERTS),
    "mimo_v2_flash": Expect(REWRITTEN, attention=1, ffn=1, ffn_reason=_EXPERTS, note="sinks in one layer of two: that one is refused"),
    "minicpm3": Expect(REWRITTEN, note="MLA: keys and values expanded from the cached latent, one-shot"),
    "minimax": Expect(KNOWN_BUG, _OWN_CACHE, attention=0),
    "minimax_m2": Expect(REWRITTEN, ffn=0, ffn_reason=_EXPERTS),
    "minimax_m3_vl_text": Expect(REWRITTEN, ffn=0, ffn_reason=_FFN_UNMATCHED),
    "mixtral": Expect(REWRITTEN, ffn=0, ffn_reason=_EXPERTS),
    "mllama": Expect(KNOWN_BUG, "kvpass cache: MllamaForCausalLM's cross-attention layers read cache entries the kvpass cache does not hold (AttributeError in generate)", attention=0),
    "moshi": Expect(REWRITTEN, ffn=0, ffn_reason=_FFN_UNMATCHED),
    "moss_transcribe_diarize": Expect(NOT_BUILT, _MULTIMODAL),
    "mpt": Expect(UNREWRITTEN, _UNMATCHED_FORM, note="ALiBi added to the scores; its generation config keeps no cache"),
    "musicgen": Expect(NOT_BUILT, _MULTIMODAL),
    "musicgen_melody": Expect(NOT_BUILT, _MULTIMODAL),
    "mvp": Expect(UNREWRITTEN, _BMM),
    "nanochat": Expect(REWRITTEN, ffn=0, ffn_reason=_ACTIVATION),
    "nemotron": Expect(REWRITTEN, ffn=0, ffn_reason=_ACTIVATION),
    "nemotron_h": Expect(REWRITTEN, attention=1, ffn=0, ffn_reason=_HYBRID_FFN, note=_HYBRID_NOTE),
    "olmo_hybrid": Expect(REWRITTEN, attention=1, note=_HYBRID_NOTE),
    "olmoe": Expect(REWRITTEN, ffn=0, ffn_reason=_EXPERTS),
    "openai-gpt": Expect(UNREWRITTEN, _BIAS, note="its causal mask is w * b - 1e4 * (1 - b); its forward takes no cache"),
    "persimmon": Expect(REWRITTEN, ffn=0, ffn_reason=_ACTIVATION),
    "phi4_multimodal": Expect(NOT_BUILT, _MULTIMODAL),
    "phimoe": Expect(REWRITTEN, ffn=0, ffn_reason=_EXPERTS),
    "prophetnet": Expect(UNREWRITTEN, _NO_ATTENTION, note="n-gram attention"),
    "qwen3_5_moe_text": Expect(REWRITTEN, attention=1, note=_HYBRID_NOTE),
    "qwen3_5_text": Expect(REWRITTEN, attention=1, note=_HYBRID_NOTE),
    "qwen3_moe": Expect(REWRITTEN, ffn=0, ffn_reason=_EXPERTS),
    "qwen3_next": Expect(REWRITTEN, attention=1, note=_HYBRID_NOTE),
    "qwen4_exp_text": Expect(NOT_BUILT, _TINY, note="sizes left None"),
    "recurrent_gemma": Expect(REWRITTEN, attention=1, note="one attention layer of two"),
    "reformer": Expect(UNREWRITTEN, _NO_ATTENTION, ffn=0, ffn_reason=_FFN_UNMATCHED),
    "rwkv": Expect(UNREWRITTEN, _NO_ATTENTION, ffn=0, ffn_reason=_ACTIVATION),
    "sarvam_mla": Expect(REWRITTEN, note="MLA: keys and values expanded from the cached latent, one-shot"),
    "trocr": Expect(UNREWRITTEN, _BMM),
    "xglm": Expect(UNREWRITTEN, _UNMATCHED_FORM),
    "xlm": Expect(UNREWRITTEN, _NO_ATTENTION, ffn=0, ffn_reason=_FFN_UNMATCHED),
    "xlnet": Expect(UNREWRITTEN, _NO_ATTENTION, ffn=4, ffn_reason=_TWO_STREAMS, ffn_forward=2),
    "xlstm": Expect(NOT_BUILT, _TINY, note="HF generate fails on its state shapes"),
    "xmod": Expect(KNOWN_BUG, _SYNC, attention=0),
    "youtu": Expect(REWRITTEN, note="MLA: keys and values expanded from the cached latent, one-shot"),
    "zamba": Expect(KNOWN_BUG, _ESCAPED, attention=0),
    "zamba2": Expect(REWRITTEN, attention=1, ffn=0, ffn_reason=_HYBRID_FFN, note=_HYBRID_NOTE),
    "zaya": Expect(REWRITTEN, ffn=4, ffn_reason=_HYBRID_FFN, note=_HYBRID_NOTE),
}


def expected(family: str) -> Expect:
    return MATRIX_EXPECTED.get(family, Expect(REWRITTEN))


def matrix_table() -> str:
    """The README's table of the generated matrix: families grouped by what they do, from MATRIX_EXPECTED."""
    groups: dict[tuple[str, str], list[str]] = {}
    families = causal_lm_families()
    for family in families:
        expect = expected(family)
        groups.setdefault((expect.status, expect.reason), []).append(
            f"{family} ({expect.note})" if expect.note else family)
    rows = ["| outcome | why | families |", "|---|---|---|"]
    for (status, reason), names in sorted(groups.items(), key=lambda g: (STATUSES.index(g[0][0]), -len(g[1]))):
        why = {_NO_ATTENTION: "no attention kvpass matches (state-space, recurrent or unmatched forms)",
               _UNMATCHED_FORM: "an eager attention form the matcher does not follow (softmax input is ...)",
               _SHARED_LAYER: "two attention sites would share a layer id (layer id N is shared ...)",
               _BIAS: "additive attention bias (ALiBi or relative positions): kvpass takes 0/-inf masks only",
               _SINKS: "attention sinks (a logit column joins the softmax)",
               _BMM: "attention over 3-D (batch x heads) tensors with bmm",
               _RECURRENT: "recurrent layers (state-space) whose state the kvpass cache does not hold: HF's cache is "
                           "kept (... has recurrent layers ...)"}.get(reason, reason or "-")
        rows.append(f"| {status} ({len(names)}) | {why} | {', '.join(names)} |")
    counts = {status: sum(len(n) for (s, _), n in groups.items() if s == status) for status in STATUSES}
    ffn: dict[str, list[str]] = {}
    for family in families:
        expect = expected(family)
        if expect.ffn is not None and expect.status != NOT_BUILT:
            ffn.setdefault(expect.ffn_reason, []).append(f"{family} ({expect.ffn})")
    rows += ["", "| FFN sites found (of 2 layers) | families |", "|---|---|"]
    rows += [f"| {reason} | {', '.join(names)} |" for reason, names in sorted(ffn.items(), key=lambda g: -len(g[1]))]
    rows.append("")
    rows.append(f"{len(families)} families of transformers {_transformers_version()}: " +
                "; ".join(f"{s} {counts[s]}" for s in STATUSES) + ".")
    return "\n".join(rows)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _main(argv: list[str]) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", action="store_true", help="print the generated family matrix's table")
    parser.add_argument("--run", nargs="*", metavar="FAMILY", help="run families of the matrix (all if none "
                        "named) and print one JSON line each")
    args = parser.parse_args(argv)
    if args.run is not None:
        for name in args.run or causal_lm_families():
            print(json.dumps(dataclasses.asdict(run_family(name))), flush=True)
    elif args.matrix:
        print(matrix_table())
    else:
        print(coverage_table())


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
