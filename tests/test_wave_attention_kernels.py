"""RetroInfer tripartite decode attention: Triton kernels vs their fp32 PyTorch references, and the
composition of the four pieces into exact attention.

Runs on a GPU, or on CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
when there is no GPU). Errors are relative Frobenius errors ||out - ref|| / ||ref|| (<= 1e-4 for
fp32 queries, 1e-2 fp16, 2e-2 bf16); lse is compared in absolute terms and its -inf entries (splits
or rows that see nothing, whose output must be exactly 0) must match exactly.

Memory the kernels must not read is poisoned: centroids, logits and value means past the used
clusters, value means of empty clusters, key / value rows outside the selected clusters, pool slots
no page table entry references and the padding columns of every key / value tensor are NaN; page
table entries of unread pages, starts of empty clusters and selected entries past count are -1,
2**30 or the id of a NaN slot / cluster. A leak shows up as NaN or as a mismatch.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not torch.cuda.is_available() and not _INTERPRET:
    pytest.skip("Triton kernels need a CUDA GPU; on CPU run with TRITON_INTERPRET=1 in the environment",
                allow_module_level=True)
pytest.importorskip("triton")

from kvpass.kernels.anchor_scores.reference import attention_scores
from kvpass.kernels.attention import attention_over_store_reference
from kvpass.kernels.wave_attention.reference import CLUSTER_SPLIT_TOKENS
from kvpass.kernels.wave_attention import (
    choose_num_splits,
    cluster_attention,
    cluster_attention_reference,
    estimate_clusters,
    estimate_clusters_reference,
    merge_partials,
    merge_partials_reference,
    score_clusters,
    score_clusters_reference,
    split_bounds,
)

DEVICE = "cpu" if _INTERPRET else "cuda"
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
TOLERANCE = {F32: 1e-4, F16: 1e-2, BF16: 2e-2}
LSE_TOLERANCE = {F32: 1e-4, F16: 1e-3, BF16: 1e-3}   # scores use the exact 16-bit q, k: fp32 sums
NAN = float("nan")
GARBAGE_IDS = (-1, 2**30)   # besides the id of a poisoned slot / cluster


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def check_partials(out, lse, ref, ref_lse, dtype):
    """Kernel partials (out (S, B, Hq, Dv), lse (S, B, Hq)) vs the reference's."""
    assert out.shape == ref.shape and lse.shape == ref_lse.shape
    assert out.dtype == lse.dtype == F32
    assert torch.isfinite(out).all()
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    assert (out[empty] == 0).all()
    assert rel_err(out, ref) <= TOLERANCE[dtype]
    if (~empty).any():
        assert (lse[~empty] - ref_lse[~empty]).abs().max().item() <= LSE_TOLERANCE[dtype]


def decode_query(g, B, Hq, D, dtype):
    """(B, Hq, 1, D) query as a non-contiguous view of a (B, 1, Hq, D) projection output."""
    return torch.randn(B, 1, Hq, D, generator=g).transpose(1, 2).to(dtype).to(DEVICE)


def poison_tail(list_ids, count, poisoned_id):
    """list_ids (B, Hkv, L) int tensor: entries past count (B, Hkv) become garbage ids (in place)."""
    B, Hkv, L = list_ids.shape
    garbage = (*GARBAGE_IDS, poisoned_id)
    for b in range(B):
        for h in range(Hkv):
            for j in range(int(count[b, h]), L):
                list_ids[b, h, j] = garbage[(b + h + j) % len(garbage)]
    return list_ids


# --- score_clusters ------------------------------------------------------------------------------

@pytest.mark.parametrize("B, Hkv, group, D, clusters, softcap, dtype", [
    (1, 2, 1, 64, 1, 0.0, F32),
    (3, 2, 4, 80, 37, 2.0, F16),
    (1, 1, 7, 128, 300, 0.0, BF16),
    (3, 2, 7, 96, 300, 2.0, F32),
    (1, 2, 20, 64, 37, 0.0, F32),        # a group of more than 16 heads: two row blocks
])
def test_score_clusters_matches_reference(B, Hkv, group, D, clusters, softcap, dtype):
    g = torch.Generator().manual_seed(clusters * 7 + group)
    q = decode_query(g, B, Hkv * group, D, dtype)
    centroids = torch.full((B, Hkv, clusters + 5, D + 3), NAN)      # unused clusters and columns: NaN
    centroids[:, :, :clusters, :D] = torch.randn(B, Hkv, clusters, D, generator=g)
    centroids = centroids.to(DEVICE)[..., :D]
    kw = {"scale": D ** -0.5, "softcap": softcap}
    logits, scores = score_clusters(q, centroids, clusters, **kw)
    ref_logits, ref_scores = score_clusters_reference(q, centroids, clusters, **kw)
    assert logits.shape == (B, Hkv * group, clusters) and scores.shape == (B, Hkv, clusters)
    assert logits.dtype == scores.dtype == F32
    assert rel_err(logits, ref_logits) <= TOLERANCE[dtype]
    assert rel_err(scores, ref_scores) <= TOLERANCE[dtype]
    assert torch.allclose(scores.sum(-1), torch.full((B, Hkv), float(group), device=DEVICE), rtol=1e-5)


