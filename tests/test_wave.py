"""Wave index (kvpass.WaveIndex): index build, tripartite decode, offload, padding, compiled models.

The store is driven directly with random K/V (decode steps append one token and attend with one query), and
compared with the dense store or with plain computations written here. On CPU the kernels are the fp32
references (the Triton kernels have their own tests, and one test here runs the compiled model on both).
"""
from __future__ import annotations

import math

import pytest
import torch
from families import FAMILIES

import kvpass
from kvpass import WaveIndex
from kvpass.methods.base import AttentionSpec
from kvpass.methods.dense import DenseStore
from kvpass.methods.wave import WaveStore, budgets
from kvpass.methods.wave_index import cluster_run, segments

SPEC = AttentionSpec(scale=0.125)
SMALL = dict(sinks=2, recent=8, segment=64, cluster_size=4, iterations=4, update_every=16, min_context=40)


def _tokens(B=2, H=2, L=50, D=16, Dv=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, L, D, generator=g).to(dtype)
    v = torch.randn(B, H, L, Dv or D, generator=g).to(dtype)
    return k, v


def _query(B=2, Hq=4, D=16, seed=0, dtype=torch.float32, L=1):
    return torch.randn(B, Hq, L, D, generator=torch.Generator().manual_seed(1000 + seed)).to(dtype)


def _decode(stores, k, v, prompt, mask=None, Hq=4, rows=None):
    """Prefill `prompt` tokens into every store, then decode the rest one token at a time: outputs per store.
    Queries are drawn for a batch of 3 and `rows` of them used, so a row gets the same queries in any batch."""
    outs = [[] for _ in stores]
    rows = slice(0, k.shape[0]) if rows is None else rows
    q0 = _query(3, Hq, k.shape[-1], seed=-1, L=prompt)[rows].to(k.device)
    for i, store in enumerate(stores):
        store.append(k[:, :, :prompt], v[:, :, :prompt])
        prompt_mask = None if mask is None else mask[:, :, :prompt, :prompt]
        outs[i].append(store.attend(q0, prompt_mask, True, SPEC))
    for t in range(prompt, k.shape[2]):
        q = _query(3, Hq, k.shape[-1], seed=t)[rows].to(k.device)
        step_mask = None if mask is None else mask[:, :, t : t + 1, : t + 1]
        for i, store in enumerate(stores):
            store.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
            outs[i].append(store.attend(q, step_mask, True, SPEC))
    return outs


def _padding_mask(B, L, pads):
    """(B, 1, L, L) causal mask with pads[b] leading padding slots per row."""
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    seen = torch.arange(L)[None, :] >= torch.tensor(pads)[:, None]
    return (causal[None] & seen[:, None, :])[:, None]


# -- config ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, words", [
    (dict(retrieval=1.5), ["retrieval=1.5"]),
    (dict(retrieval=0.6, estimation=0.6), ["exceeds 1"]),
    (dict(cluster_size=0), ["cluster_size=0"]),
    (dict(min_context=10), ["min_context=10", "sinks + recent"]),
    (dict(scoring="nearest"), ["scoring='nearest'"]),
    (dict(search="hnsw"), ["search='hnsw'"]),
    (dict(search="graph", scoring="pre-rope"), ["search='graph'", "pre-rope"]),
    (dict(buffer=0.0), ["buffer=0.0"]),
    (dict(page=12), ["page=12"]),
    (dict(offload="yes"), ["offload='yes'"]),
])
def test_config_errors_name_the_value(bad, words):
    with pytest.raises(ValueError) as error:
        WaveIndex(**bad)
    assert all(word in str(error.value) for word in words), str(error.value)


def test_config_round_trip_and_budgets():
    config = kvpass.Config(attention=WaveIndex(retrieval=0.05, offload=True))
    assert kvpass.Config.from_dict(config.to_dict()) == config
    assert budgets(WaveIndex(), 1000) == (18, 232)
    assert budgets(WaveIndex(retrieval=1.0, estimation=0.0), 7) == (7, 0)
    assert segments(20000, WaveIndex()) == (3, 6667, 417)


