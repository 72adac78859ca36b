"""Runs a Hugging Face model eagerly over calibration tokens and shows every attention call to an observer.

The model's attention implementation is swapped, for the duration of `observe_attention`, for a recording
one registered with transformers' `AttentionInterface` (the hook every HF decoder calls with post-RoPE,
un-repeated q/k/v, whatever its family), so no model code is copied or patched. The recording function
computes the attention itself in fp32 (the same reference kvpass tests against) and hands the observer
the queries, keys, values, boolean mask, output and log-sum-exp of each layer.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch

from .._progress import progress as _progress
from ..kernels.anchor_scores.reference import attention_scores

_IMPLEMENTATION = "kvpass_calibration"


@dataclasses.dataclass
class AttentionCall:
    """One layer's attention over one calibration window (fp32).

    q: (B, Hq, L, D); k: (B, Hkv, L, D) post-RoPE; v: (B, Hkv, L, Dv); mask: (B|1, 1|Hq, L, L) bool, True =
    attend; out: (B, Hq, L, Dv); lse: (B, Hq, L) natural-log sum of exponentials of each query's scores.
    """

    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor
    scale: float
    softcap: float
    out: torch.Tensor
    lse: torch.Tensor


def _recording_attention(observer: Callable[[AttentionCall], None]):
    def attention(module, q, k, v, mask, scaling=None, softcap=None, **kwargs):
        scale = float(scaling) if scaling is not None else q.shape[-1] ** -0.5
        # The eager mask interface gives an additive float mask (0 = attend) that already holds causality,
        # padding and sliding windows.
        allowed = mask[..., : k.shape[-2]] == 0
        s = attention_scores(q, k, scale=scale, softcap=float(softcap or 0.0)).masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
        group = q.shape[1] // k.shape[1]
        out = torch.matmul(p, v.float().repeat_interleave(group, dim=1))
        observer(AttentionCall(module.layer_idx, q.float(), k.float(), v.float(), allowed.expand(
            q.shape[0], -1, -1, -1), scale, float(softcap or 0.0), out, lse))
        return out.to(q.dtype).transpose(1, 2).contiguous(), None

    return attention


@contextlib.contextmanager
def observe_attention(model: torch.nn.Module, observer: Callable[[AttentionCall], None]):
    """Within the block, every attention call of `model` (run eagerly) is computed in fp32 and observed."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(_IMPLEMENTATION, _recording_attention(observer))
    AttentionMaskInterface.register(_IMPLEMENTATION, eager_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(_IMPLEMENTATION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def run_windows(model: torch.nn.Module, windows: torch.Tensor, observer: Callable[[AttentionCall], None],
                progress: bool = True) -> None:
    """windows: (K, L) token ids; one eager forward per window (no cache), bypassing any in-place compile."""
    device = next(model.parameters()).device
    with observe_attention(model, observer):
        for window in _progress(windows, progress, "windows", "calibration"):
            # _call_impl: the module's own forward, even when model.compile() installed a compiled one.
            model._call_impl(window[None].to(device), use_cache=False)