# --- cluster_attention ---------------------------------------------------------------------------

SPECIAL_SIZES = (0, 1, 16, 37, 70)   # empty, one token, one full tile, three tiles, five tiles (BLOCK_N 16)


def lay_out(g, sizes, empty_starts=GARBAGE_IDS):
    """Row layout of clusters of the given sizes (B, Hkv, Ccap) int32: each (batch, kv head) stores its
    clusters in a random order, with gaps of 0..3 rows between them. Returns (starts (B, Hkv, Ccap) int32,
    N rows); the starts of empty clusters are garbage (cycling through empty_starts)."""
    B, Hkv, Ccap = sizes.shape
    starts = torch.zeros(B, Hkv, Ccap, dtype=torch.int32)
    N = 1
    for b in range(B):
        for h in range(Hkv):
            row = int(torch.randint(0, 4, (), generator=g))
            for i, cluster in enumerate(torch.randperm(Ccap, generator=g).tolist()):
                if sizes[b, h, cluster] <= 0:
                    starts[b, h, cluster] = empty_starts[(b + h + i) % len(empty_starts)]
                    continue
                starts[b, h, cluster] = row
                row += int(sizes[b, h, cluster]) + int(torch.randint(0, 4, (), generator=g))
            N = max(N, row + 2)
    return starts, N


def read_rows(starts, sizes, selected, N):
    """(B, Hkv, N) bool: the rows of the selected clusters."""
    B, Hkv, R = selected.shape
    read = torch.zeros(B, Hkv, N, dtype=torch.bool)
    for b in range(B):
        for h in range(Hkv):
            for c in selected[b, h].tolist():
                start, size = int(starts[b, h, c]), int(sizes[b, h, c])
                if size > 0:
                    read[b, h, start:start + size] = True
    return read


