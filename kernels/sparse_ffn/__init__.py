"""CHESS activation sparsity (EMNLP 2024): Triton decode kernels that skip the weight rows of zeroed
channels, and fp32 PyTorch references (``reference.py``).

* :func:`sparse_ffn`: an FFN (gated or plain) whose activation is zeroed channel by channel where it is
  below calibrated thresholds; only the up / down weight rows of kept channels are read.
* :func:`sparse_linear`: a linear layer whose inputs below one threshold are zeroed (CHESS+ at the
  attention's query and output projections); only the weight rows of kept inputs are read.

The kernels serve decode, up to :data:`MAX_DECODE_TOKENS` tokens; prefill takes the dense path. A
kernel skips a weight row only when its channel is zero in *every* token row, and with many tokens the
union of active channels approaches all channels: nothing is left to skip. A dense GEMM over many tokens
is also compute-efficient (each weight tile serves a large tensor-core tile of tokens), while these
GEMV-style kernels, built to stream weights for a handful of tokens, are not.

The Triton functions (``kernel.py``) are imported lazily, as in :mod:`kvpass.kernels.attention`:
importing this package (and using the references) does not import triton (a Linux-only dependency, and
the CPU interpreter needs ``TRITON_INTERPRET=1`` set before its first import).
"""
from .reference import ACTIVATIONS, sparse_ffn_reference, sparse_linear_reference

# The op uses the kernels up to this many tokens and the dense torch path above (see above); the
# kernels themselves accept up to kernel.MAX_TOKENS = 16.
MAX_DECODE_TOKENS = 8

_KERNELS = ("sparse_ffn", "sparse_linear")

__all__ = ["ACTIVATIONS", "MAX_DECODE_TOKENS", "sparse_ffn", "sparse_ffn_reference", "sparse_linear", "sparse_linear_reference"]


def __getattr__(name):
    if name in _KERNELS:
        from . import kernel

        return getattr(kernel, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
