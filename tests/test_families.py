"""Every supported family (tests/families.py): sites found and rewritten, compiled = eager, compiled HF
generate = HF's own generate, left-padded batches = prompts alone, bounded recompiles."""
import pytest
import torch
import torch.nn.functional as F

import kvpass
from kvpass.attach import backend_of
from kvpass.rewrite import rewrite

from families import FAMILIES

NAMES = list(FAMILIES)
FAST_INNER = "aot_eager"  # AOTAutograd + fake tensors, without Inductor's codegen time; Inductor below


def _capture(model, *args, **kwargs):
    """The Dynamo graph of one forward call, unrewritten."""
    graphs = []

    def grab(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=grab)(*args, **kwargs)
    assert len(graphs) == 1, "the forward should trace as one graph"
    return graphs[0]


def _count(gm, *targets):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)


def _prompt(seed, length, batch=1):
    return torch.randint(3, 120, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
def test_op_counts_before_and_after_rewrite(name):
    family = FAMILIES[name]
    model = family.build()
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    gm = _capture(model, _prompt(0, 9), use_cache=False)
    attention_before = _count(gm, F.scaled_dot_product_attention) + _count(gm, F.softmax, torch.softmax)
    assert attention_before == layers
    record, _ = rewrite(gm, kvpass.backend(kvpass.Config()).runtime.id, rewrite_ffn_sites=True, root=model)
    assert (record.attention_sites, record.ffn_sites, record.layers) == (layers, layers, layers), record.table()
    assert record.unmatched == []
    assert set(record.found) - {v for v in record.found if v.startswith(("sdpa", "eager"))} == {family.ffn}
    assert all(v.startswith(family.attention) for v in record.found if v != family.ffn)
    assert _count(gm, torch.ops.kvpass.attention.default) == layers
    assert _count(gm, torch.ops.kvpass.ffn.default) == layers
    assert _count(gm, F.scaled_dot_product_attention) + _count(gm, F.softmax, torch.softmax) == 0


@pytest.mark.parametrize("name", NAMES)
def test_compiled_prefill_and_greedy_generate_match_hf(name):
    family = FAMILIES[name]
    reference, model = family.build(), family.build()
    prompt = _prompt(1, 11)
    with torch.no_grad():
        expected_logits = reference(prompt).logits
        expected_tokens = reference.generate(prompt, max_new_tokens=32, do_sample=False)
        kvpass.compile(model, kvpass.Config(ffn=kvpass.DenseFFN()), inner=FAST_INNER, strict=True)
        torch.testing.assert_close(model(prompt).logits, expected_logits, rtol=1e-4, atol=1e-4)
        tokens = model.generate(prompt, max_new_tokens=32, do_sample=False)
    assert torch.equal(tokens, expected_tokens)
    report = kvpass.report(model)
    assert report["attention_modes"] == {"kvpass-cache": report["layers"]}, report
    assert report["tokens_held"] == 11 + 31  # the last sampled token is never fed back
    assert report["unmatched"] == []


# Padding is the runtime's per-slot validity, the same for every family; what differs is how a family makes its
# positions and masks: RoPE with eager or SDPA attention, sliding windows (mistral; gemma2 with soft-capping; gemma3
# beside global layers), partial rotary (gpt_neox), learned absolute positions (gpt2, and opt's offset of 2). The
# other families differ from llama only in ways the prefill and generate tests above cover.
PADDING_FAMILIES = ["llama", "llama-eager", "mistral", "gemma2", "gemma3", "gpt_neox", "gpt2", "opt"]


@pytest.mark.parametrize("name", PADDING_FAMILIES)
def test_left_padded_batch_equals_each_prompt_alone(name):
    model = FAMILIES[name].build()
    kvpass.compile(model, kvpass.Config(), inner=FAST_INNER, strict=True)
    prompts = [_prompt(10 + i, n)[0] for i, n in enumerate((7, 12, 9))]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        for row, p in enumerate(prompts):
            alone = model.generate(p[None], max_new_tokens=12, do_sample=False)
            assert torch.equal(batch[row, width:], alone[0, len(p):]), f"row {row} differs"


@pytest.mark.parametrize("name", ["llama", "gemma3", "gpt2"])
def test_recompiles_stay_bounded_over_64_decode_steps(name):
    model = FAMILIES[name].build()
    kvpass.compile(model, kvpass.Config(), inner=FAST_INNER)
    with torch.no_grad():
        model.generate(_prompt(2, 10, batch=2), max_new_tokens=64, do_sample=False)
        model.generate(_prompt(3, 14, batch=2), max_new_tokens=64, do_sample=False)
    # prefill, first decode step (past specialised), then one decode graph with a dynamic past for all
    # later steps and for the second generation (3 measured for Llama; the bound holds for all three).
    assert len(backend_of(model).records) <= 3


def test_sampling_matches_hf_sampling():
    reference, model = FAMILIES["qwen2"].build(), FAMILIES["qwen2"].build()
    kvpass.compile(model, kvpass.Config(), inner=FAST_INNER)
    prompt = _prompt(4, 8, batch=2)
    with torch.no_grad():
        torch.manual_seed(123)
        expected = reference.generate(prompt, max_new_tokens=16, do_sample=True, top_k=20, temperature=0.9)
        torch.manual_seed(123)
        tokens = model.generate(prompt, max_new_tokens=16, do_sample=True, top_k=20, temperature=0.9)
    assert torch.equal(tokens, expected)


@pytest.mark.skipif(tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 12),
                    reason="Inductor's CPU C++ codegen in torch 2.11 fails on plain HF models too (CppCompileError "
                           "'tmp2 was not declared', seen on the GPU image); Inductor on CUDA: test_cuda.py")
