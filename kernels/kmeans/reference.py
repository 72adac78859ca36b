"""Plain PyTorch references for the two steps of segmented k-means, and the shared input checks.

RetroInfer's wave index clusters the keys of every segment (a run of tokens of one kv head)
separately, so k-means here runs on ``G`` independent groups at once: group ``g`` holds ``N`` rows
of ``D`` features, of which the first ``count[g]`` are valid (segments of unequal length padded to
one ``N``). The two Lloyd steps are

* **assign**: ``labels[g, n] = argmax_c (x[g, n] . centroids[g, c] + bias[g, c])``, computed in
  fp32 (x upcast), ties to the lowest ``c``; ``-1`` for the rows ``n >= count[g]``. A bias of 0
  gives inner-product (spherical) assignment, ``-|c|^2 / 2`` Euclidean assignment.
* **update**: per group and label, the fp32 sum of the rows with that label and their number;
  labels outside ``[0, clusters)`` (``-1``: a padding row) are skipped.

Rows that are skipped (past ``count``, or labelled ``-1``) may hold garbage, even NaN: it reaches
no output. These are the ground truth the Triton kernels (``kernel.py``) are tested against.

The values of ``count`` and ``labels`` are not checked (that would synchronize with the GPU): a
count outside ``[0, N]`` acts as if clamped to it.
"""
from __future__ import annotations

import torch

__all__ = ["assign_reference", "check_kmeans_inputs", "update_reference"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _describe(t):
    return (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__


def check_kmeans_inputs(x, *, centroids=None, bias=None, count=None, labels=None, clusters=None):
    """Validate the inputs of a k-means step (each keyword checked only when given); returns (G, N, D).

    x: (G, N, D) float16/bfloat16/float32; centroids: (G, C, D) float32 with C >= 1; bias: (G, C)
    float32 (needs centroids); count: (G,) int32/int64; labels: (G, N) int32/int64; clusters: a
    python int >= 1. Raises ``ValueError`` naming the offending shapes when they disagree.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be a (G, N, D) float16/bfloat16/float32 tensor, got {_describe(x)}")
    G, N, D = x.shape
    if centroids is not None:
        if (not isinstance(centroids, torch.Tensor) or centroids.dtype != torch.float32 or centroids.dim() != 3
                or (centroids.shape[0], centroids.shape[2]) != (G, D) or centroids.shape[1] < 1):
            raise ValueError(f"centroids must be a float32 tensor of shape (G, C, D) = ({G}, C >= 1, {D}) "
                             f"for x of shape {tuple(x.shape)}, got {_describe(centroids)}")
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dtype != torch.float32
                                 or tuple(bias.shape) != tuple(centroids.shape[:2])):
            raise ValueError(f"bias must be a float32 tensor of shape (G, C) = {tuple(centroids.shape[:2])} "
                             f"for centroids of shape {tuple(centroids.shape)}, got {_describe(bias)}")
    if count is not None and (not isinstance(count, torch.Tensor) or count.dtype not in _INDEX_DTYPES
                              or tuple(count.shape) != (G,)):
        raise ValueError(f"count must be an int32/int64 tensor of shape (G,) = ({G},) for x of shape "
                         f"{tuple(x.shape)}, got {_describe(count)}")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.dtype not in _INDEX_DTYPES
                               or tuple(labels.shape) != (G, N)):
        raise ValueError(f"labels must be an int32/int64 tensor of shape (G, N) = {(G, N)} for x of shape "
                         f"{tuple(x.shape)}, got {_describe(labels)}")
    if clusters is not None and (isinstance(clusters, bool) or not isinstance(clusters, int) or clusters < 1):
        raise ValueError(f"clusters must be a python int >= 1, got {clusters!r}")
    return G, N, D


def assign_reference(x, centroids, bias, count):
    """Label of every valid row: its best-scoring centroid (see the module doc).

    x: (G, N, D) float16/bfloat16/float32, any strides, rows n >= count[g] may be garbage;
    centroids: (G, C, D) float32 (no NaN); bias: (G, C) float32; count: (G,) int32/int64.
    Returns a new (G, N) int32 tensor: argmax_c of x[g, n] . centroids[g, c] + bias[g, c] in fp32
    (lowest c among equal maxima), -1 for rows n >= count[g].
    """
    G, N, _ = check_kmeans_inputs(x, centroids=centroids, bias=bias, count=count)
    valid = torch.arange(N, device=x.device)[None, :] < count[:, None]          # (G, N)
    # Garbage rows only spoil their own scores, which the -1 below overwrites.
    scores = torch.matmul(x.float(), centroids.transpose(1, 2)) + bias[:, None, :]    # (G, N, C)
    labels = scores.argmax(dim=-1)       # torch returns the first maximal index: ties to the lowest c
    return torch.where(valid, labels, -1).to(torch.int32)


def update_reference(x, labels, clusters):
    """Per-cluster sums and sizes of the labelled rows (see the module doc).

    x: (G, N, D) float16/bfloat16/float32, any strides; labels: (G, N) int32/int64, rows with a
    label outside [0, clusters) (-1: padding) are skipped and may be garbage in x; clusters: int.
    Returns new (sums (G, clusters, D) float32, counts (G, clusters) int32).
    """
    G, N, D = check_kmeans_inputs(x, labels=labels, clusters=clusters)
    labelled = (labels >= 0) & (labels < clusters)                             # (G, N)
    # One flat bin per (group, cluster), filled by the labelled rows only.
    bins = (torch.arange(G, device=x.device)[:, None] * clusters + labels.long())[labelled]
    sums = torch.zeros(G * clusters, D, dtype=torch.float32, device=x.device)
    sums.index_add_(0, bins, x.float()[labelled])
    counts = torch.bincount(bins, minlength=G * clusters).to(torch.int32)
    return sums.view(G, clusters, D), counts.view(G, clusters)
