"""Host time of the wave buffer's per-step bookkeeping (WaveBuffer.fetch without its copies): which pages the
step's clusters lie on, hits, LRU victims, tables. The same numpy code runs on a GPU machine's host, where it
adds to every offloaded decode step.

Synthetic shapes of benchmarks/wave_bench.py's layer: 1 row, 8 KV heads, 16-token pages, cluster sizes 1-31,
buffer of 10 % of the pages, 1.8 % of the clusters chosen per head and step from a hot set of 4x as many.

    python benchmarks/probes/wave_buffer_host.py
"""
from __future__ import annotations

import time
import types

import numpy as np
import torch

from kvpass.methods.wave_buffer import WaveBuffer

HEADS, PAGE, STEPS = 8, 16, 40


def buffer_of(length: int, rng: np.random.Generator) -> tuple[WaveBuffer, int]:
    clusters = length // 16
    sizes = rng.integers(1, 32, (1, HEADS, clusters)).astype(np.int32)
    starts = np.concatenate([np.zeros((1, HEADS, 1), np.int64), np.cumsum(sizes, -1)[..., :-1]], -1).astype(np.int32)
    pages = int(sizes.sum(-1).max()) // PAGE + 1
    rows = torch.empty(1, HEADS, pages * PAGE, 1)   # the copies are stubbed: shapes only
    index = types.SimpleNamespace(page=PAGE, keys=rows, values=rows, host_starts=starts, host_sizes=sizes)
    buffer = WaveBuffer(index, slots=int(0.1 * HEADS * pages), device=torch.device("cpu"))
    buffer._copy = lambda missing, victims, after: None
    return buffer, clusters


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"{'context':>8} {'slots':>6} {'hit rate':>8} {'ms/step':>8}")
    for length in (32768, 131072, 524288):
        buffer, clusters = buffer_of(length, rng)
        chosen = int(0.018 * clusters)
        hot = rng.choice(clusters, size=(HEADS, 4 * chosen))
        steps = [np.stack([rng.choice(hot[h], chosen, replace=False) for h in range(HEADS)])[None]
                 for _ in range(STEPS)]
        for selection in steps[: STEPS // 4]:
            buffer.fetch(selection, None)
        start = time.perf_counter()
        for selection in steps[STEPS // 4 :]:
            buffer.fetch(selection, None)
        ms = (time.perf_counter() - start) / (STEPS - STEPS // 4) * 1e3
        print(f"{length:8d} {buffer.slots:6d} {buffer.stats()['hit_rate']:8.2f} {ms:8.2f}")


if __name__ == "__main__":
    main()