@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
def test_inductor_matches_hf(name):
    family = FAMILIES[name]
    reference, model = family.build(), family.build()
    prompt = _prompt(5, 10)
    with torch.no_grad():
        expected = reference.generate(prompt, max_new_tokens=8, do_sample=False)
        kvpass.compile(model, kvpass.Config(ffn=kvpass.DenseFFN()), strict=True)
        torch.testing.assert_close(model(prompt).logits, reference(prompt).logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), expected)


def test_eager_kvpass_cache_gives_reference_semantics():
    """Not compiled: the kvpass cache stores in the runtime and HF's attention reads it back."""
    reference, model = FAMILIES["mistral"].build(), FAMILIES["mistral"].build()
    kvpass.attach(model, kvpass.Config())
    prompt = _prompt(6, 13)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, max_new_tokens=20, do_sample=False),
                           reference.generate(prompt, max_new_tokens=20, do_sample=False))
    report = kvpass.report(model)
    assert report["compiled"] is False and "never" in report["note"]
    assert report["tokens_held"] == 13 + 19 and report["attention_calls"]["materialized/decode"] == 2 * 19


def test_model_compile_directly_binds_the_backend_for_report():
    model = FAMILIES["llama"].build()
    model.compile(backend=kvpass.backend(kvpass.Config(), inner=FAST_INNER))
    with torch.no_grad():
        model(_prompt(7, 6))
    assert kvpass.report(model)["attention_sites"] == 2


def test_torch_compile_wrapper_generate_is_reported_as_not_compiled():
    model = FAMILIES["llama"].build()
    wrapper = torch.compile(model, backend=kvpass.backend(kvpass.Config(), inner=FAST_INNER))
    with torch.no_grad():
        wrapper.generate(_prompt(8, 6), max_new_tokens=3, do_sample=False)  # runs the uncompiled model
    report = kvpass.report(wrapper)
    assert report["compiled"] is False and "torch.compile(model) returns a wrapper" in report["note"]


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
def test_dynamic_shapes_symbolic_scale_and_softcap(name):
    """With dynamic=True, module floats (scale, soft-cap) arrive as SymFloat graph nodes."""
    reference, model = FAMILIES[name].build(), FAMILIES[name].build()
    prompt = _prompt(9, 10, batch=2)
    kvpass.compile(model, kvpass.Config(), inner=FAST_INNER, strict=True, dynamic=True)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=False),
                           reference.generate(prompt, max_new_tokens=12, do_sample=False))