# -- index build --------------------------------------------------------------------------------------------------
def _plain_spherical_kmeans(x, clusters, iterations):
    """The textbook loop on one group (N, D), written independently of kvpass.kernels.kmeans."""
    centroids = x[(torch.arange(clusters) * x.shape[0] // clusters)].clone()
    for _ in range(iterations):
        normed = centroids / centroids.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        labels = (x @ normed.T).argmax(-1)
        for c in range(clusters):
            if (labels == c).any():
                centroids[c] = x[labels == c].mean(0)
    return labels


def test_cluster_run_is_segmented_spherical_kmeans_of_centred_keys():
    method = WaveIndex(**{**SMALL, "segment": 40})
    k, v = _tokens(B=1, H=2, L=100, D=8, seed=3)
    run = cluster_run(k, v, method)
    count, length, per = segments(100, method)
    assert (count, length, per) == (3, 34, 8)
    centred = k - k.mean(2, keepdim=True)
    for h in range(2):
        labels = torch.cat([_plain_spherical_kmeans(centred[0, h, s * length : (s + 1) * length], per,
                                                    method.iterations) + s * per for s in range(count)])
        ordered = labels[run.order[0, h]]
        assert torch.equal(ordered, ordered.sort().values)            # cluster-contiguous order
        sizes = torch.bincount(labels, minlength=count * per)
        assert torch.equal(run.sizes[0, h].long(), sizes)
        assert torch.equal(run.starts[0, h].long(), sizes.cumsum(0) - sizes)
        for c in torch.nonzero(sizes).flatten().tolist():
            torch.testing.assert_close(run.centroids[0, h, c], k[0, h, labels == c].mean(0))
            torch.testing.assert_close(run.value_means[0, h, c], v[0, h, labels == c].mean(0))


def test_whitening_measures_the_expected_score_error():
    """||(k - c) W||^2 = sum over the queries of (q . (k - c))^2 (up to the 1e-3 ridge), and whitened clusters
    are Euclidean k-means of the keys times W."""
    from kvpass.methods.wave_index import whitening

    g = torch.Generator().manual_seed(11)
    queries = torch.randn(1, 1, 300, 8, generator=g) * torch.linspace(0.1, 3.0, 8)   # anisotropic queries
    W = whitening(queries.transpose(-1, -2) @ queries)
    diff = torch.randn(1, 1, 20, 8, generator=g)
    expected = ((diff @ queries.transpose(-1, -2)) ** 2).sum(-1)
    torch.testing.assert_close(((diff @ W) ** 2).sum(-1), expected, rtol=1e-2, atol=0)
    k, v = _tokens(1, 1, 64, D=8, seed=12)
    run = cluster_run(k, v, WaveIndex(**SMALL), whiten=W)
    labels = torch.empty(64, dtype=torch.long)
    for c in range(run.sizes.shape[-1]):
        labels[run.order[0, 0, run.starts[0, 0, c] : run.starts[0, 0, c] + run.sizes[0, 0, c]]] = c
    points = (k[0, 0] @ W[0, 0])
    means = torch.stack([points[labels == c].mean(0) for c in range(run.sizes.shape[-1]) if (labels == c).any()])
    nonempty = [c for c in range(run.sizes.shape[-1]) if (labels == c).any()]
    nearest = torch.cdist(points, means).argmin(-1)
    assert torch.equal(torch.tensor(nonempty)[nearest], labels)      # a fixed point of Lloyd's iteration


# -- decode ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group, scoring", [(1, "centroid"), (3, "centroid"), (3, "whitened")])
def test_full_retrieval_budget_is_exact_attention_with_padding(group, scoring):
    """retrieval = 100 %: every cluster is attended exactly, so a padded batch decodes like the dense cache,
    across the initial build and two later runs."""
    B, H, L, prompt = 3, 2, 90, 50
    k, v = _tokens(B, H, L, seed=1)
    mask = _padding_mask(B, L, (0, 5, 11)).expand(B, 1, L, L)
    wave = WaveStore(WaveIndex(**SMALL, retrieval=1.0, estimation=0.0, scoring=scoring), layer=0)
    dense = DenseStore(kvpass.Dense(), layer=0)
    outs = _decode([wave, dense], k, v, prompt, mask, Hq=H * group)
    assert wave.index is not None and wave.index.clusters > 0 and wave._prefix == 11 + SMALL["sinks"]
    assert (wave._moment is not None) == (scoring == "whitened")
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    stats = wave.stats()
    assert stats["keys_exact"] == pytest.approx(1.0) and stats["keys_skipped"] == pytest.approx(0.0)


def test_graph_search_on_a_small_index_is_the_scan_and_counts_centroids():
    """search="graph" over an index small enough for the search to reach every cluster chooses what the scan
    chooses, so the outputs agree at a partial budget (padded batch; one query head per KV head, where the scan's
    softmax mass and the search's logsumexp rank alike); the report counts the centroids each search scored (the
    scan: all of them)."""
    B, H, L, prompt = 3, 2, 90, 50
    k, v = _tokens(B, H, L, seed=3)
    mask = _padding_mask(B, L, (0, 5, 11)).expand(B, 1, L, L)
    scan, graph = (WaveStore(WaveIndex(**SMALL, retrieval=0.2, estimation=0.3, search=search), layer=0)
                   for search in ("scan", "graph"))
    outs = _decode([scan, graph], k, v, prompt, mask, Hq=H)
    assert graph._queries.shape[2] == prompt - 11 and graph._graph is not None
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert scan.stats()["centroids_scored"] == 1.0
    assert 0 < graph.stats()["centroids_scored"] <= 1.0
    assert scan.stats()["keys_exact"] == pytest.approx(graph.stats()["keys_exact"])


def test_tripartite_matches_a_direct_computation():
    """Default-like budgets: the output equals softmax-merging the three parts computed here in plain torch."""
    method = WaveIndex(**SMALL, retrieval=0.2, estimation=0.3)
    k, v = _tokens(1, 2, 70, seed=2)
    store = WaveStore(method, layer=0)
    _decode([store], k, v, 69)
    q = _query(1, 4, seed=7)
    store.append(k[:, :, -1:], v[:, :, -1:])
    out = store.attend(q, None, True, SPEC)
    index, C = store.index, store.index.clusters
    keys, values = store.materialize()
    expected = torch.empty_like(out)
    r, e = budgets(method, C)
    for h in range(4):
        j = h // 2
        logits = q[0, h, 0] @ index.centroids[0, j, :C].T * SPEC.scale
        scores = sum(torch.softmax(q[0, g, 0] @ index.centroids[0, j, :C].T * SPEC.scale, -1) for g in (2 * j, 2 * j + 1))
        scores = scores.masked_fill(index.sizes[0, j, :C] == 0, -1)
        top = scores.topk(r + e).indices
        slot_of = index.slots[0, j]
        terms = []                                           # (log weight, value) of every pseudo or real token
        exact_slots = list(range(store._prefix)) + list(range(store._prefix + index.tokens, store.length))
        for c in top[:r].tolist():
            start, size = index.starts[0, j, c].item(), index.sizes[0, j, c].item()
            exact_slots += slot_of[start : start + size].tolist()
        for s in exact_slots:
            terms.append((q[0, h, 0] @ keys[0, j, s] * SPEC.scale, values[0, j, s]))
        for c in top[r:].tolist():
            size = index.sizes[0, j, c].item()
            if size:
                terms.append((logits[c] + math.log(size), index.value_means[0, j, c]))
        w = torch.softmax(torch.stack([t[0] for t in terms]), 0)
        expected[0, h, 0] = (w[:, None] * torch.stack([t[1] for t in terms])).sum(0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    stats = store.stats()
    assert 0 < stats["keys_exact"] < 1 and stats["keys_estimated"] > 0 and stats["keys_skipped"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a GPU")
def test_captured_step_with_side_stream_equals_the_eager_step():
    """Under CUDA-graph capture the steady zone and the estimation run on a side stream: replaying the graph gives
    the eager step's output bit for bit, replay after replay (the side stream's partials are never overwritten
    before the merge reads them)."""
    method = WaveIndex(**SMALL, retrieval=0.2, estimation=0.3)
    k, v = _tokens(2, 2, 90, D=64, seed=4, dtype=torch.float16)
    store = WaveStore(method, layer=0)
    _decode([store], k.cuda(), v.cuda(), 89, Hq=8)
    q = _query(2, 8, D=64, seed=9, dtype=torch.float16).cuda()
    eager = store.tripartite(q, SPEC)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        store.tripartite(q, SPEC)                      # warm-up off the default stream, as capture requires
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = store.tripartite(q, SPEC)
    for _ in range(3):
        captured.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)


def test_rows_never_mix():
    """Each row of a batch decodes as it does alone (no padding: the same index range)."""
    method = WaveIndex(**SMALL)
    k, v = _tokens(3, 2, 80, seed=4)
    together = _decode([WaveStore(method, layer=0)], k, v, 45)[0]
    for b in range(3):
        alone = _decode([WaveStore(method, layer=0)], k[b : b + 1], v[b : b + 1], 45, rows=slice(b, b + 1))[0]
        for x, y in zip(together, alone):
            torch.testing.assert_close(x[b : b + 1], y, rtol=1e-5, atol=1e-5)


def test_offload_equals_device_path_bit_for_bit():
    """The host copy + a small page cache (evicting every step) gives exactly the outputs of the device path."""
    k, v = _tokens(2, 2, 120, seed=5)
    device = WaveStore(WaveIndex(**SMALL, retrieval=0.3), layer=0)
    offload = WaveStore(WaveIndex(**SMALL, retrieval=0.3, offload=True, buffer=0.05), layer=0)
    outs = _decode([device, offload], k, v, 50)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    stats = offload.stats()
    assert stats["pages_missed"] > 0 and stats["pages_hit"] > 0 and 0 < stats["hit_rate"] < 1
    assert "clustered_kv_host" in offload.nbytes() and "wave_buffer" in offload.nbytes()


def test_wave_buffer_is_an_lru_cache_of_the_needed_pages():
    """WaveBuffer against a plain model of it: each step's needed pages are those its clusters' tokens lie on,
    they are resident afterwards (the page table names slots holding their rows), hits and misses are counted,
    and the pages evicted are the least recently used (equally old: the lowest slot)."""
    import types

    import numpy as np

    from kvpass.methods.wave_buffer import WaveBuffer

    H, page, C, slots = 2, 4, 40, 14
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 7, (1, H, C)).astype(np.int32)
    starts = np.concatenate([np.zeros((1, H, 1), np.int64), np.cumsum(sizes, -1)[..., :-1]], -1).astype(np.int32)
    pages = int(sizes.sum(-1).max()) // page + 1
    keys = torch.arange(H * pages * page * 3, dtype=torch.float32).view(1, H, pages * page, 3)
    index = types.SimpleNamespace(page=page, keys=keys, values=-keys, host_starts=starts, host_sizes=sizes)
    buffer = WaveBuffer(index, slots=slots, device=torch.device("cpu"))
    owner, last_used, hits, misses = [-1] * slots, [0] * slots, 0, 0
    for step in range(1, 40):
        chosen = np.stack([rng.choice(C, 3, replace=False) for _ in range(H)])[None]
        needed = sorted({h * pages + p for h in range(H) for c in chosen[0, h] if sizes[0, h, c] > 0
                         for p in range(starts[0, h, c] // page, (starts[0, h, c] + sizes[0, h, c] - 1) // page + 1)})
        assert buffer.pages_of(chosen).tolist() == needed
        buffer.fetch(chosen, None)
        resident = [key for key in needed if key in owner]
        hits, misses = hits + len(resident), misses + len(needed) - len(resident)
        for key in resident:
            last_used[owner.index(key)] = step
        free = sorted((last_used[s], s) for s in range(slots) if last_used[s] < step)
        for key, (_, s) in zip([k for k in needed if k not in resident], free):
            owner[s], last_used[s] = key, step
        assert buffer._owner.tolist() == owner and (buffer.hits, buffer.misses) == (hits, misses)
        flat_k = keys.view(-1, page, 3)
        for key in needed:
            assert torch.equal(buffer.pool_k[buffer.page_table.view(-1)[key]], flat_k[key])
    assert 0 < hits < hits + misses


def test_buffer_too_small_is_refused_without_touching_the_cache():
    k, v = _tokens(1, 2, 60, seed=6)
    store = WaveStore(WaveIndex(**SMALL, retrieval=1.0, estimation=0.0, offload=True), layer=0)
    _decode([store], k, v, 59)
    buffer = store._buffer
    buffer.slots = 1                    # a budget that cannot hold one step's pages
    tables = (buffer._slot_of.copy(), buffer._owner.copy(), buffer.hits, buffer.misses)
    store.append(k[:, :, -1:], v[:, :, -1:])
    with pytest.raises(ValueError, match=r"raise WaveIndex\(buffer=\.\.\.\)"):
        store.attend(_query(1, 4), None, True, SPEC)
    assert (buffer._slot_of == tables[0]).all() and (buffer._owner == tables[1]).all()
    assert (buffer.hits, buffer.misses) == tables[2:]


def test_failed_host_allocation_names_the_knob(monkeypatch):
    real = torch.empty

    def refuse(*shape, **kwargs):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        if kwargs.get("device") == torch.device("cpu") and len(shape) == 4 and shape[2] > 32:
            raise RuntimeError("out of pinned memory")
        return real(*shape, **kwargs)

    store = WaveStore(WaveIndex(**SMALL, offload=True), layer=0)
    k, v = _tokens(1, 2, 60, seed=6)
    store.append(k, v)
    monkeypatch.setattr(torch, "empty", refuse)
    with pytest.raises(RuntimeError, match=r"WaveIndex\(offload=False\)"):
        store.attend(_query(1, 4, L=60), None, True, SPEC)


def test_sliding_window_layer_stays_exact():
    k, v = _tokens(1, 2, 70, seed=8)
    windowed = WaveStore(WaveIndex(**SMALL), layer=1)
    windowed.append(k, v)
    windowed.attend(_query(1, 4, L=70), None, True, AttentionSpec(scale=0.125, window=16))
    assert windowed.index is None and "sliding window" in windowed.stats()["exact_only"]


# -- compiled models -------------------------------------------------------------------------------------------------
def test_compiled_generate_full_budget_equals_dense_and_reports_layers():
    model = FAMILIES["llama"].build()
    ids = torch.randint(3, 120, (2, 60), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    outputs = {}
    for name, method in (("dense", kvpass.Dense()),
                         ("wave", WaveIndex(**SMALL, retrieval=1.0, estimation=0.0))):
        kvpass.compile(model, kvpass.Config(attention=method), inner="eager")
        try:
            outputs[name] = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
            report = kvpass.report(model)
        finally:
            kvpass.detach(model)
            torch._dynamo.reset()
    assert torch.equal(outputs["dense"], outputs["wave"])
    layers = report["layer_stats"]
    assert [row["layer"] for row in layers] == [0, 1]
    assert all(row["decode_steps"] > 0 and row["clusters"] > 0 and row["keys_exact"] == pytest.approx(1.0)
               for row in layers)


def test_decode_perplexity_reports_what_the_index_read():
    """eval's decode-mode perplexity records the keys each window's decode steps read (mean over layers and
    windows): with 25 % retrieval and 25 % estimation some keys are estimated, some skipped; dense reports none."""
    from kvpass.eval.ppl import perplexity

    model = FAMILIES["llama"].build()
    batches = torch.randint(3, 120, (2, 90), generator=torch.Generator().manual_seed(1))
    got = {}
    for name, method in (("dense", kvpass.Dense()), ("wave", WaveIndex(**SMALL, retrieval=0.25, estimation=0.25))):
        kvpass.compile(model, kvpass.Config(attention=method), inner="eager")
        try:
            got[name] = perplexity(model, batches, decode_tail=20, progress=False)
        finally:
            kvpass.detach(model)
            torch._dynamo.reset()
    assert "decode_reads" not in got["dense"]
    reads = got["wave"]["decode_reads"]
    assert set(reads) == {"keys_exact", "keys_estimated", "centroids_scored"}
    assert 0 < reads["keys_exact"] < 1 and 0 < reads["keys_estimated"] < 1 - reads["keys_exact"]
    assert reads["centroids_scored"] == 1.0          # the scan scores every centroid


def test_unfused_cache_path_refuses():
    model = FAMILIES["llama"].build()
    kvpass.attach(model, kvpass.Config(attention=WaveIndex(**SMALL)))
    try:
        with pytest.raises(NotImplementedError, match="attention scores"):
            model.generate(torch.randint(3, 100, (1, 12)), max_new_tokens=2, do_sample=False)
    finally:
        kvpass.detach(model)


def test_triton_kernels_match_reference_semantics(monkeypatch):
    """The store on the Triton kernels (a GPU, or the interpreter on CPU) = the store on the fp32 references;
    on a GPU the offload path (pinned host copy, side-stream copies) also equals the device path bit for bit
    (on the CPU it has neither, and test_offload_equals_device_path_bit_for_bit covers its buffer)."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    k, v = _tokens(2, 2, 68, seed=9)
    k, v = k.to(device), v.to(device)
    mask = _padding_mask(2, 68, (0, 6)).to(device)
    outs = {}
    for kernels in ("reference", "triton"):
        monkeypatch.setenv("KVPASS_KERNELS", kernels)
        stores = [WaveStore(WaveIndex(**SMALL, retrieval=0.2), layer=0)]
        if device == "cuda":
            stores.append(WaveStore(WaveIndex(**SMALL, retrieval=0.2, offload=True, buffer=0.1), layer=0))
        outs[kernels] = _decode(stores, k, v, 45, mask, Hq=6)
    for a, b in zip(outs["reference"][0], outs["triton"][0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    if device == "cuda":
        for a, b in zip(*outs["triton"]):
            assert torch.equal(a, b)
