"""Plain PyTorch reference of the wave buffer's page copy, and the input checks the kernel shares.

An offloaded wave index (kvpass.methods.wave_buffer) keeps its clustered K/V in page-locked CPU memory and a pool
of pages on the GPU. Each decode step moves its missing pages into free slots of the pool; move i = (page, slot)
does ``dst_k[slot] = src_k[page]``, ``dst_v[slot] = src_v[page]`` and ``table[page] = slot``.

Shapes: src_k (Np, P, D), src_v (Np, P, Dv): the index's pages (P tokens each), on the CPU or the device;
dst_k (S, P, D), dst_v (S, P, Dv): the pool's S slots, with the same dtypes; table (Np,) int32: the slot of every
page; moves (m, 2) int64: (page, slot) rows, pages distinct, slots distinct. All contiguous.
"""
from __future__ import annotations

import torch

__all__ = ["check_copy_inputs", "copy_pages_reference"]


def _describe(t):
    return (tuple(t.shape), t.dtype, str(t.device)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_copy_inputs(src_k, src_v, dst_k, dst_v, table, moves) -> None:
    """Raise ValueError naming the first argument that does not fit the contract above."""
    tensors = {"src_k": src_k, "src_v": src_v, "dst_k": dst_k, "dst_v": dst_v, "table": table, "moves": moves}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous tensor, got {_describe(t)}")
    for name, t in (("src_k", src_k), ("src_v", src_v), ("dst_k", dst_k), ("dst_v", dst_v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (pages or slots, page size, head dim), got {_describe(t)}")
    if src_k.shape[:2] != src_v.shape[:2] or src_k.shape[1:] != dst_k.shape[1:] or src_v.shape[1:] != dst_v.shape[1:] \
            or dst_k.shape[0] != dst_v.shape[0]:
        raise ValueError(f"src_k {tuple(src_k.shape)}, src_v {tuple(src_v.shape)}, dst_k {tuple(dst_k.shape)}, "
                         f"dst_v {tuple(dst_v.shape)} must be (Np, P, D), (Np, P, Dv), (S, P, D), (S, P, Dv)")
    if src_k.dtype != dst_k.dtype or src_v.dtype != dst_v.dtype:
        raise ValueError(f"source and pool dtypes differ: keys {src_k.dtype} -> {dst_k.dtype}, values "
                         f"{src_v.dtype} -> {dst_v.dtype}")
    if table.dtype != torch.int32 or tuple(table.shape) != (src_k.shape[0],) or table.device != dst_k.device:
        raise ValueError(f"table must be ({src_k.shape[0]},) int32 on {dst_k.device}, got {_describe(table)}")
    if moves.dtype != torch.int64 or moves.dim() != 2 or moves.shape[1] != 2:
        raise ValueError(f"moves must be (m, 2) int64 (page, slot) rows, got {_describe(moves)}")
    if src_k.device != src_v.device or dst_k.device != dst_v.device:
        raise ValueError(f"src_k and src_v (or dst_k and dst_v) are on different devices: {src_k.device}, "
                         f"{src_v.device}, {dst_k.device}, {dst_v.device}")


def copy_pages_reference(src_k, src_v, dst_k, dst_v, table, moves) -> None:
    """Apply the moves (m, 2) in place (see the module docstring)."""
    check_copy_inputs(src_k, src_v, dst_k, dst_v, table, moves)
    pages, slots = moves[:, 0].to(src_k.device), moves[:, 1].to(dst_k.device)
    dst_k[slots] = src_k[pages].to(dst_k.device)
    dst_v[slots] = src_v[pages].to(dst_v.device)
    table[pages.to(table.device)] = slots.to(torch.int32)
