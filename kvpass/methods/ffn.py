"""FFN computation shared by the FFN methods: the exact (dense) form, the reference CHESS will sparsify."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Activations recognised inside FFN sites (patterns/ffn.py classifies the traced activation numerically).
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def ffn_reference(x, w_up, b_up, w_down, b_down, w_gate, b_gate, activation: str) -> torch.Tensor:
    """x: (..., hidden); weights in nn.Linear layout (out, in).

    Gated (w_gate given): down(act(gate(x)) * up(x)); plain MLP: down(act(up(x))).
    """
    act = ACTIVATIONS[activation]
    up = F.linear(x, w_up, b_up)
    hidden = act(F.linear(x, w_gate, b_gate)) * up if w_gate is not None else act(up)
    return F.linear(hidden, w_down, b_down)
