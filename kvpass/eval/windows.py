"""Token windows of a text: the GPTQ/KVQuant cut that perplexity scores, and calibration reads.

The text is tokenized once, whole, without special tokens, and cut into non-overlapping windows of `seqlen`
tokens; the first `max_windows` are kept.
"""
from __future__ import annotations

import torch


def windows(token_ids: torch.Tensor, seqlen: int, max_windows: int) -> torch.Tensor:
    """token_ids: (T,) -> (K, seqlen), the first K = min(max_windows, T // seqlen) windows."""
    if seqlen < 2:
        raise ValueError(f"seqlen={seqlen}: must be at least 2 tokens")
    if max_windows < 1:
        raise ValueError(f"max_windows={max_windows}: must be at least 1")
    count = min(max_windows, token_ids.numel() // seqlen)
    if count == 0:
        raise ValueError(f"the text has {token_ids.numel()} tokens, fewer than one window of seqlen={seqlen}; "
                         f"use a shorter --seqlen or a longer text")
    return token_ids[: count * seqlen].view(count, seqlen)


def text_windows(tokenizer, text, seqlen: int, max_windows: int):
    """The first windows of a registry text (or .txt file, or an already loaded kvpass.eval.texts.Text), tokenized
    whole without special tokens: ((K, seqlen) token ids, the loaded Text)."""
    from .texts import Text, load_text

    loaded = text if isinstance(text, Text) else load_text(text)
    ids = tokenizer(loaded.text, add_special_tokens=False, return_tensors="pt", verbose=False)["input_ids"][0]
    return windows(ids, seqlen, max_windows), loaded
