"""Passkey / needle-in-a-haystack evaluation: prompt builder, argument checks, heat map, and (slow) the real
model finding the key on the dense path, compiled = uncompiled."""
import random
import re
import time

import pytest
import torch

import kvpass
from kvpass.eval.passkey import (FILLER, INSTRUCTION, QUESTION, ANSWER_PREFIX, _frame, heatmap, make_key,
                                 make_passkey_prompt, needle_sentence, run_passkey)
from kvpass.eval.lengths import max_positions

CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")

ESSAY = " ".join(f"Essay line {i} is about the {w} of the river." for i, w in
                 enumerate(["colour", "depth", "speed", "width", "temperature", "history", "fish", "bridges"]))


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return _tiny_tokenizer()


def _tiny_tokenizer():
    """A byte-level BPE with single-digit tokens and a ChatML template, like SmolLM2's, built in ~0.1 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([FILLER, INSTRUCTION, QUESTION, ANSWER_PREFIX, needle_sentence("12345")] * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(params=["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def tokenizer(request, tiny_tokenizer):
    return tiny_tokenizer if request.param == "tiny" else request.getfixturevalue("smollm2")[1]


def _needle_at(ids: list[int], tokenizer, key: str) -> int:
    """Token index where the needle sentence starts (with or without its leading space)."""
    for text in (" " + needle_sentence(key), needle_sentence(key)):
        needle = tokenizer(text, add_special_tokens=False)["input_ids"]
        hits = [i for i in range(len(ids) - len(needle) + 1) if ids[i:i + len(needle)] == needle]
        if hits:
            assert len(hits) == 1, hits
            return hits[0]
    raise AssertionError("needle not found")


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("length", [256, 1000, 2048])
def test_prompt_length_and_needle_depth(tokenizer, length, chat):
    head, tail = _frame(tokenizer, chat)
    for depth in (0.0, 0.5, 1.0):
        key = make_key(random.Random(f"{length}{depth}"))
        ids, answer = make_passkey_prompt(tokenizer, length, depth, key, chat=chat)
        assert answer == key and re.fullmatch(r"[1-9]\d{4}", key)
        assert ids.shape == (1, length) and ids.dtype == torch.long   # exact length, by construction
        ids = ids[0].tolist()
        at = _needle_at(ids, tokenizer, key)
        needle_len = len(tokenizer(" " + needle_sentence(key), add_special_tokens=False)["input_ids"])
        haystack_len = length - len(head) - len(tail) - needle_len
        assert abs((at - len(head)) / haystack_len - depth) <= 0.05, (at, len(head), haystack_len, depth)
        assert ids[:len(head)] == head and ids[len(ids) - len(tail):] == tail
        text = tokenizer.decode(ids)
        assert text.count(key) == 2   # twice in the needle sentence, nowhere else
        assert text.rstrip().endswith(ANSWER_PREFIX) and QUESTION in text and INSTRUCTION in text
        assert ("<|im_start|>user" in text) == chat
        if depth == 0.5:   # inserted at a sentence boundary, whole sentences either side
            assert re.search(r"\. The pass key is \d{5}\. Remember it\. \d{5} is the pass key\. [A-Z]", text)


def test_needle_uses_haystack_text(tiny_tokenizer):
    ids, key = make_passkey_prompt(tiny_tokenizer, 1000, 0.5, "48151", haystack=ESSAY, chat=True)
    text = tiny_tokenizer.decode(ids[0])
    assert ids.shape == (1, 1000)
    assert "Essay line 0 is about the colour of the river." in text and "grass is green" not in text
    assert text.count("Essay line 0 ") >= 2   # the essay is shorter than the budget: it repeats
    assert re.search(r"river\. The pass key is 48151\. Remember it\. 48151 is the pass key\. Essay line", text)
    assert text.count("48151") == 2


def test_prompt_bad_arguments(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"depth=1\.5.*\[0, 1\]"):
        make_passkey_prompt(tiny_tokenizer, 256, 1.5, "12345", chat=False)
    with pytest.raises(ValueError, match=r"length=20: too short"):
        make_passkey_prompt(tiny_tokenizer, 20, 0.5, "12345", chat=False)
    with pytest.raises(ValueError, match="digits"):
        make_passkey_prompt(tiny_tokenizer, 256, 0.5, "12a45", chat=False)


@pytest.fixture(scope="module")
def tiny_llama(tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval()


def test_run_bad_arguments(tiny_llama, tiny_tokenizer):
    kwargs = dict(lengths=[256], depths=[0.5], trials=1, haystack=None, seed=0, progress=False)
    with pytest.raises(ValueError, match=r"length=600 exceeds the model's 512 positions"):
        run_passkey(tiny_llama, tiny_tokenizer, **{**kwargs, "lengths": [256, 600]})
    with pytest.raises(ValueError, match=r"depth=1\.5: must be in \[0, 1\]"):
        run_passkey(tiny_llama, tiny_tokenizer, **{**kwargs, "depths": [0.0, 1.5]})
    with pytest.raises(ValueError, match=r"trials=0: must be at least 1"):
        run_passkey(tiny_llama, tiny_tokenizer, **{**kwargs, "trials": 0})


def test_max_positions_rope_scaling(tiny_llama):
    from transformers import LlamaConfig

    assert max_positions(tiny_llama.config) == 512
    scaled = LlamaConfig(max_position_embeddings=512, rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                                      "rope_theta": 10000.0})
    assert max_positions(scaled) is None   # RoPE scaling: the caller may go past the trained context


def test_run_rows_tiny_model(tiny_llama, tiny_tokenizer):
    """Random weights find nothing; this checks the grid, the row format, the seeding and the outputs log."""
    outputs = []
    kwargs = dict(lengths=[96, 128], depths=[0.0, 1.0], trials=2, haystack=ESSAY, seed=3, max_new_tokens=4,
                  progress=False)
    rows = run_passkey(tiny_llama, tiny_tokenizer, outputs=outputs, **kwargs)
    assert [(r["length"], r["depth"]) for r in rows] == [(96, 0.0), (96, 1.0), (128, 0.0), (128, 1.0)]
    assert all(r["task"] == "needle" and r["trials"] == 2 and 0.0 <= r["success"] <= 1.0 for r in rows)
    assert len(outputs) == 8 and len({o["key"] for o in outputs}) == 8
    again = []
    assert run_passkey(tiny_llama, tiny_tokenizer, outputs=again, **kwargs) == rows and again == outputs


def test_heatmap_png(tmp_path):
    rows = [{"length": n, "depth": d, "success": (i + j) / 6, "trials": 2, "task": "passkey", "name": name}
            for name in ("dense", "antkv 2-bit") for i, n in enumerate([512, 1024, 2048])
            for j, d in enumerate([0.0, 0.5, 1.0])]
    for name, chosen in (("two.png", rows), ("one.png", [{k: v for k, v in r.items() if k != "name"}
                                                         for r in rows if r["name"] == "dense"])):
        path = heatmap(chosen, tmp_path / name, "passkey, synthetic")
        data = (tmp_path / name).read_bytes()
        assert str(path) == str(tmp_path / name) and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


@pytest.mark.slow
def test_real_model_finds_key_dense_compiled_equal(smollm2):
    """Dense SmolLM2-135M finds the key in a ~512-token prompt; kvpass-compiled output = HF output. (One prompt:
    each length compiles again under aot_eager, and a second one took CI another minute.)"""
    model, tokenizer = smollm2
    kwargs = dict(lengths=[512], depths=[0.5], trials=1, haystack=None, seed=0, max_new_tokens=6, progress=False)
    expected_log, got_log = [], []
    start = time.perf_counter()
    expected = run_passkey(model, tokenizer, outputs=expected_log, **kwargs)
    eager_s = time.perf_counter() - start
    success = sum(r["success"] for r in expected) / len(expected)
    assert success == 1.0, expected_log
    kvpass.compile(model, kvpass.Config(), inner="aot_eager", strict=True)
    try:
        start = time.perf_counter()
        got = run_passkey(model, tokenizer, outputs=got_log, **kwargs)
        compiled_s = time.perf_counter() - start
    finally:
        kvpass.detach(model)   # the module-scoped model goes back to plain HF
    assert got == expected and got_log == expected_log
    print(f"dense success {success:.2f} ({expected}); HF {eager_s:.1f} s, kvpass aot_eager {compiled_s:.1f} s")
