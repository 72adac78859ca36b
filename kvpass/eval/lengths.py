"""How long a model may run: its trained positions, unless RoPE scaling lets it go further."""
from __future__ import annotations


def max_positions(config) -> int | None:
    """The model's trained context (max_position_embeddings, n_positions, ...); None when RoPE scaling
    (a rope type other than "default") lets it run longer, or when the config names no limit."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for attr in ("rope_parameters", "rope_scaling"):
        rope = getattr(config, attr, None)
        if isinstance(rope, dict):
            # transformers 5 always sets it ("default" when nothing is scaled); Gemma-3 has one per layer type
            scopes = [v for v in rope.values() if isinstance(v, dict)] or [rope]
            if any((s.get("rope_type") or s.get("type") or "default") != "default" for s in scopes):
                return None
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_length(model, length: int, name: str) -> None:
    """ValueError naming `name`=`length` when it is beyond the model's positions (and nothing scales them)."""
    limit = max_positions(model.config)
    if limit is not None and length > limit:
        raise ValueError(f"{name}={length} exceeds the model's {limit} positions (no RoPE scaling configured); "
                         f"use {name} <= {limit}")
