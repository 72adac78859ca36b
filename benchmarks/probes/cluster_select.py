"""How fast a decode step's clusters can be picked: torch.topk (radix select + sort of the winners), a full
torch.sort, and kvpass's Triton select (kvpass.kernels.cluster_select: three histogram levels + a write pass over
many programs per row), on the wave index's shapes (B * Hkv rows of C cluster scores; the default budgets choose
25 % of them: 1.8 % retrieved + 23.2 % estimated), timed by CUDA-graph replay. The Triton select is checked against
its reference on the same inputs first.

    python benchmarks/probes/cluster_select.py
"""
from __future__ import annotations

import torch
from triton.testing import do_bench_cudagraph

from kvpass import WaveIndex
from kvpass.kernels.cluster_select import select_clusters, select_clusters_reference
from kvpass.methods.wave import budgets


def main() -> None:
    print(f"{'rows':>5} {'clusters':>8} {'k':>6}  topk sorted  topk unsorted  sort  kvpass select  (us)")
    for rows in (8, 64):
        for clusters in (2048, 8192, 32768):
            scores = torch.rand(rows, 1, clusters, device="cuda").pow(8).softmax(-1)
            sizes = torch.randint(1, 32, (rows, 1, clusters), device="cuda", dtype=torch.int32)
            retrieved, estimated = budgets(WaveIndex(), clusters)
            k = retrieved + estimated
            counts = torch.zeros(2, dtype=torch.int64, device="cuda")
            assert torch.equal(select_clusters(scores, sizes, clusters, retrieved, estimated),
                               select_clusters_reference(scores, sizes, clusters, retrieved, estimated))
            times = [1e3 * do_bench_cudagraph(fn) for fn in (
                lambda: scores.topk(k, dim=-1, sorted=True),
                lambda: scores.topk(k, dim=-1, sorted=False),
                lambda: scores.sort(dim=-1, descending=True),
                lambda: select_clusters(scores, sizes, clusters, retrieved, estimated, counts))]
            print(f"{rows:5d} {clusters:8d} {k:6d}  {times[0]:11.1f}  {times[1]:13.1f}  {times[2]:4.1f}"
                  f"  {times[3]:13.1f}")


if __name__ == "__main__":
    main()
