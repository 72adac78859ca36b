"""The plain GPT of examples/gpt.py decodes incrementally only because kvpass holds its cache."""
import pathlib
import sys

import pytest
import torch

import kvpass

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples"))
import gpt  # noqa: E402  (examples/gpt.py)


def _model():
    torch.manual_seed(0)
    return gpt.GPT(gpt.GPTConfig()).eval()


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_incremental_decoding_through_kvpass_equals_full_recomputation(inner):
    model, prompt = _model(), torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    expected = gpt.generate_full(model, prompt, 20)
    kvpass.compile(model, kvpass.Config(ffn=kvpass.DenseFFN()), inner=inner, strict=True)
    with kvpass.sequence(model):
        assert torch.equal(gpt.generate_incremental(model, prompt, 20), expected)
    report = kvpass.report(model)
    assert report["attention_sites"] == 2 and report["ffn_sites"] == 2
    assert report["tokens_held"] == 0  # the sequence was dropped when the block ended


def test_without_a_sequence_each_call_is_independent():
    """No open sequence: calls do not accumulate state (one-shot), so feeding one token at a time is wrong
    in exactly the way the uncompiled model is wrong."""
    model, prompt = _model(), torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    eager = gpt.generate_incremental(model, prompt, 5)
    kvpass.compile(model, kvpass.Config(), inner="eager")
    assert torch.equal(gpt.generate_incremental(model, prompt, 5), eager)
    assert kvpass.report(model)["tokens_held"] == 0


def test_sequences_do_not_leak_into_each_other():
    model = _model()
    kvpass.compile(model, kvpass.Config(), inner="eager")
    a, b = (torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(s)) for s in (3, 4))
    with kvpass.sequence(model):
        gpt.generate_incremental(model, a, 6)
    with kvpass.sequence(model):
        after_a = gpt.generate_incremental(model, b, 6)
    with kvpass.sequence(model):
        fresh = gpt.generate_incremental(model, b, 6)
    assert torch.equal(after_a, fresh) and torch.equal(fresh, gpt.generate_full(model, b, 6))
