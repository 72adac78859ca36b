"""The stateless CHESS ops, registered when the rewrite first needs them (kvpass/rewrite.py imports this module):
`torch.library.triton_op` inspects its functions' source and imports triton and parts of Inductor, which would
double the time of `import kvpass`. Import this module before loading a graph or exported program that names them.

- `kvpass::ffn`: a whole FFN site (gated or plain) as one call, exact or with CHESS thresholds.
- `kvpass::sparse_linear`: a projection whose small inputs are zeroed (CHESS+ query and output projections).

Both are `triton_op`s reading every tensor from their arguments (the thresholds and the input-major weight copies
enter the graph as inputs, kvpass/graph_inputs.py), so AOTAutograd traces through them and Inductor launches their
Triton kernels (or fuses their dense path) from its own generated code. As opaque custom ops their Python bodies
cost more host time per decode step than the GPU time the sparse kernels save (docs/chess.md).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import kernels_dispatch
from .methods.ffn import ACTIVATIONS, dense_ffn, dense_sparse_linear


@torch.library.triton_op("kvpass::ffn", mutates_args=())
def ffn(x: Tensor, w_up: Tensor, b_up: Tensor | None, w_down: Tensor, b_down: Tensor | None, w_gate: Tensor | None,
        b_gate: Tensor | None, thresholds: Tensor | None, w_down_t: Tensor | None, activation: str) -> Tensor:
    """x: (..., H); w_* in nn.Linear layout (out, in); thresholds: None (the exact FFN) or (I,) fp32 CHESS
    thresholds; w_down_t: None or w_down as a contiguous (I, Ho) copy for the sparse kernel. Returns
    (..., w_down.shape[0]). With thresholds, decode-sized calls on the Triton path run the sparse kernel; the rest
    (prompts, CPUs, the exact FFN) run the dense path in the model's dtype."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not one of {sorted(ACTIVATIONS)}")
    if thresholds is None or not kernels_dispatch.decode_sized(x):
        return dense_ffn(x, w_up, b_up, w_down, b_down, w_gate, b_gate, thresholds, activation).contiguous()
    return kernels_dispatch.sparse_ffn(x, w_up, b_up, w_down, b_down, w_gate, b_gate, activation, thresholds,
                                       w_down_t).contiguous()


@torch.library.triton_op("kvpass::sparse_linear", mutates_args=())
def sparse_linear(x: Tensor, weight: Tensor, bias: Tensor | None, threshold: float, w_t: Tensor | None) -> Tensor:
    """x: (..., K) with entries |x| < threshold zeroed, through a projection weight: (N, K) in nn.Linear layout,
    plus bias; w_t: None or weight as a contiguous (K, N) copy for the sparse kernel. Returns (..., N): CHESS+'s
    thresholded query and output projections."""
    if not kernels_dispatch.decode_sized(x):
        return dense_sparse_linear(x, weight, bias, float(threshold)).contiguous()
    return kernels_dispatch.sparse_linear(x, weight, bias, float(threshold), w_t).contiguous()