def page_pool(g, keys, values, read, P, spare=3):
    """The rows of keys (B, Hkv, N, D) / values (B, Hkv, N, Dv), bit for bit, laid out in pages of P rows in
    a shuffled slot order: (k_pool (S, P, D), v_pool (S, P, Dv), page_table (B, Hkv, Pcap) int32), both
    pools non-contiguous views. Only pages holding a read row (read (B, Hkv, N) bool) get a slot; the
    other table entries are -1, 2**30 or the id of one of the `spare` unreferenced slots, which are NaN
    (as the pools' padding rows and columns)."""
    B, Hkv, N, D = keys.shape
    Dv = values.shape[-1]
    Pcap = -(-N // P)
    covered = torch.zeros(B, Hkv, Pcap * P, dtype=torch.bool)
    covered[..., :N] = read
    covered = covered.view(B, Hkv, Pcap, P).any(-1)
    used = int(covered.sum())
    slots = torch.randperm(used + spare, generator=g).int()
    table = torch.zeros(B, Hkv, Pcap, dtype=torch.int32)
    table[covered] = slots[:used]
    garbage = torch.tensor([*GARBAGE_IDS, int(slots[used])], dtype=torch.int32)
    table[~covered] = garbage[torch.arange(int((~covered).sum())) % len(garbage)]
    rows_k = torch.full((B, Hkv, Pcap * P, D), NAN, dtype=keys.dtype, device=keys.device)
    rows_v = torch.full((B, Hkv, Pcap * P, Dv), NAN, dtype=values.dtype, device=values.device)
    rows_k[:, :, :N], rows_v[:, :, :N] = keys, values
    k_pool = torch.full((used + spare, P, D + 3), NAN, dtype=keys.dtype, device=keys.device)
    v_pool = torch.full((used + spare, P + 1, Dv), NAN, dtype=values.dtype, device=values.device)
    at = table[covered].long().to(keys.device)
    k_pool[at, :, :D] = rows_k.view(B, Hkv, Pcap, P, D)[covered.to(keys.device)]
    v_pool[at, :P] = rows_v.view(B, Hkv, Pcap, P, Dv)[covered.to(keys.device)]
    return k_pool[..., :D], v_pool[:, :P], table.to(DEVICE)


def cluster_store(g, k, v, sizes, members=None, poison=NAN):
    """Cluster-contiguous keys (B, Hkv, N, D) and values (B, Hkv, N, Dv) (non-contiguous views on DEVICE)
    and starts (B, Hkv, Ccap) int32 for clusters of the given sizes. members None: k, v are the dtypes
    to store random rows in; else k (B, Hkv, L, D), v (B, Hkv, L, Dv) are a cache and members[b][h][i] the
    token ids of cluster i (sizes[b, h, i] of them), whose rows are copied. Rows outside clusters hold
    `poison`."""
    starts, N = lay_out(g, sizes)
    B, Hkv, Ccap = sizes.shape
    if members is None:
        (k_dtype, D), (v_dtype, Dv) = k, v
    else:
        k_dtype, D, v_dtype, Dv = k.dtype, k.shape[-1], v.dtype, v.shape[-1]
    keys = torch.full((B, Hkv, N, D + 5), poison)
    values = torch.full((B, N, Hkv, Dv), poison)        # stored as (B, N, Hkv, Dv): a transposed view
    for b in range(B):
        for h in range(Hkv):
            for i in range(Ccap):
                n = int(sizes[b, h, i])
                if n <= 0:
                    continue
                rows = slice(int(starts[b, h, i]), int(starts[b, h, i]) + n)
                if members is None:
                    keys[b, h, rows, :D] = torch.randn(n, D, generator=g)
                    values[b, rows, h] = torch.randn(n, Dv, generator=g)
                else:
                    keys[b, h, rows, :D] = k[b, h, members[b][h][i]]
                    values[b, rows, h] = v[b, h, members[b][h][i]]
    return keys.to(k_dtype).to(DEVICE)[..., :D], values.to(v_dtype).to(DEVICE).transpose(1, 2), starts


@dataclasses.dataclass(frozen=True)
class ClusterCase:
    seed: int
    B: int = 1
    Hkv: int = 2
    group: int = 1
    D: int = 64
    Dv: int | None = None        # None: same as D
    clusters: int = 8            # Ccap
    R: int = 5                   # selected clusters per (batch, kv head)
    P: int = 16                  # page size of the paged layout
    dtype: torch.dtype = F32     # q dtype
    kv_dtype: torch.dtype | None = None   # None: same as q
    softcap: float = 0.0
    num_splits: int | None = 1


def make_clusters(c: ClusterCase, g, poison=NAN):
    """(q, keys, values, starts, sizes, selected, (k_pool, v_pool, page_table)) for case c: cluster sizes
    1..60, the first selected entries of each list taking the sizes of SPECIAL_SIZES (rotated per list);
    the clusters of the last list (if there are several) are all empty. Rows outside the selected
    clusters hold `poison`; the paged layout holds the same rows in shuffled slots (see page_pool)."""
    sizes = torch.randint(1, 61, (c.B, c.Hkv, c.clusters), generator=g, dtype=torch.int32)
    selected = torch.stack([torch.randperm(c.clusters, generator=g)[:c.R] for _ in range(c.B * c.Hkv)])
    selected = selected.view(c.B, c.Hkv, c.R)
    for b in range(c.B):
        for h in range(c.Hkv):
            for i, cluster in enumerate(selected[b, h, :len(SPECIAL_SIZES)].tolist()):
                sizes[b, h, cluster] = SPECIAL_SIZES[(i + b * c.Hkv + h) % len(SPECIAL_SIZES)]
    if c.B * c.Hkv > 1:
        sizes[-1, -1, selected[-1, -1]] = 0
    kv_dtype = c.kv_dtype or c.dtype
    keys, values, starts = cluster_store(g, (kv_dtype, c.D), (kv_dtype, c.Dv or c.D), sizes, poison=poison)
    read = read_rows(starts, sizes, selected, keys.shape[2])
    # The unselected clusters' rows are poisoned too (cluster_store filled every cluster).
    keys.masked_fill_(~read.to(DEVICE)[..., None], poison)
    values.masked_fill_(~read.to(DEVICE)[..., None], poison)
    pool = page_pool(g, keys, values, read, c.P)
    q = decode_query(g, c.B, c.Hkv * c.group, c.D, c.dtype)
    return q, keys, values, starts.to(DEVICE), sizes.to(DEVICE), selected.to(DEVICE), pool


CLUSTER_CASES = {
    "d64-gqa1-fp32": ClusterCase(1),
    "d80-gqa4-b3-fp16-s3-p8": ClusterCase(2, B=3, group=4, D=80, R=6, P=8, dtype=F16, num_splits=3),
    "d96-gqa7-b3-bf16-softcap-auto": ClusterCase(3, B=3, Hkv=1, group=7, D=96, dtype=BF16, softcap=2.0,
                                                 num_splits=None),
    "d128-dv80-fp32q-fp16-kv-softcap-s3-p64": ClusterCase(4, group=4, D=128, Dv=80, R=7, P=64, kv_dtype=F16,
                                                          softcap=2.0, num_splits=3),
    "r0-gqa4-b3-fp16-auto": ClusterCase(5, B=3, group=4, R=0, dtype=F16, num_splits=None),
    "r1-gqa7-s3-p128": ClusterCase(6, group=7, D=96, R=1, P=128, num_splits=3),
    "d64-gqa20-fp32-s2": ClusterCase(7, Hkv=1, group=20, R=4, num_splits=2),    # two row blocks
}


@pytest.mark.parametrize("name", list(CLUSTER_CASES))
def test_cluster_attention_matches_reference(name):
    """Both layouts vs the reference, and the paged result equals the direct one bit for bit."""
    c = CLUSTER_CASES[name]
    q, keys, values, starts, sizes, selected, (k_pool, v_pool, table) = make_clusters(
        c, torch.Generator().manual_seed(c.seed))
    kw = {"scale": c.D ** -0.5, "softcap": c.softcap, "num_splits": c.num_splits}
    out, lse = cluster_attention(q, keys, values, starts, sizes, selected, **kw)
    ref, ref_lse = cluster_attention_reference(q, keys, values, starts, sizes, selected, **kw)
    if c.num_splits is not None:
        assert out.shape[0] == c.num_splits
    check_partials(out, lse, ref, ref_lse, c.dtype)
    if c.B * c.Hkv > 1:
        assert torch.isneginf(lse[:, -1, -c.group:]).all()      # make_clusters: the last list is empty
    paged, paged_lse = cluster_attention(q, k_pool, v_pool, starts, sizes, selected, page_table=table, **kw)
    ref_paged, ref_paged_lse = cluster_attention_reference(q, k_pool, v_pool, starts, sizes, selected,
                                                           page_table=table, **kw)
    check_partials(paged, paged_lse, ref_paged, ref_paged_lse, c.dtype)
    assert torch.equal(paged, out) and torch.equal(paged_lse, lse)


@pytest.mark.parametrize("P, dtype, softcap", [(1, F16, 0.0), (8, BF16, 2.0), (32, F32, 0.0), (128, F16, 2.0)])
def test_paged_path_is_bit_identical_to_direct_path(P, dtype, softcap):
    """The same rows read directly or through a page table (pages in shuffled slots) give the same bits."""
    c = ClusterCase(30 + P, B=2, group=4, D=80, Dv=96, R=6, P=P, dtype=dtype, softcap=softcap, num_splits=2)
    q, keys, values, starts, sizes, selected, (k_pool, v_pool, table) = make_clusters(
        c, torch.Generator().manual_seed(c.seed))
    kw = {"scale": c.D ** -0.5, "softcap": c.softcap, "num_splits": c.num_splits}
    out, lse = cluster_attention(q, keys, values, starts, sizes, selected, **kw)
    paged, paged_lse = cluster_attention(q, k_pool, v_pool, starts, sizes, selected, page_table=table, **kw)
    assert torch.isfinite(out).all() and not torch.isneginf(lse[:, 0]).all()
    assert torch.equal(paged, out) and torch.equal(paged_lse, lse)


def test_cluster_auto_split_on_a_long_list():
    # One (batch, kv head) and 128 selected clusters (counted as 16 tokens each): the automatic rule cuts
    # the list in 64 (about two clusters per split).
    c = ClusterCase(11, Hkv=1, group=4, clusters=140, R=128, dtype=F16, num_splits=None)
    assert choose_num_splits(1, 128 * 16, 128, per_split=CLUSTER_SPLIT_TOKENS) == 64
    q, keys, values, starts, sizes, selected, _ = make_clusters(c, torch.Generator().manual_seed(c.seed))
    args = (q, keys, values, starts, sizes, selected)
    out, lse = cluster_attention(*args, scale=0.125)
    ref, ref_lse = cluster_attention_reference(*args, scale=0.125)
    assert out.shape == (64, 1, 4, 64)
    check_partials(out, lse, ref, ref_lse, F16)
    whole, whole_lse = cluster_attention(*args, scale=0.125, num_splits=1)
    merged, merged_lse = merge_partials([out], [lse], F32, return_lse=True)
    assert rel_err(merged[:, :, 0], whole[0]) <= 1e-2
    assert (merged_lse[..., 0] - whole_lse[0]).abs().max().item() <= 1e-4


def test_garbage_cannot_leak():
    """Rows outside the selected clusters hold NaN / huge / zero values, unread page table entries other
    slot ids and empty clusters other starts: the partials of both paths must be bit-identical."""
    c = ClusterCase(21, B=2, group=2, R=6, num_splits=3)
    results = []
    for poison, entry, empty_start in ((NAN, 0, -1), (1e30, 2, 2**30), (0.0, -1, 5)):
        q, keys, values, starts, sizes, selected, (k_pool, v_pool, table) = make_clusters(
            c, torch.Generator().manual_seed(c.seed), poison=poison)
        read = read_rows(starts.cpu(), sizes.cpu(), selected.cpu(), keys.shape[2])
        P = k_pool.shape[1]
        covered = torch.zeros(*read.shape[:2], table.shape[2] * P, dtype=torch.bool)
        covered[..., :read.shape[2]] = read
        covered = covered.view(*table.shape, P).any(-1).to(DEVICE)
        unread_slots = torch.ones(k_pool.shape[0], dtype=torch.bool, device=DEVICE)
        unread_slots[table[covered].long()] = False
        k_pool[unread_slots], v_pool[unread_slots] = poison, poison
        starts = starts.masked_fill(sizes == 0, empty_start)
        kw = {"scale": 0.125, "num_splits": 3}
        results.append(cluster_attention(q, keys, values, starts, sizes, selected, **kw))
        results.append(cluster_attention(q, k_pool, v_pool, starts, sizes, selected,
                                         page_table=table.masked_fill(~covered, entry), **kw))
    assert torch.isfinite(results[0][0]).all()
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])


