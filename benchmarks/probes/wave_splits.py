"""How the split count changes the two list-walking kernels of a wave decode step: cluster_attention (exact
attention over the retrieved clusters) and estimate_clusters (centroid estimation), timed by CUDA-graph replay
on the lists a real step selects (Llama-3-8B layer shape, synthetic K/V as benchmarks/wave_bench.py), beside
the automatic count (kernels/wave_attention/reference.py: choose_num_splits).

    python benchmarks/probes/wave_splits.py --context 131072
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from wave_bench import probe_layer  # noqa: E402

SPLITS = (None, 8, 16, 32, 64, 128)


def main() -> None:
    from kvpass import WaveIndex
    from kvpass.eval.bench import graph_time_ms
    from kvpass.kernels.cluster_select import select_clusters
    from kvpass.kernels.wave_attention import cluster_attention, estimate_clusters, score_clusters
    from kvpass.methods.wave import budgets

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=131072)
    args = parser.parse_args()
    store, spec, (q,) = probe_layer(args.context, 1)
    index, C = store._index, store._index.clusters
    scale = spec.scale
    logits, scores = score_clusters(q, index.centroids, C, scale=scale)   # the select counts its own first level
    retrieved, estimated = budgets(WaveIndex(), C)
    top = select_clusters(scores, index.sizes, C, retrieved, estimated)
    chosen, rest = top[..., :retrieved], top[..., retrieved:]
    print(f"context {args.context}: {C} clusters, {retrieved} retrieved, {estimated} estimated per kv head")
    print(f"{'splits':>6}  cluster_attention us  estimate_clusters us")
    for splits in SPLITS:
        attend = graph_time_ms(lambda: cluster_attention(q, index.keys, index.values, index.starts, index.sizes,
                                                         chosen, scale=scale, num_splits=splits))
        estimate = graph_time_ms(lambda: estimate_clusters(logits, index.value_means, index.sizes, rest,
                                                           num_splits=splits))
        print(f"{'auto' if splits is None else splits:>6}  {1e3 * attend:20.1f}  {1e3 * estimate:20.1f}")


if __name__ == "__main__":
    main()
