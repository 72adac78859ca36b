"""FFN computation in the model's dtype: the exact FFN and its thresholded (CHESS) form.

This is the path of prompts (many tokens) and of CPUs; decode-sized calls on a GPU run the sparse kernels of
kvpass.kernels.sparse_ffn, whose fp32 references are what the tests hold both to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# The activations by name (defined beside the kernels that implement them, which import nothing of kvpass).
from ..kernels.sparse_ffn import ACTIVATIONS


def dense_ffn(x, w_up, b_up, w_down, b_down, w_gate, b_gate, thresholds, activation: str) -> torch.Tensor:
    """x: (..., H); w_up, w_gate: (I, H), w_down: (Ho, I) (nn.Linear layout); thresholds: None (exact) or (I,)
    fp32. Returns (..., Ho).

    Gated (w_gate given): down(a * up(x)) with a = act(gate(x)); plain MLP: down(a) with a = act(up(x)). With
    thresholds, a is zeroed where |a| < thresholds (compared in fp32)."""
    act = ACTIVATIONS[activation]
    a = act(F.linear(x, w_gate if w_gate is not None else w_up, b_gate if w_gate is not None else b_up))
    if thresholds is not None:
        a = a.masked_fill(a.float().abs() < thresholds, 0)
    hidden = a * F.linear(x, w_up, b_up) if w_gate is not None else a
    return F.linear(hidden, w_down, b_down)


def dense_sparse_linear(x, weight, bias, threshold: float) -> torch.Tensor:
    """x: (..., K) zeroed where |x| < threshold (fp32 compare), through weight: (N, K) (nn.Linear layout)."""
    return F.linear(x.masked_fill(x.float().abs() < threshold, 0), weight, bias)