# --- estimate_clusters ---------------------------------------------------------------------------

@pytest.mark.parametrize("B, Hkv, group, Dv, clusters, E, index_dtype, means_dtype, with_count, num_splits", [
    (1, 2, 1, 64, 1, 1, torch.int32, F32, True, 1),
    (3, 2, 4, 80, 37, 20, torch.int64, F16, True, 3),
    (3, 2, 4, 80, 37, 20, torch.int32, BF16, False, 3),
    (1, 1, 7, 128, 300, 300, torch.int32, F32, False, None),
    (3, 1, 20, 96, 37, 37, torch.int64, F32, True, 2),      # a group of more than 16 heads
])
def test_estimate_clusters_matches_reference(B, Hkv, group, Dv, clusters, E, index_dtype, means_dtype, with_count,
                                             num_splits):
    g = torch.Generator().manual_seed(E * 3 + group + with_count)
    Hq, Ccap = Hkv * group, clusters + 4
    logits = torch.full((B, Hq, clusters + 3), NAN)
    logits[..., :clusters] = 3 * torch.randn(B, Hq, clusters, generator=g)
    sizes = torch.randint(0, 6, (B, Hkv, Ccap), generator=g, dtype=torch.int32)
    sizes[..., clusters:] = -7
    value_means = torch.randn(B, Hkv, Ccap, Dv + 2, generator=g)
    value_means.masked_fill_((sizes <= 0)[..., None], NAN)          # empty or unused: never read
    selected = torch.stack([torch.randperm(clusters, generator=g)[:E] for _ in range(B * Hkv)]).view(B, Hkv, E)
    count = None
    if with_count:
        count = torch.randint(0, E + 1, (B, Hkv), generator=g, dtype=torch.int32)
        count.view(-1)[0] = E
        if count.numel() > 1:
            count.view(-1)[-1] = 0
        selected = poison_tail(selected, count, clusters)
        count = count.to(DEVICE)
    args = [logits[..., :clusters].to(DEVICE), value_means.to(means_dtype).to(DEVICE)[..., :Dv], sizes.to(DEVICE),
            selected.to(index_dtype).to(DEVICE), count]
    out, lse = estimate_clusters(*args, num_splits=num_splits)
    ref, ref_lse = estimate_clusters_reference(*args, num_splits=num_splits)
    check_partials(out, lse, ref, ref_lse, F32)
    if count is None:
        assert torch.equal(estimate_clusters(*args[:4], num_splits=num_splits)[0], out)


