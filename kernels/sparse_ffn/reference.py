"""Plain fp32 PyTorch references for CHESS activation sparsity, and the input checks shared with the
Triton kernels of ``kernel.py`` (same signatures, same semantics).

* :func:`sparse_ffn_reference`: an FFN whose activation is zeroed channel by channel below calibrated
  thresholds before the down projection.
* :func:`sparse_linear_reference`: a linear layer whose small inputs are zeroed below one threshold
  (CHESS+ does it at the inputs of the attention's query and output projections).

Notation: T tokens, H hidden size (FFN input), I intermediate size (channels), Ho FFN output size
(H in a transformer), K / N a linear layer's input / output size. Weights keep nn.Linear's (out, in)
layout except the matrix *after* the sparse activation, given transposed (``w_down_t`` (I, Ho),
``w_t`` (K, N)): row i then holds every weight that channel i feeds, so a kernel that skips a channel
skips one contiguous row.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "check_ffn_inputs", "check_linear_inputs", "sparse_ffn_reference", "sparse_linear_reference"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The FFN activations kvpass knows, by the name the `kvpass::ffn` op takes: the kernels implement each of them
# (kernel.py's _activation), the pattern matchers classify a traced activation against them numerically, and
# kvpass.methods.ffn computes the dense path with them.
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def _describe(t):
    return (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_matrix(name, t, what, shape=None):
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be a 2-D float16/bfloat16/float32 tensor {what}, got {_describe(t)}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {what} = {shape}, got {tuple(t.shape)}")


def _check_vector(name, t, n, what, dtypes=_FLOAT_DTYPES):
    if not isinstance(t, torch.Tensor) or t.dtype not in dtypes or tuple(t.shape) != (n,):
        kinds = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must be a {kinds} tensor of shape {what} = ({n},), got {_describe(t)}")


def check_ffn_inputs(x, w_up, b_up, w_down_t, b_down, w_gate, b_gate, thresholds, activation):
    """Validate the inputs of ``sparse_ffn``; returns (T, H, I, Ho)."""
    _check_matrix("x", x, "(T, H)")
    T, H = x.shape
    _check_matrix("w_up", w_up, "(I, H) (nn.Linear layout)")
    I = w_up.shape[0]
    _check_matrix("w_up", w_up, "(I, H) with x's H", (I, H))
    _check_matrix("w_down_t", w_down_t, "(I, Ho) (the down projection's weight transposed)")
    _check_matrix("w_down_t", w_down_t, "(I, Ho) with w_up's I", (I, w_down_t.shape[1]))
    if w_gate is not None:
        _check_matrix("w_gate", w_gate, "(I, H) like w_up", (I, H))
    elif b_gate is not None:
        raise ValueError("b_gate is given without w_gate: a plain MLP (w_gate=None) has no gate bias")
    for name, bias, n, what in (("b_up", b_up, I, "(I,)"), ("b_gate", b_gate, I, "(I,)"),
                                ("b_down", b_down, w_down_t.shape[1], "(Ho,)")):
        if bias is not None:
            _check_vector(name, bias, n, what)
    _check_vector("thresholds", thresholds, I, "(I,)", (torch.float32,))
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return T, H, I, w_down_t.shape[1]


def check_linear_inputs(x, w_t, bias, threshold):
    """Validate the inputs of ``sparse_linear``; returns (T, K, N)."""
    _check_matrix("x", x, "(T, K)")
    T, K = x.shape
    _check_matrix("w_t", w_t, "(K, N) (a Linear weight transposed)")
    _check_matrix("w_t", w_t, "(K, N) with x's K", (K, w_t.shape[1]))
    if bias is not None:
        _check_vector("bias", bias, w_t.shape[1], "(N,)")
    # A python number, not a tensor: reading a device scalar would cost a host sync.
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise ValueError(f"threshold must be a python float >= 0, got {threshold!r}")
    return T, K, w_t.shape[1]


def _float(t):
    return None if t is None else t.float()


def sparse_ffn_reference(x, w_up, b_up, w_down_t, b_down, w_gate, b_gate, thresholds, activation):
    """fp32 FFN with CHESS channel-wise thresholding of the activation.

    x: (T, H) fp16/bf16/fp32; w_up: (I, H); b_up: (I,) or None; w_down_t: (I, Ho), the down weight
    transposed; b_down: (Ho,) or None; w_gate: (I, H) or None (a plain MLP); b_gate: (I,) or None;
    thresholds: (I,) fp32, >= 0; activation: a key of :data:`ACTIVATIONS`. Any strides.
    Gated: a = act(x @ w_gate.T + b_gate), h = where(|a| >= t, a, 0) * (x @ w_up.T + b_up).
    Plain: a = act(x @ w_up.T + b_up), h = where(|a| >= t, a, 0).
    Returns h @ w_down_t + b_down as a new contiguous (T, Ho) tensor of x's dtype.
    """
    check_ffn_inputs(x, w_up, b_up, w_down_t, b_down, w_gate, b_gate, thresholds, activation)
    act = ACTIVATIONS[activation]
    xf = x.float()
    up = F.linear(xf, w_up.float(), _float(b_up))
    a = act(up if w_gate is None else F.linear(xf, w_gate.float(), _float(b_gate)))
    h = torch.where(a.abs() >= thresholds, a, 0.0)
    if w_gate is not None:
        h = h * up
    return F.linear(h, w_down_t.float().t(), _float(b_down)).to(x.dtype).contiguous()


def sparse_linear_reference(x, w_t, bias, threshold):
    """fp32 linear layer over the inputs whose magnitude reaches ``threshold``.

    x: (T, K) fp16/bf16/fp32; w_t: (K, N), a Linear weight transposed; bias: (N,) or None;
    threshold: python float >= 0. Any strides. Returns where(|x| >= threshold, x, 0) @ w_t + bias as a
    new contiguous (T, N) tensor of x's dtype.
    """
    check_linear_inputs(x, w_t, bias, threshold)
    xf = x.float()
    xs = torch.where(xf.abs() >= threshold, xf, 0.0)
    return F.linear(xs, w_t.float().t(), _float(bias)).to(x.dtype).contiguous()
