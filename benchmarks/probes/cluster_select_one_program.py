"""A measured alternative to kvpass's cluster select, kept to reproduce the comparison: one program per (batch, kv
head) row holds the row's keys in registers and finds both thresholds by a radix select of 4-bit digits
(``tl.histogram`` of 16 bins, 8 passes), then writes the selection with one prefix sum; and the same fused with
the scores (the row's lse from the centroid-logits partials). Checked against the reference first (here and under
TRITON_INTERPRET=1 on CPU), then timed by CUDA-graph replay against kvpass's multi-program select.

Result on an H100 (benchmarks/results/probe-cluster-select-one-program-20261124.txt): at batch 1 and 128K (8 rows
of 8,192 clusters) no better (30.3 vs 30.9 us at 16 warps, 43 at 8), and fused with the scores slower (51 vs 42
us), so the decode step would not gain; faster for short rows (8 x 2,048: 11 vs 19 us) and for many rows (64 x
8,192, batch 8 at 128K: 31 vs 59 us). Not adopted; rows of 32,768 clusters (512K) took 25 to 142 s to compile,
so it could only serve as a size-dependent choice beside the multi-program select.

    python benchmarks/probes/cluster_select_one_program.py
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvpass.kernels.cluster_select.kernel import _chunk_keys, _row_start, _rank_key
from kvpass.kernels.cluster_select import select_clusters, select_clusters_reference


@triton.jit
def _digit_rank(key, match, t, shift: tl.constexpr):
    hist = tl.histogram((key >> shift) & 15, 16, mask=match)
    bins = tl.arange(0, 16)
    at_or_above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
    d = tl.sum((at_or_above >= t).to(tl.int32), 0) - 1
    return d, tl.sum(tl.where(bins > d, hist, 0), 0)


@triton.jit
def _row_select_kernel(SCORES, SIZES, TOP, COUNTS, ssb, ssh, ssc, szb, szh, szc, stb, sth, H, C, t1, t2,
                       HAS_COUNTS: tl.constexpr, BLOCK: tl.constexpr):
    row, row_s, row_z = _row_start(ssb, ssh, szb, szh, H)
    offs = tl.arange(0, BLOCK)
    key, size = _chunk_keys(SCORES, SIZES, row_s, row_z, ssc, szc, offs, C)
    _select_row(key, size, offs, row, TOP, COUNTS, stb, sth, H, t1, t2, HAS_COUNTS)


@triton.jit
def _row_score_select_kernel(LOGITS, M_PART, L_PART, SIZES, SCORES, TOP, COUNTS, slb, slh, slc, szb, szh, szc,
                             ssb, ssh, ssc, stb, sth, H, group, C, num_blocks, t1, t2,
                             HAS_COUNTS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr):
    row = tl.program_id(1)
    b = (row // H).to(tl.int64)
    h = (row % H).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < C
    score = tl.zeros([BLOCK], tl.float32)
    j = tl.arange(0, BLOCK_B)
    for g in range(group):
        head = h * group + g
        part = (b * H * group + head) * num_blocks
        m = tl.load(M_PART + part + j, mask=j < num_blocks, other=float("-inf"))
        m_max = tl.max(m, 0)
        l_sum = tl.sum(tl.load(L_PART + part + j, mask=j < num_blocks, other=0.0) * tl.exp(m - m_max), 0)
        lse = m_max + tl.log(l_sum)
        logit = tl.load(LOGITS + b * slb + head * slh + offs * slc, mask=ok, other=float("-inf"))
        score += tl.exp(logit - lse)
    tl.store(SCORES + b * ssb + h * ssh + offs * ssc, score, mask=ok)
    size = tl.load(SIZES + b * szb + h * szh + offs * szc, mask=ok, other=0).to(tl.int32)
    key = tl.where(ok, _rank_key(score, size), -1)
    _select_row(key, size, offs, row, TOP, COUNTS, stb, sth, H, t1, t2, HAS_COUNTS)


@triton.jit
def _select_row(key, size, offs, row, TOP, COUNTS, stb, sth, H, t1, t2, HAS_COUNTS: tl.constexpr):
    valid = key >= 0
    T1 = row * 0
    T2 = row * 0
    r1 = t1 + row * 0
    r2 = t2 + row * 0
    for i in tl.static_range(8):
        shift = 28 - 4 * i
        if i == 0:
            m1 = valid
            m2 = valid
        else:
            m1 = valid & ((key >> (shift + 4)) == (T1 >> (shift + 4)))
            m2 = valid & ((key >> (shift + 4)) == (T2 >> (shift + 4)))
        d1, above1 = _digit_rank(key, m1, r1, shift)
        d2, above2 = _digit_rank(key, m2, r2, shift)
        T1 = T1 | (d1 << shift)
        T2 = T2 | (d2 << shift)
        r1 -= above1
        r2 -= above2
    tie1 = (key == T1).to(tl.int32)
    tie2 = (key == T2).to(tl.int32)
    chosen1 = ((key > T1) | ((tie1 == 1) & (tl.cumsum(tie1, 0) - tie1 < r1))) & (t1 > 0)
    chosen2 = ((key > T2) | ((tie2 == 1) & (tl.cumsum(tie2, 0) - tie2 < r2))) & (t2 > 0)
    retrieved = chosen1.to(tl.int32)
    estimated = (chosen2 & ~chosen1).to(tl.int32)
    row_t = TOP + (row // H).to(tl.int64) * stb + (row % H).to(tl.int64) * sth
    tl.store(row_t + tl.cumsum(retrieved, 0) - retrieved, offs, mask=retrieved == 1)
    tl.store(row_t + t1 + tl.cumsum(estimated, 0) - estimated, offs, mask=estimated == 1)
    if HAS_COUNTS:
        tl.atomic_add(COUNTS, tl.sum(size * retrieved, 0).to(tl.int64))
        tl.atomic_add(COUNTS + 1, tl.sum(size * estimated, 0).to(tl.int64))


def row_select(scores, sizes, clusters, retrieved, estimated, counts=None, num_warps=8):
    B, H = scores.shape[:2]
    top = torch.empty((B, H, retrieved + estimated), dtype=torch.int32, device=scores.device)
    block = triton.next_power_of_2(clusters)
    _row_select_kernel[(1, B * H)](scores, sizes, top, top if counts is None else counts, *scores.stride(),
                                   *sizes.stride(), *top.stride()[:2], H, clusters, retrieved, retrieved + estimated,
                                   HAS_COUNTS=counts is not None, BLOCK=block, num_warps=num_warps)
    return top


def score_select(q, centroids, sizes, C, retrieved, estimated, counts=None, num_warps=8):
    from kvpass.kernels.wave_attention.kernel import _centroid_logits_kernel, _SCORE_BLOCK_C, _SCORE_WARPS
    B, Hq, _, D = q.shape
    H = centroids.shape[1]
    group = Hq // H
    logits = torch.empty((B, Hq, C), dtype=torch.float32, device=q.device)
    scores = torch.empty((B, H, C), dtype=torch.float32, device=q.device)
    num_blocks = triton.cdiv(C, _SCORE_BLOCK_C)
    m_part = torch.empty((B * Hq, num_blocks), dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    _centroid_logits_kernel[(num_blocks, B * H)](
        q, centroids, logits, m_part, l_part, q.stride(0), q.stride(1), q.stride(3), *centroids.stride(),
        *logits.stride(), H, group, C, D, num_blocks, 0.125, 0.0, HAS_SOFTCAP=False, BLOCK_C=_SCORE_BLOCK_C,
        BLOCK_D=max(16, triton.next_power_of_2(D)), num_warps=_SCORE_WARPS)
    top = torch.empty((B, H, retrieved + estimated), dtype=torch.int32, device=q.device)
    _row_score_select_kernel[(1, B * H)](
        logits, m_part, l_part, sizes, scores, top, top if counts is None else counts, *logits.stride(),
        *sizes.stride(), *scores.stride(), *top.stride()[:2], H, group, C, num_blocks, retrieved,
        retrieved + estimated, HAS_COUNTS=counts is not None, BLOCK=triton.next_power_of_2(C),
        BLOCK_B=triton.next_power_of_2(num_blocks), num_warps=num_warps)
    return logits, scores, top


def current(q, centroids, sizes, C, r, e, counts=None):
    from kvpass.kernels.wave_attention import score_clusters
    logits, scores, hist = score_clusters(q, centroids, C, scale=0.125, select_sizes=sizes)
    return logits, scores, select_clusters(scores, sizes, C, r, e, counts, top_level=hist)


def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sizes_to_try = [(8, 2048), (8, 8192), (64, 8192)] if dev == "cuda" else [(3, 37), (2, 300), (2, 1000)]
    for rows, C in sizes_to_try:
        g = torch.Generator().manual_seed(C)
        scores = torch.rand(rows, 1, C, generator=g).pow(8).softmax(-1).to(dev)
        scores[:, :, ::7] = scores[:, :, 3:4]          # ties
        sizes = torch.randint(0, 32, (rows, 1, C), generator=g, dtype=torch.int32).to(dev)
        for r, e in [(max(1, round(0.018 * C)), round(0.232 * C)), (0, 5), (1, 0), (0, 0), (C // 2, C - C // 2)]:
            c1 = torch.zeros(2, dtype=torch.int64, device=dev)
            c2 = c1.clone()
            want = select_clusters_reference(scores, sizes, C, r, e, c1)
            got = row_select(scores, sizes, C, r, e, c2)
            assert torch.equal(want, got), (rows, C, r, e, (want != got).sum())
            assert torch.equal(c1, c2)
    for B, H, G, C in ([(1, 8, 4, 2048), (1, 8, 4, 8192), (8, 8, 4, 8192)] if dev == "cuda"
                       else [(1, 2, 3, 37), (2, 1, 7, 300)]):
        q = torch.randn(B, H * G, 1, 128, device=dev)
        cen = torch.randn(B, H, C + 3, 128, device=dev)
        sizes = torch.randint(0, 32, (B, H, C + 3), dtype=torch.int32, device=dev)
        r, e = max(1, round(0.018 * C)), round(0.232 * C)
        want = current(q, cen, sizes, C, r, e)
        got = score_select(q, cen, sizes, C, r, e)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-7)
        assert torch.equal(got[2], select_clusters_reference(got[1], sizes, C, r, e))
    print("ok")
    if dev != "cuda":
        return
    from triton.testing import do_bench_cudagraph
    from kvpass import WaveIndex
    from kvpass.methods.wave import budgets
    print(f"{'rows':>5} {'C':>6}  multi  row8  row16 (us)")
    for rows, C in sizes_to_try:
        scores = torch.rand(rows, 1, C, device="cuda").pow(8).softmax(-1)
        sizes = torch.randint(1, 32, (rows, 1, C), device="cuda", dtype=torch.int32)
        r, e = budgets(WaveIndex(), C)
        counts = torch.zeros(2, dtype=torch.int64, device="cuda")
        ts = [1e3 * do_bench_cudagraph(lambda: select_clusters(scores, sizes, C, r, e, counts))]
        for w in (8, 16):
            ts.append(1e3 * do_bench_cudagraph(lambda: row_select(scores, sizes, C, r, e, counts, num_warps=w)))
        print(f"{rows:5d} {C:6d}  " + "  ".join(f"{t:5.1f}" for t in ts), flush=True)
    print(f"{'B':>3} {'C':>6}  score+select now  logits+row fused w8 w16 (us)")
    for B, C in [(1, 2048), (1, 8192), (8, 8192)]:
        q = torch.randn(B, 32, 1, 128, device="cuda", dtype=torch.float16)
        cen = torch.randn(B, 8, C, 128, device="cuda", dtype=torch.float16)
        sizes = torch.randint(1, 32, (B, 8, C), dtype=torch.int32, device="cuda")
        r, e = budgets(WaveIndex(), C)
        counts = torch.zeros(2, dtype=torch.int64, device="cuda")
        ts = [1e3 * do_bench_cudagraph(lambda: current(q, cen, sizes, C, r, e, counts))]
        for w in (8, 16):
            ts.append(1e3 * do_bench_cudagraph(lambda: score_select(q, cen, sizes, C, r, e, counts, num_warps=w)))
        print(f"{B:3d} {C:6d}  " + "  ".join(f"{t:5.1f}" for t in ts), flush=True)


if __name__ == "__main__":
    main()