# --- merge_partials ------------------------------------------------------------------------------

@pytest.mark.parametrize("Dv, splits, dtype", [(64, (3, None), F16), (80, (20,), BF16), (128, (1, 2, None), F32),
                                              (96, (2, None, 5, 1), F16)])
def test_merge_partials_matches_reference(Dv, splits, dtype):
    """splits: the partial counts S_i of the inputs (None: a (B, Hq, Dv) partial). The kernel reads up to three
    sources in place and concatenates more; the second partial comes in the output dtype (as the wave step's
    steady-zone partial does)."""
    g = torch.Generator().manual_seed(Dv)
    B, Hq = 3, 5
    outs, lses = [], []
    for i, s in enumerate(splits):
        n = s or 1
        out = torch.randn(n, B, Hq, Dv + 2, generator=g)[..., :Dv]         # non-contiguous
        lse = 4 * torch.randn(n, B, Hq, generator=g)
        lse[torch.rand(n, B, Hq, generator=g) < 0.3] = float("-inf")
        lse[:, 0, 0] = float("-inf")                                     # a row where every partial is empty
        if i == 0:
            lse[:, 1, 1] = 80.0 + torch.arange(n)                        # large lse: no overflow
        out[torch.isneginf(lse)] = NAN                                   # never read
        if i == 1:
            out = out.to(dtype)
        outs.append(out.to(DEVICE) if s else out[0].to(DEVICE))
        lses.append(lse.to(DEVICE) if s else lse[0].to(DEVICE))
    merged, merged_lse = merge_partials(outs, lses, dtype, return_lse=True)
    ref, ref_lse = merge_partials_reference(outs, lses, dtype, return_lse=True)
    assert merged.shape == (B, Hq, 1, Dv) and merged.dtype == dtype and merged_lse.shape == (B, Hq, 1)
    assert torch.isfinite(merged).all() and (merged[0, 0] == 0).all()
    assert torch.equal(torch.isneginf(merged_lse), torch.isneginf(ref_lse))
    seen = ~torch.isneginf(ref_lse)
    assert (merged_lse[seen] - ref_lse[seen]).abs().max().item() <= 1e-5
    assert rel_err(merged, ref) <= TOLERANCE[dtype]
    assert torch.equal(merge_partials(outs, lses, dtype), merged)


