"""The generated family matrix: every text-decoder class AutoModelForCausalLM builds in the installed transformers,
built tiny from its own config (tests/families.py), so a new family appears here by itself.

Each family runs greedy generation (8 new tokens) with HF, then with kvpass (Dense, inner="eager") bound by each of
the design card's three calls (`kvpass.compile`, `model.compile(backend=...)`, `torch.compile(model, backend=...)`:
families.run_family says what each compares), and must do what
`families.MATRIX_EXPECTED` says (a family not listed must be rewritten with one attention site per layer):
- rewritten: the sites found = the expected count, HF's tokens and logits (within 1e-3);
- unrewritten: no site rewritten, HF's tokens, and kvpass warned with the reason;
- a known kvpass bug: an expected failure, strict, so fixing the bug fails the test until the entry goes;
- not in the matrix: skipped with the reason (multimodal, or the generic tiny shrink does not build it).

By default a fixed fast subset runs (about 10 s of CPU a run): twelve families through kvpass.compile, four
through the other two calls; KVPASS_FAMILY_MATRIX=all runs every family through every call (about 45 min on 2 cores). `python tests/families.py --matrix` prints the README's table from the same data.
"""
import copy
import os
import warnings

import pytest
import torch

import kvpass
from kvpass.attach import backend_of

from families import (CALLS, KNOWN_BUG, MATRIX_EXPECTED, NOT_BUILT, REWRITTEN, STATUSES, build_tiny,
                      causal_lm_families, expected, matrix_table, run_family)

# One family for each thing the matrix guards, chosen to stay under ~2 CPU-minutes in all.
FAST = ["olmo2", "falcon", "qwen2_moe", "qwen3_moe", "bart", "rwkv", "gpt_oss", "diffllama", "minicpm3", "mpt",
        "deepseek_v3", "qwen3_next"]
# The other two binding calls, by default on families where binding once went wrong (olmo2, starcoder2: the backend
# guessed the module from Dynamo's frame; ctrl: its outer forward breaks the graph before any module runs, so the
# inner model's frame is compiled first) and on one left unrewritten (gpt_oss).
FAST_OTHER_CALLS = ["olmo2", "starcoder2", "ctrl", "gpt_oss"]
if os.environ.get("KVPASS_FAMILY_MATRIX") == "all":
    RUNS = [(name, call) for name in causal_lm_families() for call in CALLS]
else:
    RUNS = [(name, CALLS[0]) for name in FAST] + [(name, call) for name in FAST_OTHER_CALLS for call in CALLS[1:]]


def _param(name, call):
    expect = expected(name)
    if expect.status == NOT_BUILT:
        return pytest.param(name, call, marks=pytest.mark.skip(reason=expect.reason))
    if expect.status == KNOWN_BUG:
        return pytest.param(name, call, marks=pytest.mark.xfail(strict=True, reason=expect.reason))
    return pytest.param(name, call)


@pytest.mark.slow
@pytest.mark.parametrize("name, call", [_param(name, call) for name, call in RUNS])
def test_family(name, call):
    expect = expected(name)
    outcome = run_family(name, call=call)
    assert not outcome.error, outcome
    assert outcome.equal, (f"kvpass tokens {outcome.kvpass_tokens} vs HF {outcome.hf_tokens}, logits differ by "
                           f"{outcome.max_logit_diff}", outcome.unmatched)
    if expect.status in (REWRITTEN, KNOWN_BUG):
        sites = outcome.layers if expect.attention is None else expect.attention
        assert outcome.attention_sites == sites, outcome
    else:
        assert outcome.attention_sites == (expect.attention or 0), outcome
        assert any(expect.reason in warning for warning in outcome.warnings), outcome.warnings
    ffn = expect.ffn_forward if call == "torch.compile" and expect.ffn_forward is not None else expect.ffn
    assert outcome.ffn_sites == (outcome.layers if ffn is None else ffn), outcome


def test_fast_subset_and_expectations_name_installed_families():
    families = causal_lm_families()
    assert set(FAST) <= set(families)
    assert not set(MATRIX_EXPECTED) - set(families), "stale entries: transformers no longer has these families"
    assert all(e.status in STATUSES and (e.status == REWRITTEN or e.reason) for e in MATRIX_EXPECTED.values())


def test_the_matrix_enumerates_the_causal_lm_mapping():
    """One entry per (class, config class) of AutoModelForCausalLM's mapping: the reference families are in it."""
    families = causal_lm_families()
    assert len(families) > 150
    for name in ("llama", "mistral", "qwen2", "gemma2", "gpt2", "opt", "falcon", "deepseek_v3", "qwen3_moe"):
        assert name in families, name
    assert families["gpt2"][0] == "GPT2LMHeadModel" and "gpt-sw3" not in families  # same class and config


def test_matrix_table_has_every_family_once():
    import re

    outcomes = matrix_table().split("\n\n")[0].splitlines()[2:]
    notes = r" \((?:[^()]|\([^()]*\))*\)"  # "name (note)", a note with one level of parentheses at most
    listed = [name.strip() for row in outcomes for name in re.sub(notes, "", row.split("|")[3]).split(",")]
    assert sorted(listed) == sorted(causal_lm_families())


def _falcon_alibi():
    reference = build_tiny("falcon", alibi=True)
    return reference, copy.deepcopy(reference), torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
def test_falcon_with_alibi_is_left_unrewritten_with_the_reason():
    """Falcon's alibi=True adds slopes x positions to the SDPA mask: refused at compile time, so the compiled
    forward computes HF's logits."""
    reference, model, prompt = _falcon_alibi()
    with torch.no_grad(), pytest.warns(UserWarning, match="additive attention bias"):
        kvpass.compile(model, kvpass.Config(), inner="eager")
        torch.testing.assert_close(model(prompt).logits, reference(prompt).logits)
    assert backend_of(model).records[0].attention_sites == 0


@pytest.mark.slow
def test_falcon_with_alibi_generates_hf_tokens():
    """What the matrix found: the decode engine used to drop HF's mask from the steps of refused sites."""
    reference, model, prompt = _falcon_alibi()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected_tokens = reference.generate(prompt, max_new_tokens=8, do_sample=False)
        kvpass.compile(model, kvpass.Config(), inner="eager")
        assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), expected_tokens)
