"""Triton k-means steps (assign / update) vs their fp32 PyTorch references, and the Lloyd loop.

Runs on a GPU, or on CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
when there is no GPU). Inputs are fresh random tensors; rows past each group's count (and past N,
in the buffer x is cut from) hold NaN, so a row the kernels must skip shows up as NaN or as a
mismatch. Labels must equal the reference's except at near-ties (another centroid within 1e-4 of
the best score, relative to |x| |c|), where either is accepted; sums agree to 1e-5 (relative
Frobenius error), sizes exactly.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not torch.cuda.is_available() and not _INTERPRET:
    pytest.skip("Triton kernels need a CUDA GPU; on CPU run with TRITON_INTERPRET=1 in the environment",
                allow_module_level=True)
pytest.importorskip("triton")

from kvpass.kernels.kmeans import assign, assign_reference, kmeans, update, update_reference

DEVICE = "cpu" if _INTERPRET else "cuda"
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
NAN = float("nan")
TRITON_STEPS = {"assign": assign, "update": update}
REFERENCE_STEPS = {"assign": assign_reference, "update": update_reference}


def make_x(g, counts, N, D, dtype, transposed=False):
    """(G, N, D) x on DEVICE: random in the first counts[g] rows of group g, NaN elsewhere; cut
    from a buffer 3 rows longer (also NaN), laid out (N + 3, G, D) when transposed."""
    G = len(counts)
    buf = torch.full((N + 3, G, D) if transposed else (G, N + 3, D), NAN)
    groups = buf.transpose(0, 1) if transposed else buf
    for i, n in enumerate(counts):
        groups[i, :n] = torch.randn(n, D, generator=g)
    return groups.to(dtype)[:, :N].to(DEVICE)


def count_tensor(counts, dtype=torch.int32):
    return torch.tensor(counts, dtype=dtype, device=DEVICE)


def check_labels(labels, x, centroids, bias, count):
    """labels (from the kernel) against the reference, allowing near-ties."""
    ref = assign_reference(x, centroids, bias, count)
    assert labels.dtype == torch.int32 and labels.shape == ref.shape
    assert torch.equal(labels < 0, ref < 0) and ((labels == -1) | (labels >= 0)).all()
    valid = ref >= 0
    scores = torch.matmul(x.double().nan_to_num(), centroids.double().transpose(1, 2)) + bias.double()[:, None, :]
    tol = 1e-4 * (x.double().nan_to_num().norm(dim=-1, keepdim=True) * centroids.double().norm(dim=-1)[:, None, :]
                  ).amax(-1)
    picked = scores.gather(-1, labels.clamp_min(0).long()[..., None])[..., 0]
    near_best = picked >= scores.amax(-1) - tol
    assert (near_best | (labels == ref))[valid].all()
    assert (labels == ref)[valid].float().mean() >= 0.9   # near-ties are the exception


# (G, N, D, C, dtype, counts, transposed): every G / N / D / C / dtype value, partly valid groups
# (count 0 included), C below, at and above the centroid block, strided x.
ASSIGN_CASES = [
    (1, 1, 64, 1, F32, (1,), False),
    (3, 17, 80, 5, F16, (17, 9, 0), True),
    (3, 130, 128, 64, BF16, (130, 64, 1), False),
    (1, 130, 96, 64, F32, (130,), True),
    (3, 130, 64, 5, F16, (100, 130, 31), False),
    (1, 17, 128, 64, F32, (17,), False),
    (3, 1, 96, 1, BF16, (1, 0, 1), False),
    (3, 17, 80, 64, BF16, (3, 17, 16), False),
]


@pytest.mark.parametrize("case", ASSIGN_CASES, ids=lambda c: f"G{c[0]}-N{c[1]}-D{c[2]}-C{c[3]}-{c[4]}".replace(
    "torch.", ""))
def test_assign_matches_reference(case):
    G, N, D, C, dtype, counts, transposed = case
    g = torch.Generator().manual_seed(N * 1000 + D + C)
    x = make_x(g, counts, N, D, dtype, transposed)
    centroids = torch.randn(G, C, D, generator=g).to(DEVICE)
    bias = (2 * torch.randn(G, C, generator=g)).to(DEVICE)
    count = count_tensor(counts, torch.int64 if G == 1 else torch.int32)
    check_labels(assign(x, centroids, bias, count), x, centroids, bias, count)


def test_assign_exact_ties_go_to_the_lowest_centroid():
    """Integer data (exact fp32 dots in any order): duplicated centroids, within one block of
    centroids and across blocks, tie exactly; both sides must pick the lower index."""
    g = torch.Generator().manual_seed(7)
    G, N, D, C = 2, 40, 128, 64     # D > 64: blocks of 32 centroids
    centroids = torch.randint(-3, 4, (G, C, D), generator=g).float()
    centroids[:, 6] = centroids[:, 5]       # same block
    centroids[:, 40] = centroids[:, 3]      # next block
    centroids[:, 63] = centroids[:, 40]
    x = torch.randint(-3, 4, (G, N, D), generator=g).float()
    x[:, :10] = centroids[:, 5:6]
    x[:, 10:20] = centroids[:, 3:4]
    bias = -0.5 * centroids.square().sum(-1)     # Euclidean: a row equal to a centroid picks it
    x, centroids, bias = x.to(DEVICE), centroids.to(DEVICE), bias.to(DEVICE)
    count = count_tensor((N, N))
    labels = assign(x, centroids, bias, count)
    ref = assign_reference(x, centroids, bias, count)
    assert torch.equal(labels, ref)
    assert (labels[:, :10] == 5).all() and (labels[:, 10:20] == 3).all()


# (G, N, D, C, dtype, counts, transposed)
UPDATE_CASES = [
    (1, 1, 64, 1, F32, (1,), False),
    (3, 17, 80, 64, F16, (17, 9, 0), True),
    (3, 130, 128, 5, BF16, (130, 64, 1), False),
    (1, 130, 96, 5, F32, (100,), True),
]


@pytest.mark.parametrize("case", UPDATE_CASES, ids=lambda c: f"G{c[0]}-N{c[1]}-D{c[2]}-C{c[3]}-{c[4]}".replace(
    "torch.", ""))
def test_update_matches_reference(case):
    G, N, D, C, dtype, counts, transposed = case
    g = torch.Generator().manual_seed(N * 1000 + D + C + 1)
    x = make_x(g, counts, N, D, dtype, transposed)
    labels = torch.randint(0, C, (G, N), generator=g, dtype=torch.int32)
    valid = torch.arange(N)[None, :] < torch.tensor(counts)[:, None]
    labels[~valid] = -1
    # A few labelled rows dropped again (-1, or past the clusters): they too may be garbage.
    dropped = valid & (torch.rand(G, N, generator=g) < 0.2)
    labels[dropped] = torch.where(torch.rand(int(dropped.sum()), generator=g) < 0.5, -1, C + 2).int()
    x[dropped.to(DEVICE)] = NAN
    labels = labels.to(DEVICE)

    sums, sizes = update(x, labels, C)
    ref_sums, ref_sizes = update_reference(x, labels, C)
    assert sums.dtype == F32 and sums.shape == (G, C, D) and sizes.dtype == torch.int32 and sizes.shape == (G, C)
    assert torch.equal(sizes, ref_sizes)
    assert torch.isfinite(sums).all()
    assert ((sums - ref_sums).norm() / ref_sums.norm().clamp_min(1e-30)).item() <= 1e-5
    assert (sums[sizes == 0] == 0).all()
    again, _ = update(x, labels, C)     # deterministic: the same index for the same keys, on any device
    assert torch.equal(again, sums)


def blobs(g, G, N, D, k, counts):
    """(x (G, N, D) float16 on DEVICE, blob (G, N) int64): k Gaussian blobs in random order, their
    centres ~50 apart and the rows ~1 from them, rows past counts[g] NaN. The k rows the loop
    starts from (floor(c * count / k)) are put in k different blobs: a start with two centroids in
    one blob is a local optimum that Lloyd's iterations do not leave."""
    centres = 5 * torch.randn(G, k, D, generator=g)
    blob = torch.randint(0, k, (G, N), generator=g)
    for i, n in enumerate(counts):
        blob[i, torch.arange(k) * n // k] = torch.arange(k)
    x = centres.gather(1, blob[..., None].expand(G, N, D)) + 0.1 * torch.randn(G, N, D, generator=g)
    for i, n in enumerate(counts):
        x[i, n:] = NAN
    return x.to(F16).to(DEVICE), blob


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_loop_recovers_blobs_and_triton_equals_reference(metric):
    g = torch.Generator().manual_seed(11)
    counts = (300, 231)
    x, blob = blobs(g, 2, 300, 64, 6, counts)
    count = count_tensor(counts)
    labels, centroids, sizes = kmeans(x, count, 6, 3, metric, **TRITON_STEPS)
    ref_labels, ref_centroids, ref_sizes = kmeans(x, count, 6, 3, metric, **REFERENCE_STEPS)
    assert torch.equal(labels, ref_labels) and torch.equal(sizes, ref_sizes)
    torch.testing.assert_close(centroids, ref_centroids, rtol=1e-5, atol=1e-5)
    labels = labels.cpu()
    for i, n in enumerate(counts):
        assert (labels[i, n:] == -1).all()
        pairs = torch.unique(torch.stack([blob[i, :n], labels[i, :n].long()]), dim=1)
        assert pairs.shape[1] == 6, "each blob must map to one cluster, and no two blobs to the same one"


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_loop_returns_means_and_sizes_of_its_labels(metric):
    g = torch.Generator().manual_seed(13)
    counts, clusters = (40, 17, 3), 5
    x = make_x(g, counts, 40, 80, BF16)
    labels, centroids, sizes = kmeans(x, count_tensor(counts), clusters, 3, metric, **TRITON_STEPS)
    assert labels.dtype == torch.int32 and centroids.dtype == F32 and sizes.dtype == torch.int32
    assert labels.shape == (3, 40) and centroids.shape == (3, clusters, 80) and sizes.shape == (3, clusters)
    labels, centroids, sizes, xf = labels.cpu(), centroids.cpu(), sizes.cpu(), x.float().cpu()
    for i, n in enumerate(counts):
        assert (labels[i, n:] == -1).all() and (labels[i, :n] >= 0).all()
        assert torch.equal(sizes[i], torch.bincount(labels[i, :n].long(), minlength=clusters).int())
        for c in range(clusters):
            if sizes[i, c] > 0:
                torch.testing.assert_close(centroids[i, c], xf[i, :n][labels[i, :n] == c].mean(0),
                                           rtol=1e-5, atol=1e-5)
    # 3 rows, 5 clusters: the starts are rows 0, 0, 1, 1, 2; the duplicates tie and lose to the
    # lower index, so clusters 1 and 3 stay empty at their starting rows.
    assert sizes[2].tolist() == [1, 0, 1, 0, 1]
    assert torch.equal(centroids[2, [1, 3]], xf[2, :2])


def _x(G=2, N=5, D=16):
    return torch.zeros(G, N, D, device=DEVICE)


@pytest.mark.parametrize("call, match", [
    (lambda s: kmeans(_x(), count_tensor((5, 0)), 3, 2, "ip", **s), "count must lie in"),
    (lambda s: kmeans(_x(), count_tensor((6, 5)), 3, 2, "ip", **s), "count must lie in"),
    (lambda s: kmeans(_x(), count_tensor((5, 5, 5)), 3, 2, "ip", **s), r"shape \(G,\) = \(2,\)"),
    (lambda s: kmeans(_x(), count_tensor((5, 5)).float(), 3, 2, "ip", **s), "count must be an int32/int64"),
    (lambda s: kmeans(_x(), count_tensor((5, 5)), 3, 0, "ip", **s), "iterations"),
    (lambda s: kmeans(_x(), count_tensor((5, 5)), 0, 2, "ip", **s), "clusters"),
    (lambda s: kmeans(_x(), count_tensor((5, 5)), 3, 2, "cos", **s), "metric"),
    (lambda s: kmeans(_x()[0], count_tensor((5,)), 3, 2, "l2", **s), r"x must be a \(G, N, D\)"),
    (lambda s: s["assign"](_x(), torch.zeros(2, 3, 8, device=DEVICE), torch.zeros(2, 3, device=DEVICE),
                           count_tensor((5, 5))), r"\(G, C, D\) = \(2, C >= 1, 16\)"),
    (lambda s: s["assign"](_x(), torch.zeros(2, 3, 16, device=DEVICE), torch.zeros(2, 4, device=DEVICE),
                           count_tensor((5, 5))), r"\(G, C\) = \(2, 3\)"),
    (lambda s: s["update"](_x(), torch.zeros(2, 4, dtype=torch.int32, device=DEVICE), 3), r"\(G, N\) = \(2, 5\)"),
])
@pytest.mark.parametrize("steps", ["triton", "reference"])
def test_bad_inputs_raise_value_error(call, match, steps):
    with pytest.raises(ValueError, match=match):
        call(TRITON_STEPS if steps == "triton" else REFERENCE_STEPS)


def test_import_does_not_import_triton():
    code = ("import sys; import kvpass.kernels.kmeans as k; k.kmeans, k.assign_reference; "
            "assert 'triton' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not _INTERPRET, reason="on a GPU the kernels are compiled by running them")
def test_kernels_compile_for_hopper():
    """The interpreter runs kernels as numpy: also compile what the k-means loop launches for sm_90, as a GPU would
    (tests/hopper_compile.py)."""
    from hopper_compile import assert_what_runs_compiles_for_hopper

    assert_what_runs_compiles_for_hopper(lambda: test_loop_recovers_blobs_and_triton_equals_reference("ip"))
