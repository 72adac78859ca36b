"""The wave index's cluster selection: the reference against torch.topk and its tie rule, the Triton kernel against
the reference (same clusters, same order, same counted sizes) on odd sizes, ties, empty clusters and strided
inputs, and the input checks.

The kernel runs on a GPU, or on CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when
there is no GPU)."""
from __future__ import annotations

import os

import pytest
import torch

from kvpass.kernels.cluster_select import rank_keys, select_clusters_reference

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not torch.cuda.is_available() and not _INTERPRET,
                                  reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")


def _inputs(B, H, C, seed, *, ties=True, empty=True, pad=3):
    """Scores (B, H, C + pad) shaped like the scoring's softmax sums (a few large, most tiny), sizes (B, H, C + pad)
    int32; every 7th score copies another (exact ties), about 1 in 10 clusters is empty."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(B, H, C + pad, generator=g).pow(8)
    if ties:
        scores[..., ::7] = scores[..., 3:4]
    sizes = torch.randint(1, 40, (B, H, C + pad), generator=g, dtype=torch.int32)
    if empty:
        sizes[torch.rand(B, H, C + pad, generator=g) < 0.1] = 0
    return scores.to(DEVICE), sizes.to(DEVICE)


def test_reference_is_topk_with_lower_index_on_ties_and_empty_clusters_last():
    scores, sizes = _inputs(2, 3, 50, seed=0, ties=False, empty=False)
    r, e = 6, 13
    top = select_clusters_reference(scores, sizes, 50, r, e)
    best = scores[..., :50].topk(r + e, dim=-1).indices
    assert torch.equal(top[..., :r].long(), best[..., :r].sort(-1).values)
    assert torch.equal(top[..., r:].long(), best[..., r:].sort(-1).values)
    # Ties go to the lower index; an empty cluster ranks below every real one, even one scoring 0.
    scores = torch.tensor([[[0.5, 0.9, 0.5, 0.0, 0.9, 0.5]]])
    sizes = torch.tensor([[[3, 0, 1, 2, 4, 5]]], dtype=torch.int32)
    assert select_clusters_reference(scores, sizes, 6, 2, 3).tolist() == [[[0, 4, 2, 3, 5]]]
    assert select_clusters_reference(scores, sizes, 6, 1, 0).tolist() == [[[4]]]
    assert rank_keys(scores, sizes).tolist()[0][0][1] == 0
    counts = torch.zeros(2, dtype=torch.int64)
    select_clusters_reference(scores, sizes, 6, 2, 3, counts)
    assert counts.tolist() == [3 + 4, 1 + 2 + 5]


@needs_triton
@pytest.mark.parametrize("B,H,C,r,e", [
    (1, 1, 1, 1, 0),          # one cluster
    (1, 1, 5, 1, 2),
    (2, 3, 300, 7, 60),       # several chunks per row
    (1, 8, 1000, 18, 232),    # default-like budgets (1.8 % / 23.2 %)
    (1, 2, 20000, 360, 4640), # 10 chunks of 2,048: the write kernel's prefix spans several tiles of 4,096
    (1, 1, 64, 0, 64),        # all estimated
    (1, 1, 64, 64, 0),        # all retrieved
])
def test_kernel_equals_reference(B, H, C, r, e):
    from kvpass.kernels.cluster_select import select_clusters

    scores, sizes = _inputs(B, H, C, seed=C + r)
    counts, ref_counts = (torch.zeros(2, dtype=torch.int64, device=DEVICE) for _ in range(2))
    top = select_clusters(scores, sizes, C, r, e, counts)
    ref = select_clusters_reference(scores, sizes, C, r, e, ref_counts)
    assert torch.equal(top, ref) and torch.equal(counts, ref_counts)


@needs_triton
def test_kernel_reads_strided_inputs_and_int64_sizes_and_only_the_first_clusters():
    from kvpass.kernels.cluster_select import select_clusters

    scores, sizes = _inputs(2, 4, 200, seed=5, pad=40)
    scores = scores.transpose(0, 1).contiguous().transpose(0, 1)   # strides (C', B C', 1)
    scores[..., 200:] = float("nan")                               # past `clusters`: never read
    sizes = sizes.long()
    top = select_clusters(scores, sizes, 200, 9, 41)
    assert torch.equal(top, select_clusters_reference(scores, sizes, 200, 9, 41))
    assert select_clusters(scores, sizes, 200, 0, 0).shape == (2, 4, 0)


@needs_triton
@pytest.mark.parametrize("Hkv,group,C", [(2, 4, 700), (1, 7, 33)])
def test_first_level_counted_by_the_scoring_kernel_selects_the_same(Hkv, group, C):
    """score_clusters(select_sizes=) counts the first level while it writes the scores; the select then skips its
    own first pass and must pick what the reference picks from those scores."""
    from kvpass.kernels.cluster_select import new_histogram, select_clusters
    from kvpass.kernels.wave_attention import score_clusters

    g = torch.Generator().manual_seed(C)
    q = torch.randn(2, Hkv * group, 1, 64, generator=g).to(DEVICE)
    centroids = torch.randn(2, Hkv, C + 5, 64, generator=g).to(DEVICE)
    sizes = torch.randint(0, 30, (2, Hkv, C + 5), generator=g, dtype=torch.int32).to(DEVICE)
    logits, scores, hist = score_clusters(q, centroids, C, scale=0.125, select_sizes=sizes)
    assert torch.equal(score_clusters(q, centroids, C, scale=0.125)[1], scores)
    r, e = 3, C // 4
    counts, ref_counts = (torch.zeros(2, dtype=torch.int64, device=DEVICE) for _ in range(2))
    top = select_clusters(scores, sizes, C, r, e, counts, top_level=hist)
    assert torch.equal(top, select_clusters_reference(scores, sizes, C, r, e, ref_counts))
    assert torch.equal(counts, ref_counts)
    with pytest.raises(ValueError, match=rf"top_level must be new_histogram\({2 * Hkv}\)"):
        select_clusters(scores, sizes, C, r, e, top_level=new_histogram(3, DEVICE))
    with pytest.raises(ValueError, match=r"select_sizes must be a \(2, \d, >= \d+\) int32/int64"):
        score_clusters(q, centroids, C, scale=0.125, select_sizes=sizes[:, :, :2])


def test_bad_inputs_are_refused_with_the_value():
    scores, sizes = _inputs(1, 2, 20, seed=1)
    with pytest.raises(ValueError, match=r"retrieved \+ estimated = 15 \+ 10 exceeds clusters=20"):
        select_clusters_reference(scores, sizes, 20, 15, 10)
    with pytest.raises(ValueError, match=r"clusters=30 must be in \[1, 23\]"):
        select_clusters_reference(scores, sizes, 30, 1, 1)
    with pytest.raises(ValueError, match="sizes must be a 3-D int32/int64"):
        select_clusters_reference(scores, sizes.float(), 20, 1, 1)
    with pytest.raises(ValueError, match="counts must be None or a"):
        select_clusters_reference(scores, sizes, 20, 1, 1, torch.zeros(3, dtype=torch.int64))


@pytest.mark.skipif(not _INTERPRET, reason="on a GPU the kernels are compiled by running them")
def test_kernels_compile_for_hopper():
    """The interpreter runs kernels as numpy: also compile them for sm_90, as a GPU would (tests/hopper_compile.py)."""
    from hopper_compile import assert_compile_for_hopper, recorded_launches

    from kvpass.kernels.cluster_select import select_clusters
    from kvpass.kernels.wave_attention import score_clusters

    scores, sizes = _inputs(1, 2, 300, seed=9)
    q, centroids = torch.randn(1, 8, 1, 64), torch.randn(1, 2, 300, 64)
    with recorded_launches() as launches:
        select_clusters(scores, sizes, 300, 5, 70, torch.zeros(2, dtype=torch.int64))
        select_clusters(scores, sizes, 300, 5, 70)
        _, _, hist = score_clusters(q, centroids, 300, scale=0.125, select_sizes=sizes)   # first level fused
    assert {launch["name"] for launch in launches} == {"_top_level_kernel", "_middle_level_kernel",
                                                       "_low_level_kernel", "_write_kernel",
                                                       "_centroid_logits_kernel", "_cluster_scores_kernel"}
    assert_compile_for_hopper(launches)
