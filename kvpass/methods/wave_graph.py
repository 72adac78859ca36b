"""Attention-aware graph search over the wave index's clusters (RetrievalAttention, arXiv 2409.10516).

A decode step of the wave index scores all C centroids of a (row, KV head). Queries are distributed differently
from keys, so closeness in key space is a poor guide to what a query attends to; RetrievalAttention builds its
search graph from the prompt's own queries. Here the nodes are the clusters: `build_graph` links the clusters one
prompt query ranks high together (RoarGraph's projection of the query->cluster bipartite graph, completed by
nearest centroids), and `search` runs a best-first search of a fixed number of rounds from a few entry clusters,
scoring only the centroids it reaches. Everything ranks by `group_scores`; equal scores go to the lower cluster id
everywhere. Empty clusters (size 0) are never linked, entered or returned; their centroid rows may hold garbage.
"""
from __future__ import annotations

import dataclasses
import math

import torch

INF = math.inf


def _capped(logits: torch.Tensor, softcap: float) -> torch.Tensor:
    return softcap * torch.tanh(logits / softcap) if softcap > 0 else logits


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (..., k) of the k largest of values (..., N) fp32, best first, equal values by lower index (NaN
    counts as -inf). torch.topk leaves the order of ties open, so rank one int64 key: the value's order-preserving
    int32 bits in the high half, the reversed index in the low half (every key is distinct)."""
    values = values.float() + 0.0                                   # -0.0 + 0.0 = +0.0: one zero
    bits = values.masked_fill(values.isnan(), -INF).view(torch.int32).long()
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)           # negative floats: larger bits = smaller value
    index = torch.arange(values.shape[-1], device=values.device)
    return (bits * 2**32 + (2**32 - 1 - index)).topk(k, dim=-1).indices


def group_scores(q: torch.Tensor, centroids: torch.Tensor, ids: torch.Tensor, scale: float,
                 softcap: float) -> torch.Tensor:
    """Scores (B, H, N) fp32 of the clusters ids (B, H, N) int64 (-1 = none: -inf) for the decode query q
    (B, Hq, 1, D), Hq = H * group, against centroids (B, H, C, D): per query head the logit scale * q.c
    (soft-capped when softcap > 0), combined over the GQA group by logsumexp, so a cluster that any head of
    the group attends to strongly ranks high (the softmax mass the group puts on it, up to a constant)."""
    B, H, N = ids.shape
    D = centroids.shape[-1]
    rows = centroids.gather(2, ids.clamp_min(0)[..., None].expand(B, H, N, D)).float()
    qg = q.float().reshape(B, H, -1, 1, D)
    # Products summed over D, not a matmul (whose summation order changes with the shape): a cluster scores the
    # same whichever clusters share the call, so `search` and `search_reference` rank alike.
    logits = _capped(scale * (qg * rows[:, :, None]).sum(-1), softcap)         # (B, H, group, N)
    return torch.logsumexp(logits, dim=2).masked_fill(ids < 0, -INF)         # also hides garbage behind -1


@dataclasses.dataclass
class ClusterGraph:
    """Search graph over the clusters of one layer's index: neighbors (B, H, C, R) int64, the out-edges of each
    cluster best first, padded with -1 (an empty cluster has none); entries (B, H, E) int64, where a search
    starts, padded with -1."""

    neighbors: torch.Tensor
    entries: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.neighbors, self.entries))


def build_graph(centroids: torch.Tensor, sizes: torch.Tensor, queries: torch.Tensor, scale: float, softcap: float,
                degree: int = 16, query_top: int = 8, entries: int = 8) -> ClusterGraph:
    """The search graph (neighbors (B, H, C, degree), entries (B, H, entries)) of an index with centroids
    (B, H, C, D), sizes (B, H, C) int32, from queries (B, Hq, Lq, D), a sample of the prompt's (all real).

    A query is one position of a GQA group, ranked by the group's score as `group_scores` ranks a decode step.
    Each query's `query_top` best non-empty clusters are linked best <-> each other one (clusters a query ranks
    together are one hop apart; reverse edges lead to the cluster it ranks highest). Per cluster the `degree`
    edges made by the most queries are kept (ties: the higher score a query gave the target, then the lower id);
    spare slots get the nearest clusters by centroid inner product, then `_connect` makes every cluster reachable.
    Entries: the clusters most often in a top list (then the largest, then the lower id)."""
    B, H, C, D = centroids.shape
    group, Lq, dev = queries.shape[1] // H, queries.shape[2], centroids.device
    live = sizes > 0
    cent = centroids.float().masked_fill(~live[..., None], 0.0)                # garbage rows out of every product
    bh = torch.arange(B * H, device=dev).view(B, H, 1, 1)
    # Query top lists, a chunk of positions at a time: the logits of a chunk take about 64 MB.
    K = min(query_top, C)
    qs, centT = queries.float().reshape(B, H, group, Lq, D), cent.transpose(-1, -2)[:, :, None]
    step = max(1, 2**24 // (B * H * group * C))
    tops, vals = [], []
    for s in range(0, Lq, step):
        score = torch.logsumexp(_capped(scale * qs[:, :, :, s : s + step] @ centT, softcap), dim=2)
        score = score.masked_fill(~live[:, :, None], -INF)                    # (B, H, l, C)
        tops.append(_top(score, K))
        vals.append(score.gather(-1, tops[-1]))
    top, val = torch.cat(tops, dim=2), torch.cat(vals, dim=2)                # (B, H, Lq, K)
    ok = val > -INF
    # Directed edges best -> other and other -> best, counted through sorted int64 keys (no dense C x C counts).
    best = top[..., :1].expand_as(top[..., 1:])
    src, dst = torch.cat([best, top[..., 1:]], -1), torch.cat([top[..., 1:], best], -1)
    weight = torch.cat([val[..., 1:], val[..., :1].expand_as(val[..., 1:])], -1)
    use = torch.cat([ok[..., 1:], ok[..., 1:]], -1)
    keys = ((bh * C + src) * C + dst)[use]
    keys, inverse, count = torch.unique(keys, return_inverse=True, return_counts=True)
    strength = torch.full(keys.shape, -INF, device=dev).scatter_reduce(0, inverse, weight[use], "amax")
    row, dst = keys // C, keys % C
    # Order by (row, count desc, strength desc, dst) by stable sorts, last key first (dst ascends already).
    order = torch.arange(keys.numel(), device=dev)
    for key, descending in ((strength, True), (count, True), (row, False)):
        order = order[torch.sort(key[order], descending=descending, stable=True).indices]
    row, dst = row[order], dst[order]
    rank = torch.arange(row.numel(), device=dev) - torch.searchsorted(row, row)
    keep = rank < degree
    neighbors = torch.full((B * H * C, degree), -1, dtype=torch.int64, device=dev)
    neighbors[row[keep], rank[keep]] = dst[keep]
    neighbors = neighbors.view(B, H, C, degree)
    # Spare slots: the nearest clusters, a chunk of rows at a time ((C, C) per head is 256 MB at C = 8192).
    filled = (neighbors >= 0).sum(-1, keepdim=True)
    step, k = max(1, 2**24 // (B * H * C)), min(degree, C)
    for s in range(0, C, step):
        e = min(C, s + step)
        near = cent[:, :, s:e] @ cent.transpose(-1, -2)                      # (B, H, r, C)
        taken = torch.zeros(B, H, e - s, C + 1, dtype=torch.bool, device=dev)
        taken.scatter_(-1, neighbors[:, :, s:e].masked_fill(neighbors[:, :, s:e] < 0, C), True)
        taken[:, :, torch.arange(e - s), torch.arange(s, e)] = True         # no self-loops
        near = near.masked_fill(taken[..., :C] | ~live[:, :, None], -INF)
        cand = _top(near, k)
        slot = filled[:, :, s:e] + torch.arange(k, device=dev)
        put = (near.gather(-1, cand) > -INF) & (slot < degree) & live[:, :, s:e, None]
        chunk = torch.cat([neighbors[:, :, s:e], neighbors.new_full((B, H, e - s, 1), -1)], -1)
        chunk.scatter_(-1, slot.masked_fill(~put, degree), cand.masked_fill(~put, -1))  # column `degree`: a sink
        neighbors[:, :, s:e] = chunk[..., :degree]
    # Entries: most often in a top list, then the largest cluster, then the lower id (the stable size order).
    hits = torch.bincount((bh * C + top)[ok], minlength=B * H * C).view(B, H, C).float().masked_fill(~live, -INF)
    by_size = torch.sort(sizes, dim=-1, descending=True, stable=True).indices
    pick = by_size.gather(-1, _top(hits.gather(-1, by_size), min(entries, C)))
    pick = pick.masked_fill(~live.gather(-1, pick), -1)
    pick = torch.cat([pick, pick.new_full((B, H, entries - pick.shape[-1]), -1)], -1)
    _connect(neighbors, pick, live)
    return ClusterGraph(neighbors=neighbors, entries=pick)


def _connect(neighbors: torch.Tensor, entries: torch.Tensor, live: torch.Tensor) -> None:
    """Make every live (B, H, C) cluster reachable from the entries (B, H, E), in place in neighbors (B, H, C, R).
    Out-edges do not do it: by inner product everyone's nearest clusters are a few large-norm ones, and a cluster
    no query ranked high may have no in-edge. The unreached ones are chained in id order u1 -> .. -> um, the first
    entry's weakest edge a -> t becomes a -> u1, and um -> t is added. A chain edge takes its row's first free
    slot, else the last: an unreached row's edges are on no path from the entries, so none of them is needed."""
    B, H, C, R = neighbors.shape
    reached = torch.zeros(B, H, C + 1, dtype=torch.bool, device=live.device)     # column C: a sink for -1
    reached.scatter_(-1, entries.masked_fill(entries < 0, C), True)
    while True:                                                           # breadth-first, to a fixed point
        out = neighbors.masked_fill(~reached[..., :C, None] | (neighbors < 0), C).flatten(2)
        grown = reached.scatter(-1, out, True)
        if torch.equal(grown, reached):
            break
        reached = grown
    lost = live & ~reached[..., :C]
    if not bool(lost.any()):
        return
    ids = torch.arange(C, device=live.device).expand(B, H, C)
    mark = torch.cat([ids.masked_fill(~lost, C)[..., 1:], ids.new_full((B, H, 1), C)], -1)
    after = mark.flip(-1).cummin(-1).values.flip(-1)                      # the next unreached id after each (C: none)
    slot = (neighbors >= 0).sum(-1).clamp_max(R - 1)                    # (B, H, C)
    a = entries[..., :1].clamp_min(0)                                   # a head with unreached clusters has entries
    t = neighbors.gather(2, a[..., None].expand(B, H, 1, R)).squeeze(2).gather(-1, slot.gather(-1, a))  # (B, H, 1)
    target = torch.where(lost, torch.where(after < C, after, t), -1)
    first = ids.masked_fill(~lost, C).min(-1, keepdim=True).values
    target.scatter_(-1, a, torch.where(first < C, first, -1))
    write = (target >= 0) & ~(neighbors == target[..., None]).any(-1)      # an edge already there is kept
    rows = torch.cat([neighbors, neighbors.new_full((B, H, C, 1), -1)], -1)
    rows.scatter_(-1, slot.masked_fill(~write, R)[..., None], target.masked_fill(~write, -1)[..., None])
    neighbors.copy_(rows[..., :R])


