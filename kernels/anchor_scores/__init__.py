"""AnTKV anchor-score column statistics: Triton kernel and fp32 PyTorch reference.

``anchor_scores`` (Triton, ``kernel.py``) is imported lazily so that importing this package
(and using the reference) does not import triton: triton is only a Linux dependency, and the CPU
interpreter needs ``TRITON_INTERPRET=1`` set before triton's first import.
"""
from .reference import anchor_scores_reference

__all__ = ["anchor_scores", "anchor_scores_reference"]


def __getattr__(name):
    if name == "anchor_scores":
        from .kernel import anchor_scores

        return anchor_scores
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