# --- composition: the four pieces give exact attention ------------------------------------------

def clustered_cache(g, lengths, Hkv):
    """Partition each (batch, kv head)'s tokens [0, lengths[b]) into random clusters (a different
    partition per head). Returns members: members[b][h] is the list of token index tensors of the
    clusters."""
    members = []
    for n in lengths:
        members.append([])
        for _ in range(Hkv):
            perm = torch.randperm(n, generator=g)
            cuts = sorted(torch.randperm(n - 1, generator=g)[:n // 4].add(1).tolist()) if n > 1 else []
            members[-1].append(list(torch.tensor_split(perm, cuts)))   # random sizes, at least one token each
    return members


def cluster_sizes(members, Ccap):
    """(B, Hkv, Ccap) int32 sizes of the clusters of members (0 past each list's clusters)."""
    sizes = torch.zeros(len(members), len(members[0]), Ccap, dtype=torch.int32)
    for b, row in enumerate(members):
        for h, clusters in enumerate(row):
            for i, tokens in enumerate(clusters):
                sizes[b, h, i] = len(tokens)
    return sizes


def dense_cache(g, lengths, Hkv, D, Dv):
    """Random (k (B, Hkv, L, D), v (B, Hkv, L, Dv), valid (B, L)), NaN past each length."""
    B, L = len(lengths), max(lengths)
    valid = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    k = torch.randn(B, Hkv, L, D, generator=g).masked_fill(~valid[:, None, :, None], NAN)
    v = torch.randn(B, Hkv, L, Dv, generator=g).masked_fill(~valid[:, None, :, None], NAN)
    return k, v, valid


def exact_attention(q, k, v, valid, scale, softcap):
    """Reference attention of the decode query over every valid token, and its lse (B, Hq, 1)."""
    out = attention_over_store_reference(q, k.to(DEVICE), v.to(DEVICE), valid.to(DEVICE), scale=scale,
                                         softcap=softcap, causal=False)
    s = attention_scores(q, k.nan_to_num().to(DEVICE), scale=scale, softcap=softcap)[:, :, 0]
    s = s.masked_fill(~valid.to(DEVICE)[:, None, :], float("-inf"))
    return out, torch.logsumexp(s, dim=-1)[..., None]


def retrieve(g, q, k, v, members, retrieved, Ccap, P, *, scale, softcap, num_splits):
    """cluster_attention over the clusters retrieved[b][h] (lists of cluster ids of members, padded to one
    length with the empty cluster Ccap - 1), stored cluster-contiguously, directly (P = 0) or in pages of
    P rows."""
    sizes = cluster_sizes(members, Ccap)
    keys, values, starts = cluster_store(g, k, v, sizes, members)
    R = max(len(ids) for row in retrieved for ids in row)
    selected = torch.tensor([[ids + [Ccap - 1] * (R - len(ids)) for ids in row] for row in retrieved],
                            dtype=torch.int64).view(len(members), len(members[0]), R)
    table = None
    if P:
        keys, values, table = page_pool(g, keys, values, read_rows(starts, sizes, selected, keys.shape[2]), P)
    return cluster_attention(q, keys, values, starts.to(DEVICE), sizes.to(DEVICE), selected.to(DEVICE),
                             scale=scale, softcap=softcap, page_table=table, num_splits=num_splits)


@pytest.mark.parametrize("num_splits, P", [(1, 0), (3, 8)])
def test_retrieving_every_cluster_is_exact_attention(num_splits, P):
    """Every cluster of a cache (in a random order per kv head) retrieved, nothing estimated:
    merge(cluster attention, empty estimate) is attention over the cache (token order is irrelevant)."""
    g = torch.Generator().manual_seed(101 + num_splits)
    lengths, Hkv, group, D, Dv, softcap = (37, 20), 2, 3, 64, 80, 0.0
    B = len(lengths)
    k, v, valid = dense_cache(g, lengths, Hkv, D, Dv)
    members = clustered_cache(g, lengths, Hkv)
    Ccap = max(len(m) for row in members for m in row) + 1
    every = [[torch.randperm(len(members[b][h]), generator=g).tolist() for h in range(Hkv)] for b in range(B)]
    q = decode_query(g, B, Hkv * group, D, F32)
    scale = D ** -0.5
    retrieved, retrieved_lse = retrieve(g, q, k, v, members, every, Ccap, P, scale=scale, softcap=softcap,
                                        num_splits=num_splits)
    # An estimate over no cluster: all of its partials are empty.
    C = 3
    logits, _ = score_clusters(q, torch.randn(B, Hkv, C, D, generator=g).to(DEVICE), C, scale=scale)
    none = torch.zeros(B, Hkv, dtype=torch.int32, device=DEVICE)
    est, est_lse = estimate_clusters(logits, torch.zeros(B, Hkv, C, Dv, device=DEVICE),
                                     torch.ones(B, Hkv, C, dtype=torch.int32, device=DEVICE),
                                     torch.zeros(B, Hkv, C, dtype=torch.int32, device=DEVICE), none)
    assert torch.isneginf(est_lse).all()
    out, lse = merge_partials([retrieved, est], [retrieved_lse, est_lse], F32, return_lse=True)
    ref, ref_lse = exact_attention(q, k, v, valid, scale, softcap)
    assert rel_err(out, ref) <= TOLERANCE[F32]
    assert (lse - ref_lse).abs().max().item() <= LSE_TOLERANCE[F32]


@pytest.mark.parametrize("retrieved_share, softcap, P", [(0.0, 0.0, 0), (0.5, 2.0, 0), (0.5, 0.0, 16)])
def test_estimating_constant_key_clusters_is_exact_attention(retrieved_share, softcap, P):
    """Clusters whose tokens all share one key (their centroid): estimating them from their value means
    and sizes (and retrieving the others exactly) gives exact attention over all tokens, since every
    token of a cluster has the centroid's score."""
    g = torch.Generator().manual_seed(201 + int(softcap) + P)
    lengths, Hkv, group, D, Dv = (30, 45, 1), 2, 4, 96, 64
    B = len(lengths)
    members = clustered_cache(g, lengths, Hkv)
    C = max(len(m) for row in members for m in row) + 1         # one cluster past every list stays empty
    centroids = torch.full((B, Hkv, C + 2, D), NAN)
    centroids[:, :, :C] = torch.randn(B, Hkv, C, D, generator=g)
    _, v, valid = dense_cache(g, lengths, Hkv, D, Dv)
    k = torch.full((B, Hkv, max(lengths), D), NAN)
    value_means = torch.full((B, Hkv, C + 2, Dv), NAN)           # NaN for empty clusters: never read
    sizes = cluster_sizes(members, C + 2)
    selected = torch.full((B, Hkv, C), -1, dtype=torch.int64)
    count = torch.zeros(B, Hkv, dtype=torch.int32)
    retrieved = [[[] for _ in range(Hkv)] for _ in range(B)]
    for b in range(B):
        for h in range(Hkv):
            for i, tokens in enumerate(members[b][h]):
                k[b, h, tokens] = centroids[b, h, i]
                value_means[b, h, i] = v[b, h, tokens].mean(0)
                if torch.rand(1, generator=g).item() < retrieved_share:
                    retrieved[b][h].append(i)
                else:
                    selected[b, h, count[b, h]] = i
                    count[b, h] += 1
            selected[b, h, count[b, h]] = C - 1                  # the empty cluster: size 0, adds nothing
            count[b, h] += 1
    q = decode_query(g, B, Hkv * group, D, F32)
    scale = D ** -0.5
    logits, _ = score_clusters(q, centroids.to(DEVICE), C, scale=scale, softcap=softcap)
    est, est_lse = estimate_clusters(logits, *(t.to(DEVICE) for t in (value_means, sizes, selected, count)),
                                     num_splits=2)
    outs, lses = [est], [est_lse]
    if retrieved_share > 0:
        part, part_lse = retrieve(g, q, k, v, members, retrieved, C, P, scale=scale, softcap=softcap, num_splits=1)
        outs.append(part[0])
        lses.append(part_lse[0])
    out, lse = merge_partials(outs, lses, F32, return_lse=True)
    ref, ref_lse = exact_attention(q, k, v, valid, scale, softcap)
    assert rel_err(out, ref) <= TOLERANCE[F32]
    assert (lse - ref_lse).abs().max().item() <= LSE_TOLERANCE[F32]


# --- split rule and input checks ----------------------------------------------------------------

def test_split_bounds_cover_each_list_once():
    count = torch.tensor([[0, 1, 7], [10, 3, 64]])
    for num_splits in (1, 3, 4, 70):
        lo, hi = split_bounds(count, num_splits)
        assert lo.shape == (num_splits, 2, 3)
        sizes = (hi - lo).clamp_min(0)
        assert torch.equal(sizes.sum(0), count)
        # Non-empty splits are consecutive: each starts where the splits before it end.
        assert torch.equal(torch.where(sizes > 0, lo, 0), torch.where(sizes > 0, sizes.cumsum(0) - sizes, 0))
    assert choose_num_splits(64, 10**6, 10**5) == 9            # 64 programs: 528 / 64 -> 9 splits
    assert choose_num_splits(8, 200, 100) == 1                  # too short to split
    assert choose_num_splits(8, 1900, 1900) == 30               # decode at batch 1: 8 lists of 1900 clusters
    assert choose_num_splits(8, 148 * 16, 148, per_split=32) == 64   # cluster attention: ~2 clusters per split
    assert choose_num_splits(1, 10**6, 10**5) == 64             # capped
    assert choose_num_splits(1, 10**6, 10) == 10                # no more splits than entries
    assert choose_num_splits(600, 10**6, 10**5) == 1            # the grid is full already


def _bad_inputs():
    q = torch.zeros(1, 4, 1, 64)
    keys, values = torch.zeros(1, 2, 40, 64), torch.zeros(1, 2, 40, 64)
    starts, sizes = torch.zeros(1, 2, 5, dtype=torch.int32), torch.ones(1, 2, 5, dtype=torch.int32)
    sel, count = torch.zeros(1, 2, 3, dtype=torch.int32), torch.ones(1, 2, dtype=torch.int32)
    table = torch.zeros(1, 2, 3, dtype=torch.int32)
    logits, vm = torch.zeros(1, 4, 5), torch.zeros(1, 2, 5, 64)
    direct = (q, keys, values, starts, sizes, sel)
    return {
        "prefill-query": ("score_clusters", (torch.zeros(1, 4, 2, 64), torch.zeros(1, 2, 5, 64), 5),
                          {"scale": 1.0}, r"one decode query"),
        "clusters-past-capacity": ("score_clusters", (q, torch.zeros(1, 2, 5, 64), 6), {"scale": 1.0},
                                   r"clusters must be a python int in \[1, Ccap = 5\]"),
        "gqa": ("score_clusters", (q, torch.zeros(1, 3, 5, 64), 5), {"scale": 1.0}, r"multiple of kv heads"),
        "page-size": ("cluster_attention", (q, torch.zeros(3, 12, 64), torch.zeros(3, 12, 64), *direct[3:]),
                      {"scale": 1.0, "page_table": table}, r"power of 2"),
        "pool-without-table": ("cluster_attention", (q, torch.zeros(3, 16, 64), torch.zeros(3, 16, 64), *direct[3:]),
                               {"scale": 1.0}, r"keys must be a 4-D tensor"),
        "table-int64": ("cluster_attention", (q, torch.zeros(3, 16, 64), torch.zeros(3, 16, 64), *direct[3:]),
                        {"scale": 1.0, "page_table": table.long()}, r"page_table must be a 3-D tensor"),
        "starts-int64": ("cluster_attention", (*direct[:3], starts.long(), *direct[4:]), {"scale": 1.0},
                         r"starts must be a 3-D tensor"),
        "sizes-shape": ("cluster_attention", (*direct[:4], sizes[:, :, :4], sel), {"scale": 1.0},
                        r"sizes must have shape"),
        "splits-zero": ("cluster_attention", direct, {"scale": 1.0, "num_splits": 0}, r"num_splits must be"),
        "selected-float": ("estimate_clusters", (logits, vm, sizes, sel.float(), count), {},
                           r"selected must be a 3-D tensor"),
        "value-capacity": ("estimate_clusters", (logits, vm[:, :, :4], sizes, sel, count), {}, r"disagree"),
        "count-shape": ("estimate_clusters", (logits, vm, sizes, sel, count[:, :1]), {}, r"count must have shape"),
        "merge-shapes": ("merge_partials", ([torch.zeros(2, 1, 4, 64)], [torch.zeros(2, 1, 3)], F16), {},
                         r"lses\[0\] must have shape"),
        "merge-lengths": ("merge_partials", ([torch.zeros(2, 1, 4, 64)], [], F16), {}, r"same length"),
    }


@pytest.mark.parametrize("name", list(_bad_inputs()))
def test_bad_inputs_are_rejected_by_kernel_and_reference(name):
    import kvpass.kernels.wave_attention as wave

    function, args, kw, message = _bad_inputs()[name]
    for fn in (getattr(wave, function), getattr(wave, f"{function}_reference")):
        with pytest.raises(ValueError, match=message):
            fn(*args, **kw)


@pytest.mark.skipif(not _INTERPRET, reason="on a GPU the kernels are compiled by running them")
def test_kernels_compile_for_hopper():
    """The interpreter runs kernels as numpy: also compile what the exact-composition cases launches for sm_90, as a GPU would
    (tests/hopper_compile.py)."""
    from hopper_compile import assert_what_runs_compiles_for_hopper

    assert_what_runs_compiles_for_hopper(lambda: test_retrieving_every_cluster_is_exact_attention(3, 8),
                                         lambda: test_estimating_constant_key_clusters_is_exact_attention(0.5, 2.0, 0))
