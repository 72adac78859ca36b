"""Does the wave step's side stream pay? One layer's decode step (Llama-3-8B layer shape, synthetic K/V as
benchmarks/wave_bench.py) timed with the steady zone and the estimation on a side stream and with every kernel on
one stream, eagerly launched (triton.testing.do_bench) and replayed from a CUDA graph, alternating the two
settings over several rounds so that drift hits both alike. The store forks only while a CUDA graph is being
captured (this probe's eager rows of the two settings are then the same code); the eager cost of forking was
measured before that rule, with the fork on every GPU step (benchmarks/results/probe-wave-streams-20261123.txt).

    python benchmarks/probes/wave_streams.py --context 131072
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from wave_bench import probe_layer  # noqa: E402


def main() -> None:
    from triton.testing import do_bench

    from kvpass.eval.bench import graph_time_ms
    from kvpass.methods import wave

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    store, spec, (q,) = probe_layer(args.context, 1)
    with_side = wave._side_stream
    settings = {"side stream": with_side, "one stream": lambda index: None}
    print(f"context {args.context}: ms per step")
    print(f"{'round':>5} {'setting':>12} {'eager':>7} {'graph':>7}")
    try:
        for r in range(args.rounds):
            for name, pick in settings.items():
                wave._side_stream = pick
                eager = do_bench(lambda: store.tripartite(q, spec), warmup=25, rep=200)
                graph = graph_time_ms(lambda: store.tripartite(q, spec))
                print(f"{r:5d} {name:>12} {eager:7.3f} {graph:7.3f}")
    finally:
        wave._side_stream = with_side


if __name__ == "__main__":
    main()
