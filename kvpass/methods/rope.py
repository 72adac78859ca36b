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
