"""Graph search over the wave index's clusters (kvpass.methods.wave_graph).

The vectorized search is compared with its per-(row, head) loop reference, with brute-force scoring of every
cluster, and on synthetic data where queries are distributed differently from keys (RetrievalAttention's case).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from kvpass.methods.wave_graph import ClusterGraph, build_graph, group_scores, search, search_reference


def _index(B=2, H=3, group=4, D=64, C=37, Lq=48, seed=0, garbage=math.nan):
    """Random centroids (B, H, C, D) of spread norms, sizes (B, H, C) int32 with about a fifth empty (their
    centroid rows hold `garbage`), prompt queries (B, Hq, Lq, D) and a decode query (B, Hq, 1, D)."""
    g = torch.Generator().manual_seed(seed)
    centroids = torch.randn(B, H, C, D, generator=g) * (0.5 + torch.rand(B, H, C, 1, generator=g))
    sizes = torch.randint(1, 40, (B, H, C), generator=g, dtype=torch.int32)
    sizes[torch.rand(B, H, C, generator=g) < 0.2] = 0
    centroids[sizes == 0] = garbage
    queries = torch.randn(B, H * group, Lq, D, generator=g)
    q = torch.randn(B, H * group, 1, D, generator=g)
    return centroids, sizes, queries, q


def _everything(q, centroids, sizes, scale, softcap):
    """Brute force: group_scores of every cluster, empty ones at -inf (B, H, C)."""
    B, H, C, _ = centroids.shape
    ids = torch.arange(C).expand(B, H, C)
    return group_scores(q, centroids, ids.masked_fill(sizes == 0, -1), scale, softcap)


CASES = [(H, group, D, C, softcap) for H, group, D, C, softcap in
         itertools.product((1, 3), (1, 4, 7), (64, 80), (37, 200), (0.0, 30.0))]


@pytest.mark.parametrize("H,group,D,C,softcap", CASES)
def test_search_equals_reference(H, group, D, C, softcap):
    centroids, sizes, queries, q = _index(H=H, group=group, D=D, C=C, seed=C + D + group)
    scale = D**-0.5 * 4.0           # large logits, so that the soft cap bends them
    graph = build_graph(centroids, sizes, queries, scale, softcap, degree=6, query_top=5, entries=4)
    for want, beam, rounds in ((10, 3, 4), (C + 3, 5, 2), (4, 1, 0)):
        got = search(graph, q, centroids, sizes, scale, softcap, want, beam=beam, rounds=rounds)
        ref = search_reference(graph, q, centroids, sizes, scale, softcap, want, beam=beam, rounds=rounds)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        assert got[0].dtype == got[1].dtype == torch.int64
        assert got[0].shape == (2, H, want) and got[1].shape == (2, H)
    assert (got[1] <= 4).all()      # rounds=0: only the entries are scored


def test_ties_go_to_the_lower_id():
    """With every score equal (a zero query, group 1: each score is exactly 0), the order is by cluster id."""
    centroids, sizes, queries, _ = _index(H=2, group=1, C=60)
    graph = build_graph(centroids, sizes, queries, 0.125, 0.0, degree=5, entries=3)
    q = torch.zeros(2, 2, 1, 64)
    ids, scored = search(graph, q, centroids, sizes, 0.125, 0.0, 12, beam=2, rounds=3)
    ref = search_reference(graph, q, centroids, sizes, 0.125, 0.0, 12, beam=2, rounds=3)
    assert torch.equal(ids, ref[0]) and torch.equal(scored, ref[1])
    real = ids[ids >= 0].view(-1)
    assert (ids[..., 1:][ids[..., 1:] >= 0] > ids[..., :-1][ids[..., 1:] >= 0]).all() and real.numel() > 0


def test_group_scores_is_the_logsumexp_over_the_group_of_the_capped_logits():
    centroids, sizes, _, q = _index(H=3, group=4, D=80, C=37)
    ids = torch.randint(-1, 37, (2, 3, 9), generator=torch.Generator().manual_seed(3))
    ids[sizes.gather(-1, ids.clamp_min(0)) == 0] = -1        # garbage rows only behind -1
    got = group_scores(q, centroids, ids, 0.3, 20.0)
    rows = centroids.gather(2, ids.clamp_min(0)[..., None].expand(-1, -1, -1, 80))
    logits = torch.einsum("bhgd,bhnd->bhgn", q.view(2, 3, 4, 80).double(), rows.double()) * 0.3
    want = torch.logsumexp(20.0 * torch.tanh(logits / 20.0), dim=2).masked_fill(ids < 0, -math.inf)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("C,group,softcap", [(37, 1, 0.0), (37, 7, 30.0), (120, 4, 0.0)])
def test_a_search_that_visits_everything_is_exact(C, group, softcap):
    centroids, sizes, queries, q = _index(group=group, C=C, seed=7)
    scale = 64**-0.5
    graph = build_graph(centroids, sizes, queries, scale, softcap, degree=4, query_top=4, entries=2)
    ids, scored = search(graph, q, centroids, sizes, scale, softcap, 10, beam=C, rounds=C)
    assert torch.equal(scored, (sizes > 0).sum(-1))          # the graph reaches every non-empty cluster
    every = _everything(q, centroids, sizes, scale, softcap)
    exact = torch.sort(every, dim=-1, descending=True, stable=True).indices[..., :10]   # ties: the lower id
    assert torch.equal(ids, exact)
    assert (sizes.gather(-1, ids) > 0).all()


def test_build_graph_invariants():
    centroids, sizes, queries, _ = _index(B=2, H=3, group=4, C=200, Lq=96, seed=11)
    sizes[0, 1, :190] = 0                                       # a head with fewer clusters than the degree
    graph = build_graph(centroids, sizes, queries, 0.125, 30.0, degree=16, query_top=8, entries=8)
    again = build_graph(centroids, sizes, queries, 0.125, 30.0, degree=16, query_top=8, entries=8)
    assert isinstance(graph, ClusterGraph)
    assert torch.equal(graph.neighbors, again.neighbors) and torch.equal(graph.entries, again.entries)
    nb, en = graph.neighbors, graph.entries
    assert nb.dtype == en.dtype == torch.int64 and nb.shape == (2, 3, 200, 16) and en.shape == (2, 3, 8)
    assert graph.nbytes() == nb.numel() * 8 + en.numel() * 8
    live = sizes > 0
    assert (nb >= -1).all() and (nb < 200).all() and (en >= -1).all() and (en < 200).all()
    assert live.gather(-1, nb.clamp_min(0).flatten(2)).view_as(nb)[nb >= 0].all()
    assert live.gather(-1, en.clamp_min(0))[en >= 0].all()
    assert (nb[~live] == -1).all()                                            # no out-edges from empty clusters
    assert ((nb >= 0).sum(-1)[live] >= 1).all()                               # and some from every other one
    assert ((nb >= 0).sum(-1)[0, 1][live[0, 1]] == live[0, 1].sum() - 1).all()  # 10 live: linked to the 9 others
    assert not (nb == torch.arange(200)[:, None]).any()                       # no self-loops
    s = nb.sort(-1).values
    assert not ((s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)).any()        # unique per row
    assert ((en >= 0).sum(-1) == live.sum(-1).clamp_max(8)).all()
    e = en.sort(-1).values
    assert not ((e[..., 1:] == e[..., :-1]) & (e[..., 1:] >= 0)).any()
    # Padding sits after the real neighbours.
    assert not ((nb[..., 1:] >= 0) & (nb[..., :-1] < 0)).any()


def test_garbage_in_empty_clusters_does_not_leak():
    """NaN (or any garbage) in the centroid rows of empty clusters changes neither the graph nor the search."""
    results = []
    for garbage in (math.nan, 0.0, 1e30):
        centroids, sizes, queries, q = _index(H=3, group=4, C=200, seed=5, garbage=garbage)
        graph = build_graph(centroids, sizes, queries, 0.125, 0.0, degree=8, entries=4)
        ids, scored = search(graph, q, centroids, sizes, 0.125, 0.0, 16, beam=4, rounds=4)
        assert (ids >= 0).all() and (sizes.gather(-1, ids) > 0).all()
        results.append((graph.neighbors, graph.entries, ids, scored))
    for other in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(results[0], other))


def _out_of_distribution(B=1, H=2, group=2, D=64, C=1024, tokens=16384, topics=32, seed=0):
    """Keys around C directions (themselves around a few topics); queries a fixed linear map per query head of the
    direction of a random cluster, plus noise: queries and keys live in different places, as in RetrievalAttention.
    The index assigns each key to its known centre (24 clusters left empty, NaN centroids). Returns centroids,
    sizes, keys (B, H, tokens, D) and a function drawing L queries (B, Hq, L, D)."""
    g = torch.Generator().manual_seed(seed)
    topic = torch.randn(B, H, topics, D, generator=g)
    centre = topic.gather(2, torch.randint(0, topics, (B, H, C, 1), generator=g).expand(B, H, C, D))
    centre = centre + 0.7 * torch.randn(B, H, C, D, generator=g)
    centre = centre / centre.norm(dim=-1, keepdim=True) * (1 + 0.3 * torch.rand(B, H, C, 1, generator=g))
    label = torch.randint(0, C - 24, (B, H, tokens), generator=g)
    keys = centre.gather(2, label[..., None].expand(B, H, tokens, D))
    keys = keys + 0.3 * torch.randn(B, H, tokens, D, generator=g) / math.sqrt(D)
    sizes = torch.zeros(B, H, C, dtype=torch.int32).scatter_add_(2, label, torch.ones_like(label, dtype=torch.int32))
    sums = torch.zeros(B, H, C, D).scatter_add_(2, label[..., None].expand(B, H, tokens, D), keys)
    centroids = (sums / sizes.clamp_min(1)[..., None]).masked_fill((sizes == 0)[..., None], math.nan)
    maps = torch.randn(H, group, D, D, generator=g) / math.sqrt(D)

    def queries(L, gen):
        z = torch.randint(0, C, (B, H, L), generator=gen)
        base = centre.gather(2, z[..., None].expand(B, H, L, D))
        x = torch.einsum("bhld,hgde->bhgle", base, maps)
        return 3.0 * (x + 0.3 * torch.randn(B, H, group, L, D, generator=gen) / math.sqrt(D)).reshape(B, -1, L, D)

    return centroids, sizes, keys, queries


def _recall(graph, centroids, sizes, queries, rounds, steps=24, want=8):
    gen = torch.Generator().manual_seed(123)
    found, fraction = [], []
    for _ in range(steps):
        q = queries(1, gen)
        ids, scored = search(graph, q, centroids, sizes, 0.125, 0.0, want, beam=2, rounds=rounds)
        true = _everything(q, centroids, sizes, 0.125, 0.0).topk(want, dim=-1).indices
        found.append((ids[..., :, None] == true[..., None, :]).any(-1).float().mean())
        fraction.append(scored.max() / centroids.shape[2])
    return torch.stack(found).mean().item(), torch.stack(fraction).max().item()


def test_query_graph_finds_the_top_clusters_of_out_of_distribution_queries():
    centroids, sizes, keys, queries = _out_of_distribution()
    prompt = queries(4096, torch.Generator().manual_seed(1))
    graph = build_graph(centroids, sizes, prompt, 0.125, 0.0, degree=24, query_top=8, entries=8)
    recall, scored = _recall(graph, centroids, sizes, queries, rounds=8)
    assert recall >= 0.9 and scored <= 0.25, (recall, scored)
    # The entries alone find few of them...
    assert _recall(graph, centroids, sizes, queries, rounds=0)[0] <= 0.2
    # ...and the same graph built from keys instead of queries navigates badly: keys are not where queries are.
    key_graph = build_graph(centroids, sizes, keys.repeat_interleave(2, dim=1)[:, :, ::4], 0.125, 0.0, degree=24)
    assert _recall(key_graph, centroids, sizes, queries, rounds=8)[0] <= 0.6
