"""Perplexity, GPTQ/KVQuant protocol, through the compiled model.

The text is tokenized once without special tokens, cut into non-overlapping windows of `seqlen`
tokens, and the first `max_windows` are scored: each window is one forward pass (no cache), so the
method's representation is active inside the prefill attention, and the NLL is averaged over every
predicted token. Decode mode (`decode_tail=N`): each window's first `seqlen - N` tokens are prefilled
into a kvpass cache and the last N are teacher-forced one at a time through the decode path (what
retrieval methods, which act only in decode, change); its NLL covers those N tokens only.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from .._progress import progress as _progress
from .windows import text_windows, windows  # noqa: F401  (the windows perplexity scores; kvpass.eval.ppl's names)


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()


@torch.no_grad()
def perplexity(model, batches: torch.Tensor, *, decode_tail: int = 0, progress: bool = True) -> dict:
    """batches: (K, seqlen) token windows. Returns {"ppl", "nll", "tokens", "seconds", "mode"}."""
    from ..cache import KVCache

    seqlen = batches.shape[1]
    if decode_tail and not 0 < decode_tail < seqlen:
        raise ValueError(f"decode_tail={decode_tail}: must be between 1 and seqlen - 1 = {seqlen - 1}")
    device = next(model.parameters()).device
    nll, tokens, start, reads = 0.0, 0, time.perf_counter(), []
    for window in _progress(batches, progress, "windows"):
        ids = window[None].to(device)
        if not decode_tail:
            logits = model(ids, use_cache=False).logits
            nll += _nll_sum(logits[:, :-1], ids[:, 1:])
            tokens += seqlen - 1
            continue
        split = seqlen - decode_tail
        cache = KVCache(model)
        logits = model(ids[:, :split], past_key_values=cache, use_cache=True).logits[:, -1:]
        nll += _nll_sum(logits, ids[:, split : split + 1])
        for t in range(split, seqlen - 1):
            logits = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits
            nll += _nll_sum(logits, ids[:, t + 1 : t + 2])
        tokens += decode_tail
        reads.append(_decode_reads(model))
    mean = nll / tokens
    out = {"ppl": math.exp(mean), "nll": mean, "tokens": tokens, "seconds": time.perf_counter() - start,
           "mode": "decode" if decode_tail else "prefill"}
    if reads and all(reads):
        out["decode_reads"] = {key: sum(r[key] for r in reads) / len(reads) for key in reads[0]}
    return out


# Per-layer decode counters a method may report (kvpass.report's layer_stats; the wave index keeps them).
_READ_KEYS = ("keys_exact", "keys_estimated", "centroids_scored")


def _decode_reads(model) -> dict | None:
    """What the decode steps of the window just scored read, averaged over the layers that decoded through a
    method's index (fractions of the keys held, and of the centroids); None when no layer reports them."""
    from ..report import report

    stats = [s for s in report(model).get("layer_stats", []) if s.get("decode_steps") and "keys_exact" in s]
    if not stats:
        return None
    return {key: sum(s[key] for s in stats) / len(stats) for key in _READ_KEYS}

