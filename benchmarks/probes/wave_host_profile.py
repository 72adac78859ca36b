"""Where the host time of an eagerly launched wave decode step goes: cProfile of `tripartite` over many steps
(Llama-3-8B layer shape, synthetic K/V as benchmarks/wave_bench.py), the functions with the most own time.

    python benchmarks/probes/wave_host_profile.py --context 131072
"""
from __future__ import annotations

import argparse
import cProfile
import pathlib
import pstats
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from wave_bench import probe_layer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    store, spec, (q,) = probe_layer(args.context, 1)
    for _ in range(20):
        store.tripartite(q, spec)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        store.tripartite(q, spec)
    torch.cuda.synchronize()
    print(f"context {args.context}: {1e3 * (time.perf_counter() - start) / args.steps:.3f} ms per eager step "
          f"(host and GPU, no profiler)")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        store.tripartite(q, spec)
    torch.cuda.synchronize()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(args.rows)


if __name__ == "__main__":
    main()
