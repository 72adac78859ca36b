"""Rotary position embedding (RoPE) as a KV-cache method needs it to hold keys *before* RoPE.

Keys reach kvpass's attention op already rotated by their position. A quantizer that wants the pre-RoPE
distribution (AnTKV: codebooks that do not have to cover every rotation of a channel pair) rotates them back
by their position, encodes them there, and rotates the reconstruction forward again when attention reads it.
Both directions use the same (inv_freq, scaling, positions), so the numbers are self-consistent whatever
rotation is used; matching the model's own RoPE is what makes the codebooks fit.

The rotation itself (Hugging Face's "rotate half" convention, partial rotary, YaRN's scaling) is
kvpass.kernels.coded_attention.rope_rotate, which the coded-attention kernels re-apply; this module finds the
parameters of a model's RoPE.
"""
from __future__ import annotations

import warnings

import torch

# Rope types whose frequencies change with the sequence length: a key's rotation is not a function of its
# position alone, so keys cannot be held pre-RoPE.
_LENGTH_DEPENDENT = ("dynamic", "longrope")


def model_rotary(model: torch.nn.Module, layer: int) -> tuple[torch.Tensor, float] | None:
    """(inv_freq (R/2,) fp32 on the CPU, scaling) of the RoPE that `layer` of a Hugging Face model applies.

    None when the model has no rotary module (keys carry no rotation, e.g. GPT-2). Raises ValueError when
    it has one kvpass cannot reproduce from a key's position alone (length-dependent rope types, or a
    module without the inv_freq buffer transformers' rotary embeddings keep).
    """
    rotary = next((m for name, m in model.named_modules() if name.split(".")[-1] == "rotary_emb"), None)
    if rotary is None:
        return None
    prefix = ""
    if not hasattr(rotary, "inv_freq"):      # per-layer-type RoPE (Gemma 3: sliding and full attention)
        config = model.config.get_text_config()
        types = getattr(config, "layer_types", None)
        prefix = f"{types[layer]}_" if types else ""
    inv_freq = getattr(rotary, f"{prefix}inv_freq", None)
    rope_type = getattr(rotary, "rope_type", "default")
    if isinstance(rope_type, dict):
        rope_type = rope_type.get(prefix[:-1], "default")
    if inv_freq is None or rope_type in _LENGTH_DEPENDENT:
        raise ValueError(f"layer {layer}: the model's rotary embedding ({type(rotary).__name__}, rope type "
                         f"{rope_type!r}) does not give a key's rotation from its position alone")
    return inv_freq.detach().float().cpu().clone(), float(getattr(rotary, f"{prefix}attention_scaling", 1.0))


def model_rotations(model: torch.nn.Module, layers, fallback: str) -> dict:
    """layer -> (inv_freq, scaling) of its RoPE, or None: no RoPE, or one kvpass cannot reproduce, warned with
    `fallback` (what the method does instead)."""
    rotations = {}
    for layer in layers:
        try:
            rotations[layer] = model_rotary(model, layer)
        except ValueError as error:
            warnings.warn(f"{error}; {fallback}", stacklevel=3)
            rotations[layer] = None
    return rotations


def rotation_tensors(layer: int, rotation: tuple[torch.Tensor, float] | None) -> dict[str, torch.Tensor]:
    """A calibration section's record of the RoPE `layer`'s tensors were rotated back by (empty for None)."""
    if rotation is None:
        return {}
    inv_freq, scaling = rotation
    # clone: safetensors refuses tensors that share storage
    return {f"layers.{layer}.rope_inv_freq": inv_freq.clone(), f"layers.{layer}.rope_scaling": torch.tensor([scaling])}


def stored_rotation(tensors: dict, layer: int) -> tuple[torch.Tensor, float] | None:
    """(inv_freq, scaling) that a calibration section recorded for `layer` (rotation_tensors), or None."""
    inv_freq = tensors.get(f"layers.{layer}.rope_inv_freq")
    return None if inv_freq is None else (inv_freq, float(tensors[f"layers.{layer}.rope_scaling"]))
