"""Triton kernel of the wave buffer's page copy (contract: :mod:`kvpass.kernels.page_copy.reference`).

One program per move: it reads its (page, slot) row and the page's K and V tiles and writes them into the slot,
then the slot into the page table. On a GPU the source pages and the move list may be page-locked CPU tensors:
the kernel reads them over PCIe through their unified virtual addresses, so the host gathers nothing. (The copy
it replaces gathered the missing pages into a pinned staging buffer with ``torch.index_select`` on the host, then
copied the staging buffer to the device: host work on every offloaded step.)
"""
from __future__ import annotations

import triton
import triton.language as tl

from .reference import check_copy_inputs


@triton.jit
def _copy_pages_kernel(SRC_K, SRC_V, DST_K, DST_V, TABLE, MOVES, P, D, DV,
                       BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    page = tl.load(MOVES + 2 * i)
    slot = tl.load(MOVES + 2 * i + 1)
    rows = tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    ok = (rows[:, None] < P) & (d[None, :] < D)
    at = rows[:, None] * D + d[None, :]
    tl.store(DST_K + slot * P * D + at, tl.load(SRC_K + page * P * D + at, mask=ok), mask=ok)
    dv = tl.arange(0, BLOCK_DV)
    ok = (rows[:, None] < P) & (dv[None, :] < DV)
    at = rows[:, None] * DV + dv[None, :]
    tl.store(DST_V + slot * P * DV + at, tl.load(SRC_V + page * P * DV + at, mask=ok), mask=ok)
    tl.store(TABLE + page, slot.to(tl.int32))


def copy_pages(src_k, src_v, dst_k, dst_v, table, moves) -> None:
    """Apply the moves (m, 2) in place on the current stream (Triton); same result as the reference. On a GPU,
    src_k / src_v and moves may be CPU tensors in page-locked memory; they are read when the kernel runs, so the
    caller must keep them alive and unchanged until then (an event recorded after this call says when)."""
    check_copy_inputs(src_k, src_v, dst_k, dst_v, table, moves)
    if dst_k.is_cuda:
        for name, t in (("src_k", src_k), ("src_v", src_v), ("moves", moves)):
            if not t.is_cuda and not t.is_pinned():
                raise ValueError(f"{name} is in pageable CPU memory, which the GPU cannot read; pin it "
                                 f"(kvpass.methods.wave_index.pinned_empty) or move it to {dst_k.device}")
    elif any(t.is_cuda for t in (src_k, src_v, moves)):
        raise ValueError(f"the pool is on the CPU ({dst_k.device}) but a source or the moves are on a GPU")
    m = moves.shape[0]
    if m == 0:
        return
    P, D, DV = src_k.shape[1], src_k.shape[2], src_v.shape[2]
    _copy_pages_kernel[(m,)](src_k, src_v, dst_k, dst_v, table, moves, P, D, DV,
                             BLOCK_P=triton.next_power_of_2(P), BLOCK_D=triton.next_power_of_2(D),
                             BLOCK_DV=triton.next_power_of_2(DV), num_warps=4)
