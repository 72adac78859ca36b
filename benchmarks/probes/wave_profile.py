"""Where one decode step of the wave index spends its GPU time: torch.profiler kernel table of `tripartite` at
one context (Llama-3-8B layer shape, synthetic K/V as benchmarks/wave_bench.py).

    python benchmarks/probes/wave_profile.py --context 131072
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from wave_bench import probe_layer  # noqa: E402


def main() -> None:
    from kvpass import WaveIndex

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--offload", action="store_true")
    args = parser.parse_args()
    store, spec, queries = probe_layer(args.context, 20, WaveIndex(offload=args.offload))
    for q in queries[:10]:
        store.tripartite(q, spec)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for q in queries[10:]:
            store.tripartite(q, spec)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
