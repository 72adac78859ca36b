"""Lloyd's k-means over segments of keys, built from an assign and an update step.

The steps are passed in, so the same loop runs the Triton kernels (``kernel.assign`` /
``kernel.update``) or their fp32 references (``reference.assign_reference`` /
``reference.update_reference``); see :mod:`kvpass.kernels.kmeans.reference` for their contract.
"""
from __future__ import annotations

import torch

from .reference import check_kmeans_inputs

__all__ = ["kmeans"]

METRICS = ("ip", "l2")


def kmeans(x, count, clusters, iterations, metric, *, assign, update):
    """k-means of the first count[g] rows of every group g, each group on its own.

    x: (G, N, D) float16/bfloat16/float32, any strides; rows n >= count[g] are never read into a
       result and may be garbage (NaN).
    count: (G,) int32/int64, the valid rows of each group, 1 <= count[g] <= N.
    clusters: python int >= 1; a group with fewer valid rows than clusters leaves some empty.
    iterations: python int >= 1, the number of assignments (a fixed count, no convergence test).
    metric: "ip", spherical k-means on the inner product (RetroInfer's choice): rows are assigned
       to the L2-normalised centroid with the largest dot product; "l2", Euclidean: to the nearest
       centroid (largest x . c - |c|^2 / 2).
    assign, update: the step functions, with the signatures of ``assign_reference`` and
       ``update_reference``.

    Centroid c of group g starts as row floor(c * count[g] / clusters), an even stride over the
    valid rows. Every iteration assigns, then moves each cluster to the mean of its rows; an empty
    cluster keeps its previous centroid.

    Returns (labels (G, N) int32, -1 for rows n >= count[g]: the last assignment;
    centroids (G, clusters, D) float32: the means of the rows of those labels (not normalised;
    an empty cluster's is its previous centroid); sizes (G, clusters) int32: the rows per label).
    """
    G, N, D = check_kmeans_inputs(x, count=count, clusters=clusters)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a python int >= 1, got {iterations!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if count.device != x.device:
        raise ValueError(f"count must be on x's device {x.device}, got {count.device}")
    # One synchronization for the whole batch: the steps themselves never check count's values.
    if ((count < 1) | (count > N)).any():
        raise ValueError(f"count must lie in [1, N] = [1, {N}] for every group of x {tuple(x.shape)}, "
                         f"got values from {int(count.min())} to {int(count.max())}")

    # c < clusters, so floor(c * count / clusters) <= count - 1: always a valid row.
    first = torch.arange(clusters, device=x.device)[None, :] * count.long()[:, None] // clusters   # (G, C)
    centroids = x.gather(1, first[..., None].expand(G, clusters, D)).float()
    for _ in range(iterations):
        if metric == "ip":
            scored = torch.nn.functional.normalize(centroids, dim=-1)
            bias = torch.zeros(G, clusters, dtype=torch.float32, device=x.device)
        else:
            scored = centroids
            bias = -0.5 * centroids.square().sum(-1)
        labels = assign(x, scored, bias, count)
        sums, sizes = update(x, labels, clusters)
        filled = sizes[..., None] > 0
        centroids = torch.where(filled, sums / sizes.clamp_min(1)[..., None], centroids)
    return labels, centroids, sizes
