"""How fast torch can pick a decode step's clusters: torch.topk (radix select + sort of the winners) against a full
torch.sort of each row, on the wave index's shapes (B * Hkv rows of C cluster scores, K = 25 % of them chosen),
timed by CUDA-graph replay.

    python benchmarks/probes/cluster_select.py
"""
from __future__ import annotations

import torch
from triton.testing import do_bench_cudagraph


def main() -> None:
    print(f"{'rows':>5} {'clusters':>8} {'k':>6}  topk sorted  topk unsorted  sort  (us)")
    for rows in (8, 64):
        for clusters in (2048, 8192, 32768):
            scores = torch.rand(rows, clusters, device="cuda").softmax(-1)
            k = clusters // 4
            times = [1e3 * do_bench_cudagraph(fn) for fn in (
                lambda: scores.topk(k, dim=-1, sorted=True),
                lambda: scores.topk(k, dim=-1, sorted=False),
                lambda: scores.sort(dim=-1, descending=True))]
            print(f"{rows:5d} {clusters:8d} {k:6d}  {times[0]:11.1f}  {times[1]:13.1f}  {times[2]:4.1f}")


if __name__ == "__main__":
    main()
