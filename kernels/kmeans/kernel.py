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
* **update**: deterministic, so that the same keys always give the same index (an offloaded and an
  on-GPU index of one sequence must be identical, and runs reproducible; atomic additions land in
  no fixed order on a GPU). The rows are sorted by label (a stable torch sort) and counted; one
  program per (group, cluster) then sums its cluster's rows in blocks of ``BLOCK_R``, in order.

Speed (one H100): the fp32 FMA dots make assign the slow step, ~7.5 TFLOP/s: 64 groups of 8192
bf16 rows, 512 centroids, D = 128 took 9.6 ms, 3x torch's fp32 matmul of the reference (3.2 ms,
which materializes the (G, N, C) scores). The atomic update this module had before took 0.14 ms
(reference 1.7 ms); the sorted segment sum is not measured yet. Launch parameters:
:func:`_launch_config`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention.dense import _check_device
from .reference import check_kmeans_inputs

__all__ = ["assign", "update"]


def _launch_config(block_d: int):
    """(BLOCK_N, BLOCK_C, num_warps) of the assign kernel.

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
    X, ORDER, STARTS, COUNTS, SUMS,
    sxg, sxn, sxd, sog, son, stg, stc, scg, scc, ssg, ssc, ssd,
    D, clusters,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: the sum of the rows of cluster pid_c of group pid_g, in sorted order.

    Grid: (G, clusters). X (G, N, D) any float dtype; ORDER (G, N) int64: row indices sorted by label;
    STARTS, COUNTS (G, clusters) int64: cluster c's rows are ORDER[g, STARTS : STARTS + COUNTS]. Writes SUMS
    (G, clusters, D) fp32.
    """
    g = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    start = tl.load(STARTS + g * stg + c * stc)
    count = tl.load(COUNTS + g * scg + c * scc)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    total = tl.zeros([BLOCK_D], tl.float32)
    for r0 in range(0, count, BLOCK_R):
        r_ok = r0 + offs_r < count
        row = tl.load(ORDER + g * sog + (start + r0 + offs_r) * son, mask=r_ok, other=0)
        x = tl.load(X + g * sxg + row[:, None] * sxn + offs_d[None, :] * sxd, mask=r_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        total += tl.sum(x, 0)
    tl.store(SUMS + g * ssg + c * ssc + offs_d * ssd, total, mask=d_ok)


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
    """Per-cluster sums and sizes of the labelled rows (Triton; deterministic).

    x: (G, N, D) float16/bfloat16/float32, any strides; labels: (G, N) int32/int64, rows with a
    label outside [0, clusters) (-1: padding) are skipped and may be garbage in x; clusters: int.
    Returns new (sums (G, clusters, D) float32, counts (G, clusters) int32).
    """
    G, N, D = check_kmeans_inputs(x, labels=labels, clusters=clusters)
    _check_device("update", {"x": x, "labels": labels})
    sums = torch.empty((G, clusters, D), dtype=torch.float32, device=x.device)
    if G * N == 0:
        return sums.zero_(), torch.zeros((G, clusters), dtype=torch.int32, device=x.device)
    # Rows of skipped labels sort under the key `clusters`, after every real cluster.
    key = torch.where((labels >= 0) & (labels < clusters), labels.long(), clusters)
    order = torch.argsort(key, dim=1, stable=True)
    counts = torch.zeros((G, clusters + 1), dtype=torch.int64, device=x.device)
    counts.scatter_add_(1, key, torch.ones_like(key))
    counts = counts[:, :clusters]
    starts = torch.cumsum(counts, dim=1) - counts
    BLOCK_D = max(16, triton.next_power_of_2(D))
    _update_kernel[(G, clusters)](
        x, order, starts, counts, sums,
        *x.stride(), *order.stride(), *starts.stride(), *counts.stride(), *sums.stride(),
        D, clusters,
        BLOCK_R=16, BLOCK_D=BLOCK_D, num_warps=4,
    )
    return sums, counts.to(torch.int32)
