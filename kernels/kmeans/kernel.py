"""Triton kernels for the two steps of segmented k-means: :func:`assign` and :func:`update`.

Semantics (groups, valid rows, tie rule, skipped labels) are those of
:mod:`kvpass.kernels.kmeans.reference`, the ground truth in the tests.

Design
------
* **assign**: one program per block of ``BLOCK_N`` rows of one group. It loads its x tile once
  (rows past ``count`` as zeros; the head dim padded to a power of two with masked loads, so 80
  and 96 work) and loops over blocks of ``BLOCK_C`` centroids, keeping each row's best score and
  label. The scores are fp32 ``input_precision="ieee"`` dots of the upcast x (no TF32, no 16-bit
  centroids): the labels must be those of the fp32 reference, as a near-tie flipped by rounding
  would move a key to another cluster. Ties go to the lowest index: the smallest index of the
  block maximum within a block, and a later block must beat the running best strictly.
* **update**: one program per block of ``BLOCK_N`` rows; each labelled row is atomically added
  (fp32) into its cluster's sum, and 1 into its size. The order of the additions is not fixed on
  a GPU, so sums may differ from run to run in the last bits; sizes are exact.

Speed (one H100): the fp32 FMA dots make assign the slow step, ~7.5 TFLOP/s: 64 groups of 8192
bf16 rows, 512 centroids, D = 128 took 9.6 ms, 3x torch's fp32 matmul of the reference (3.2 ms,
which materializes the (G, N, C) scores); update took 0.14 ms (reference 1.7 ms). Launch
parameters: :func:`_launch_config`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention.dense import _check_device
from .reference import check_kmeans_inputs

__all__ = ["assign", "update"]


def _launch_config(block_d: int):
    """(BLOCK_N, BLOCK_C, num_warps) shared by both kernels (update ignores BLOCK_C).

    From one sweep of assign on an H100 (Triton 3.6; bf16 x, 512 centroids, 8192 rows; BLOCK_N
    32-256, BLOCK_C 16-128, 2-8 warps): the fp32 FMA dots bound it and the blocks barely matter
    at D = 96 / 128 (9.2-9.8 ms for 64 groups) as long as the (BLOCK_N, BLOCK_C) scores and the
    centroid tile fit in registers; 64 x 64 tiles there were 8x slower (spills, presumably). At D = 64, 64 x 64
    tiles halve the time of 64 x 32 (0.66 against 1.23 ms for 256 groups of 2048 rows, 128
    centroids). Not tuned beyond that (other GPUs, the update kernel). tl.dot needs >= 16 of each.
    """
    if block_d <= 64:
        return 64, 64, 4
    return 64, 32, 8


@triton.jit
def _assign_kernel(
    X, CENTROIDS, BIAS, COUNT, LABELS,
    sxg, sxn, sxd,
    scg, scc, scd,
    sbg, sbc,
    scount,
    slg, sln,
    N, C, D,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: labels of rows [pid_n * BLOCK_N, +BLOCK_N) of group pid_g.

    Grid: (G, cdiv(N, BLOCK_N)). X (G, N, D) any float dtype; CENTROIDS (G, C, D) fp32; BIAS
    (G, C) fp32; COUNT (G,) int; writes LABELS (G, N) int32.
    """
    g = tl.program_id(0).to(tl.int64)   # int64: group offsets into a large key store overflow int32
    pid_n = tl.program_id(1)
    n_valid = tl.load(COUNT + g * scount)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = (offs_n < N) & (offs_n < n_valid)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    # Rows past count are loaded as 0: their garbage (maybe NaN) never enters a dot.
    x = tl.load(X + g * sxg + offs_n.to(tl.int64)[:, None] * sxn + offs_d[None, :] * sxd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)

    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    label = tl.zeros([BLOCK_N], tl.int32)
    # A tile with no valid row skips the centroids: its labels are all -1 anyway.
    c_stop = tl.where(pid_n * BLOCK_N < n_valid, C, 0)
    for c0 in range(0, c_stop, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        cent = tl.load(CENTROIDS + g * scg + offs_c[:, None] * scc + offs_d[None, :] * scd,
                       mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        bias = tl.load(BIAS + g * sbg + offs_c * sbc, mask=c_ok, other=0.0)
        s = tl.dot(x, tl.trans(cent), input_precision="ieee") + bias[None, :]
        s = tl.where(c_ok[None, :], s, float("-inf"))
        block_best = tl.max(s, 1)
        block_label = tl.min(tl.where(s == block_best[:, None], offs_c[None, :], C), 1)
        better = block_best > best      # strict: on a tie the earlier (lower) centroid stays
        best = tl.where(better, block_best, best)
        label = tl.where(better, block_label, label)

    tl.store(LABELS + g * slg + offs_n * sln, tl.where(row_ok, label, -1), mask=offs_n < N)


@triton.jit
def _update_kernel(
    X, LABELS, SUMS, COUNTS,
    sxg, sxn, sxd,
    slg, sln,
    ssg, ssc, ssd,
    scg, scc,
    N, D, clusters,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: adds rows [pid_n * BLOCK_N, +BLOCK_N) of group pid_g into their clusters.

    Grid: (G, cdiv(N, BLOCK_N)). X (G, N, D) any float dtype; LABELS (G, N) int; accumulates into
    SUMS (G, clusters, D) fp32 and COUNTS (G, clusters) int32, which must start at zero.
    """
    g = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    lab = tl.load(LABELS + g * slg + offs_n * sln, mask=offs_n < N, other=-1)
    # Out-of-range labels are skipped, not written out of bounds; -1 marks a padding row.
    ok = (lab >= 0) & (lab < clusters)
    offs_d = tl.arange(0, BLOCK_D)
    tile_ok = ok[:, None] & (offs_d < D)[None, :]
    x = tl.load(X + g * sxg + offs_n.to(tl.int64)[:, None] * sxn + offs_d[None, :] * sxd,
                mask=tile_ok, other=0.0).to(tl.float32)
    # relaxed: the additions only have to land, in any order.
    tl.atomic_add(SUMS + g * ssg + lab[:, None] * ssc + offs_d[None, :] * ssd, x, mask=tile_ok, sem="relaxed")
    tl.atomic_add(COUNTS + g * scg + lab * scc, tl.full([BLOCK_N], 1, tl.int32), mask=ok, sem="relaxed")


def assign(x, centroids, bias, count):
    """Label of every valid row: its best-scoring centroid (Triton).

    x: (G, N, D) float16/bfloat16/float32, any strides, rows n >= count[g] may be garbage;
    centroids: (G, C, D) float32 (no NaN); bias: (G, C) float32; count: (G,) int32/int64.
    Returns a new (G, N) int32 tensor: argmax_c of x[g, n] . centroids[g, c] + bias[g, c] in fp32
    (lowest c among equal maxima), -1 for rows n >= count[g].
    """
    G, N, D = check_kmeans_inputs(x, centroids=centroids, bias=bias, count=count)
    _check_device("assign", {"x": x, "centroids": centroids, "bias": bias, "count": count})
    labels = torch.empty((G, N), dtype=torch.int32, device=x.device)
    if labels.numel() == 0:
        return labels
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_N, BLOCK_C, num_warps = _launch_config(BLOCK_D)
    _assign_kernel[(G, triton.cdiv(N, BLOCK_N))](
        x, centroids, bias, count, labels,
        *x.stride(), *centroids.stride(), *bias.stride(), *count.stride(), *labels.stride(),
        N, centroids.shape[1], D,
        BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, BLOCK_D=BLOCK_D, num_warps=num_warps,
    )
    return labels


def update(x, labels, clusters):
    """Per-cluster sums and sizes of the labelled rows (Triton).

    x: (G, N, D) float16/bfloat16/float32, any strides; labels: (G, N) int32/int64, rows with a
    label outside [0, clusters) (-1: padding) are skipped and may be garbage in x; clusters: int.
    Returns new (sums (G, clusters, D) float32, counts (G, clusters) int32); the fp32 additions
    come in no fixed order (see the module doc).
    """
    G, N, D = check_kmeans_inputs(x, labels=labels, clusters=clusters)
    _check_device("update", {"x": x, "labels": labels})
    sums = torch.zeros((G, clusters, D), dtype=torch.float32, device=x.device)
    counts = torch.zeros((G, clusters), dtype=torch.int32, device=x.device)
    if G * N == 0:
        return sums, counts
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_N, _, num_warps = _launch_config(BLOCK_D)
    _update_kernel[(G, triton.cdiv(N, BLOCK_N))](
        x, labels, sums, counts,
        *x.stride(), *labels.stride(), *sums.stride(), *counts.stride(),
        N, D, clusters,
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=num_warps,
    )
    return sums, counts