def search(graph: ClusterGraph, q: torch.Tensor, centroids: torch.Tensor, sizes: torch.Tensor, scale: float,
           softcap: float, want: int, beam: int = 16, rounds: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-first search of the decode query q (B, Hq, 1, D) over the graph of the index (centroids (B, H, C, D),
    sizes (B, H, C)): (ids (B, H, want) int64, best first, -1 past the visited clusters; scored (B, H) int64,
    the centroids scored per (row, head)). Starts from the entries; each of `rounds` rounds expands the `beam`
    best visited, unexpanded clusters and scores their neighbours not visited yet (this torch version computes
    the whole (beam * R) gather and keeps the new ones; `scored` counts what a kernel skipping the rest reads)."""
    B, H, C = sizes.shape
    dev = sizes.device
    # Column C is a sink: "none" (-1, or a beam slot with nothing left to expand) reads and writes there.
    table = torch.full((B, H, C + 1), -INF, device=dev)                      # scores of the visited clusters
    expanded = torch.zeros(B, H, C + 1, dtype=torch.bool, device=dev)
    live = torch.cat([sizes > 0, torch.zeros(B, H, 1, dtype=torch.bool, device=dev)], -1)
    scored = torch.zeros(B, H, dtype=torch.int64, device=dev)

    def visit(ids: torch.Tensor) -> None:
        ids = torch.sort(ids.masked_fill(ids < 0, C), dim=-1).values
        first = torch.ones_like(ids, dtype=torch.bool)
        first[..., 1:] = ids[..., 1:] != ids[..., :-1]                    # one visit per cluster per round
        new = first & live.gather(-1, ids) & (table.gather(-1, ids) == -INF)
        scores = group_scores(q, centroids, ids.masked_fill(~new, -1), scale, softcap)
        table.scatter_(-1, ids.masked_fill(~new, C), scores)                 # the sink only ever gets -inf
        scored.add_(new.sum(-1))

    visit(graph.entries)
    R = graph.neighbors.shape[-1]
    for _ in range(rounds):
        frontier = table.masked_fill(expanded, -INF)
        pick = _top(frontier, min(beam, C + 1))
        ok = frontier.gather(-1, pick) > -INF
        pick = pick.masked_fill(~ok, C)
        expanded.scatter_(-1, pick, True)
        nbrs = graph.neighbors.gather(2, pick.clamp_max(C - 1)[..., None].expand(B, H, pick.shape[-1], R))
        visit(nbrs.masked_fill(~ok[..., None], -1).flatten(2))
    k = min(want, C)
    ids = _top(table[..., :C], k)
    ids = ids.masked_fill(table.gather(-1, ids) == -INF, -1)
    return torch.cat([ids, ids.new_full((B, H, want - k), -1)], -1), scored


def search_reference(graph: ClusterGraph, q: torch.Tensor, centroids: torch.Tensor, sizes: torch.Tensor, scale: float,
                     softcap: float, want: int, beam: int = 16, rounds: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """`search` as a plain loop per (row, head) over Python sets (tests only); same inputs, outputs and ties."""
    B, H, C = sizes.shape
    group = q.shape[1] // H
    ids = torch.full((B, H, want), -1, dtype=torch.int64)
    scored = torch.zeros(B, H, dtype=torch.int64)
    for b in range(B):
        for h in range(H):
            every = group_scores(q[b : b + 1, h * group : (h + 1) * group].cpu(), centroids[b : b + 1, h : h + 1].cpu(),
                                 torch.arange(C)[None, None], scale, softcap)[0, 0].tolist()
            live, nbrs = (sizes[b, h] > 0).tolist(), graph.neighbors[b, h].tolist()
            seen, done = {}, set()
            order = lambda cs: sorted(cs, key=lambda c: (-seen[c], c))  # noqa: E731
            for c in graph.entries[b, h].tolist():
                if c >= 0 and live[c] and c not in seen:
                    seen[c] = every[c]
            for _ in range(rounds):
                best = order(c for c in seen if c not in done)[:beam]
                done.update(best)
                for c in [n for c in best for n in nbrs[c]]:
                    if c >= 0 and live[c] and c not in seen:
                        seen[c] = every[c]
            top = order(seen)[:want]
            ids[b, h, : len(top)] = torch.tensor(top, dtype=torch.int64)
            scored[b, h] = len(seen)
    return ids, scored
