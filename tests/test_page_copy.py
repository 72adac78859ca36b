"""The wave buffer's page copy (kvpass.kernels.page_copy): the Triton kernel against its reference on odd page
sizes and head dims, every dtype, NaN-poisoned pools (slots not moved keep their contents), no moves; the input
checks; on a GPU, pages and moves read straight from pinned host memory.

The kernel runs on a GPU, or on CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when
there is no GPU)."""
from __future__ import annotations

import os

import pytest
import torch

from kvpass.kernels.page_copy import copy_pages_reference

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not torch.cuda.is_available() and not _INTERPRET,
                                  reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory read by a GPU kernel")


def _case(pages, slots, P, D, Dv, dtype, moved, seed, *, host="cpu", pin=False):
    """Fresh random source pages (on `host`), NaN-filled pool and table of -1 (on DEVICE), and `moved` random
    (page, slot) rows with distinct pages and distinct slots."""
    g = torch.Generator().manual_seed(seed)
    src_k = torch.randn(pages, P, D, generator=g).to(dtype)
    src_v = torch.randn(pages, P, Dv, generator=g).to(dtype)
    moves = torch.stack([torch.randperm(pages, generator=g)[:moved], torch.randperm(slots, generator=g)[:moved]], 1)
    if pin:
        src_k, src_v, moves = src_k.pin_memory(), src_v.pin_memory(), moves.pin_memory()
    else:
        src_k, src_v, moves = src_k.to(host), src_v.to(host), moves.to(host)
    dst_k = torch.full((slots, P, D), float("nan"), dtype=dtype, device=DEVICE)
    dst_v = torch.full((slots, P, Dv), float("nan"), dtype=dtype, device=DEVICE)
    table = torch.full((pages,), -1, dtype=torch.int32, device=DEVICE)
    return src_k, src_v, dst_k, dst_v, table, moves


def _copies(case):
    return [t.clone() for t in case[2:5]]


def _assert_identical(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


@needs_triton
@pytest.mark.parametrize("P, D, Dv, dtype, moved", [
    (16, 128, 128, torch.float16, 7),
    (16, 64, 64, torch.bfloat16, 1),
    (5, 80, 96, torch.float32, 9),        # page size and head dims that are not powers of two
    (3, 96, 64, torch.float16, 12),       # every slot moved
    (16, 128, 128, torch.float16, 0),     # nothing to move
])
def test_kernel_equals_reference(P, D, Dv, dtype, moved):
    from kvpass.kernels.page_copy import copy_pages

    case = _case(20, 12, P, D, Dv, dtype, moved, seed=P * D + moved, host=DEVICE)
    want, got = _copies(case), _copies(case)
    copy_pages_reference(*case[:2], *want, case[5])
    copy_pages(*case[:2], *got, case[5])
    _assert_identical(got, want)
    moved_slots = case[5][:, 1]
    assert torch.equal(want[0][moved_slots], case[0][case[5][:, 0]])              # the reference moves pages
    assert int(want[2].ge(0).sum()) == moved and torch.isnan(want[0]).sum() == (12 - moved) * P * D


@needs_cuda
def test_kernel_reads_pinned_host_pages():
    """The offload path: pages and moves in page-locked CPU memory, pool and table on the GPU."""
    from kvpass.kernels.page_copy import copy_pages

    case = _case(40, 16, 16, 128, 128, torch.float16, 11, seed=3, pin=True)
    want, got = _copies(case), _copies(case)
    copy_pages_reference(*case[:2], *want, case[5])
    copy_pages(*case[:2], *got, case[5])
    torch.cuda.synchronize()
    _assert_identical(got, want)
    pageable = _case(40, 16, 16, 128, 128, torch.float16, 11, seed=3, host="cpu")
    with pytest.raises(ValueError, match="src_k is in pageable CPU memory"):
        copy_pages(*pageable)


@pytest.mark.parametrize("change, message", [
    (lambda c: {4: c[4].long()}, r"table must be \(20,\) int32"),
    (lambda c: {5: c[5].int()}, r"moves must be \(m, 2\) int64"),
    (lambda c: {2: c[2].float()}, "source and pool dtypes differ"),
    (lambda c: {3: c[3][:, :2].contiguous()}, r"must be \(Np, P, D\), \(Np, P, Dv\)"),
    (lambda c: {0: c[0].transpose(1, 2)}, "src_k must be a contiguous tensor"),
])
def test_bad_inputs_are_rejected(change, message):
    case = list(_case(20, 12, 16, 64, 64, torch.float16, 4, seed=0, host=DEVICE))
    for i, t in change(case).items():
        case[i] = t
    with pytest.raises(ValueError, match=message):
        copy_pages_reference(*case)


@pytest.mark.skipif(not _INTERPRET, reason="a CPU check of the sm_90 compile (the interpreter runs the kernel)")
def test_kernel_compiles_for_hopper():
    """The interpreter runs kernels as numpy: also compile them for sm_90, as a GPU would (tests/hopper_compile.py)."""
    from hopper_compile import assert_what_runs_compiles_for_hopper

    assert_what_runs_compiles_for_hopper(lambda: test_kernel_equals_reference(5, 80, 96, torch.float16, 9),
                                         lambda: test_kernel_equals_reference(16, 128, 128, torch.bfloat16, 3))
