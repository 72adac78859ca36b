"""Calibration: what a method learns offline from a model run over text (AnTKV codebooks, CHESS thresholds, the
wave index's query moments for pre-RoPE codes).

    cal = kvpass.calibration.calibrate(model, AnTKV(bits=1), tokenizer=tok)    # or `kvpass calibrate`
    cal.save("smollm2.kvpass.safetensors")
    kvpass.Config(attention=AnTKV(bits=1), calibration="smollm2.kvpass.safetensors")

Without an artefact, `resolve` calibrates on the default calibration text (never an evaluation text) and
caches the result under `cache_dir()/calibration`, keyed by the model's weights and the method's settings.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import warnings

import torch

from .._logging import logger as _log
from ..config import AnTKV, Chess, WaveIndex
from .artefact import Calibration, fingerprint

DEFAULT_TOKENS = 16384
DEFAULT_SEQLEN = 1024


def _calibrator(method):
    """(section name, section params, calibrate function) of a method that needs calibration, else None."""
    if not needs_calibration(method):
        return None
    if isinstance(method, AnTKV):
        from . import antkv

        return antkv.section_name(method), antkv.section_params(method), antkv.calibrate_antkv
    if isinstance(method, Chess):
        from . import chess

        return chess.section_name(method), chess.section_params(method), chess.calibrate_chess
    if isinstance(method, WaveIndex):
        from . import wave

        return wave.section_name(method), wave.section_params(method), wave.calibrate_wave
    raise NotImplementedError(f"{type(method).__name__} says it needs a calibration, and kvpass.calibration has no "
                              f"calibrator for it")


def needs_calibration(method) -> bool:
    """Whether an attention or FFN method config learns something from calibration text (the config says)."""
    return method is not None and method.needs_calibration


def calibration_windows(model, tokenizer, text: str | None = None, tokens: int = DEFAULT_TOKENS,
                        seqlen: int = DEFAULT_SEQLEN) -> tuple[torch.Tensor, dict]:
    """(K, seqlen) token windows of the calibration text, and a description of them for the metadata.

    Without a tokenizer (random-weight speed models) the windows are random token ids, said so in the metadata."""
    from ..eval.lengths import max_positions

    if tokens < 1 or seqlen < 2:
        raise ValueError(f"tokens={tokens}, seqlen={seqlen}: need tokens >= 1 and seqlen >= 2")
    seqlen = min(seqlen, max_positions(model.config) or seqlen)
    count = max(1, tokens // seqlen)
    if tokenizer is None:
        generator = torch.Generator().manual_seed(0)
        vocab = model.config.get_text_config(decoder=True).vocab_size
        windows = torch.randint(0, vocab, (count, seqlen), generator=generator)
        return windows, {"name": "random-token-ids", "sha256": None, "tokens": count * seqlen, "seqlen": seqlen}
    from ..eval.texts import DEFAULT_CALIBRATION
    from ..eval.windows import text_windows

    windows, loaded = text_windows(tokenizer, text or DEFAULT_CALIBRATION, seqlen, count)
    return windows, {"name": loaded.name, "sha256": loaded.sha256, "source": loaded.source,
                     "tokens": windows.numel(), "seqlen": seqlen}


def calibrate(model, methods, *, tokenizer=None, text: str | None = None, tokens: int = DEFAULT_TOKENS,
              seqlen: int = DEFAULT_SEQLEN, progress: bool = True) -> Calibration:
    """Calibrate every method of `methods` (one or a list) that needs it on `text` (default: the default
    calibration text) and return the artefact (save it with `.save(path)`)."""
    methods = methods if isinstance(methods, (list, tuple)) else [methods]
    by_calibrator = {}   # one model run per calibrator, however many settings it learns from it
    for method in methods:
        if needs_calibration(method):
            by_calibrator.setdefault(_calibrator(method)[2], []).append(method)
    if not by_calibrator:
        raise ValueError(f"none of {methods} needs calibration")
    windows, described = calibration_windows(model, tokenizer, text, tokens, seqlen)
    calibration = Calibration.new(model, described)
    for run, group in by_calibrator.items():
        run(model, windows, group, calibration, progress=progress)
    return calibration


def _tokenizer_of(model):
    """The tokenizer saved beside a model loaded from a local directory, else None."""
    path = pathlib.Path(str(getattr(model.config, "_name_or_path", "") or ""))
    if not (path / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def resolve(model, method, artefact: str | None) -> Calibration | None:
    """The calibration `method` runs with: the artefact file given (checked against the model and the method), or
    the cached automatic calibration (made on first use), or None when the method needs none."""
    calibrator = _calibrator(method)
    if calibrator is None:
        return None
    section, params, _ = calibrator
    if artefact is not None:
        calibration = Calibration.load(artefact)
        calibration.check(model, section, params)
        return calibration
    from ..models import cache_dir

    # The file name covers the weights and every calibration parameter: changing either calibrates anew.
    settings = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    path = cache_dir() / "calibration" / f"{fingerprint(model)[:16]}-{section}-{settings}.safetensors"
    if path.is_file():
        calibration = Calibration.load(path)
        calibration.check(model, section, params)
        return calibration
    tokenizer = _tokenizer_of(model)
    if tokenizer is None:
        warnings.warn("kvpass: calibrating on random token ids: this model has no tokenizer beside it (fine for "
                      "speed runs on random weights; give a calibration artefact for accuracy)", stacklevel=3)
    _log.warning("kvpass: calibrating %s for this model on the default calibration text; cached at %s",
                 section, path)
    calibration = calibrate(model, method, tokenizer=tokenizer)
    calibration.save(path)
    return calibration
