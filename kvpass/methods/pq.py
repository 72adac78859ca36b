"""Product quantization of key/value vectors: codebooks learned by weighted k-means, nearest-centroid encoding.

A head vector of length D is cut into M = D / sub sub-vectors; sub-space m of KV head h has its own codebook
of C centroids, so a vector is stored as M uint8 codes and bits/value = log2(C) / sub. Codebooks have the
layout the coded-attention kernel reads: (Hkv, M, C, sub).
"""
from __future__ import annotations

import torch

# Distances are computed in chunks of this many (row x sub-space x centroid) entries, so that encoding a
# 32K-token prefill does not allocate a (tokens x M x C) fp32 tensor of several GB at once.
_CHUNK_ENTRIES = 1 << 25


def split(x: torch.Tensor, sub: int) -> torch.Tensor:
    """(..., D) -> (..., D // sub, sub); D must be a multiple of sub."""
    if x.shape[-1] % sub:
        raise ValueError(f"head dim {x.shape[-1]} is not a multiple of the sub-vector length {sub}; choose a rate "
                         f"whose sub-vector length divides it")
    return x.unflatten(-1, (x.shape[-1] // sub, sub))


def _nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """x: (G, N, sub), codebook: (G, C, sub) -> (G, N) int64 index of the nearest centroid (squared L2)."""
    # argmin |x - c|^2 = argmax 2 x.c - |c|^2 (|x|^2 is the same for every centroid)
    score = torch.baddbmm((-codebook.square().sum(-1))[:, None, :], x, codebook.transpose(1, 2), alpha=2.0)
    return score.argmax(-1)


def encode(x: torch.Tensor, codebook: torch.Tensor, whitening: torch.Tensor | None = None) -> torch.Tensor:
    """x: (B, H, L, D) -> codes (B, H, L, M) uint8; codebook: (H, M, C, sub). Computed in fp32.
    whitening: None, or (H, M, sub, sub) W: the nearest centroid under (x - c)^T W W^T (x - c) (x @ W against
    c @ W), the metric the codebook was learned in (see :func:`whiten`)."""
    H, M, C, sub = codebook.shape
    B, _, L, _ = x.shape
    groups = split(x.float(), sub).permute(1, 3, 0, 2, 4).reshape(H * M, B * L, sub)   # (H*M, B*L, sub)
    book = codebook.float().reshape(H * M, C, sub)
    if whitening is not None:
        w = whitening.float().reshape(H * M, sub, sub)
        groups, book = groups @ w, book @ w
    step = max(1, _CHUNK_ENTRIES // (H * M * C))
    codes = torch.cat([_nearest(groups[:, s : s + step], book) for s in range(0, B * L, step)], dim=1)
    return codes.to(torch.uint8).reshape(H, M, B, L).permute(2, 0, 3, 1).contiguous()


def whiten(moment: torch.Tensor, sub: int) -> torch.Tensor:
    """moment: (H, D, D) second moment E[q q^T] of the queries that read the keys -> (H, D // sub, sub, sub) W per
    sub-space with W W^T = its diagonal block (ridged by 1e-3 of its mean diagonal, so it is invertible): the
    squared error |(x - c) @ W|^2 is then the expected squared score error of that sub-space, e^T E[q q^T] e."""
    H, D, _ = moment.shape
    M = D // sub
    blocks = moment.double().unflatten(1, (M, sub)).unflatten(3, (M, sub)).diagonal(dim1=1, dim2=3)  # (H, sub, sub, M)
    blocks = blocks.permute(0, 3, 1, 2)                                                            # (H, M, sub, sub)
    ridge = 1e-3 * blocks.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    blocks = blocks + ridge[..., None, None] * torch.eye(sub, dtype=blocks.dtype)
    return torch.linalg.cholesky(blocks).float()


def decode(codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """codes: (B, H, L, M) uint8, codebook: (H, M, C, sub) -> (B, H, L, M * sub) in the codebook's dtype."""
    H, M, C, sub = codebook.shape
    flat = codebook.reshape(H * M * C, sub)
    index = (torch.arange(H, device=codes.device)[:, None] * (M * C) + torch.arange(M, device=codes.device) * C)
    return flat[codes.long() + index[None, :, None, :]].flatten(-2)


def weighted_kmeans(points: torch.Tensor, weights: torch.Tensor, clusters: int, iterations: int = 20,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched weighted k-means (Lloyd) minimizing sum_n w_n |x_n - c(x_n)|^2 per group.

    points: (G, N, sub) fp32; weights: (G, N) >= 0 (a token's error-propagation factor: a point that moves
    attention more pulls its centroid harder). Returns centroids (G, clusters, sub) fp32. Initial centroids
    are drawn from the points with probability proportional to weight; a cluster that empties is re-seeded
    at the point with the largest weighted error, so every centroid stays in use.
    """
    G, N, sub = points.shape
    if N < clusters:
        raise ValueError(f"{N} calibration vectors cannot fit {clusters} centroids; calibrate on more tokens")
    w = weights.float().clamp_min(0) + 1e-12
    # Seeds drawn on the CPU (the generator's device): the same seeds, hence the same artefact, on every device.
    seeds = torch.multinomial(w.cpu(), clusters, replacement=False, generator=generator).to(points.device)  # (G, C)
    centroids = torch.gather(points, 1, seeds[..., None].expand(G, clusters, sub)).clone()
    for _ in range(iterations):
        assign = _nearest(points, centroids)                                                       # (G, N)
        mass = torch.zeros(G, clusters, device=points.device).scatter_add_(1, assign, w)
        sums = torch.zeros_like(centroids).scatter_add_(1, assign[..., None].expand(G, N, sub), points * w[..., None])
        empty = mass <= 1e-12
        centroids = torch.where(empty[..., None], centroids, sums / mass.clamp_min(1e-12)[..., None])
        if empty.any():
            error = w * (points - torch.gather(centroids, 1, assign[..., None].expand(G, N, sub))).square().sum(-1)
            for g, c in empty.nonzero().tolist():     # rare: a handful per run
                worst = int(error[g].argmax())
                centroids[g, c] = points[g, worst]
                error[g, worst] = 0
    return centroids


def sqnr_db(x: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|x|^2 / |x - approx|^2)."""
    x, approx = x.double(), approx.double()
    return float(10 * torch.log10(x.square().sum() / (x - approx).square().sum().clamp_min(1e-300)))
