"""Where the host time of a kvpass decode step goes: cProfile over eager decode steps of a kvpass-compiled model
(`random:llama:8b` by default, a random-filled cache: kvpass.eval.bench.decode_stepper), the functions
with the most own time, then kvpass's own functions by cumulative time.

    python benchmarks/probes/decode_host_profile.py --batch 1 --context 4096 --ffn dense chess
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics

import torch


def main() -> None:
    import kvpass
    from kvpass.eval import bench
    from kvpass.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama:8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ffn", nargs="+", choices=["dense", "chess"], default=["dense", "chess"])
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    model, _ = load_model(args.model, dtype=torch.bfloat16, device=args.device)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for ffn in args.ffn:
        config = kvpass.Config(ffn=kvpass.Chess(sparsity=0.5)) if ffn == "chess" else kvpass.Config()
        undo = bench.prepare(model, "kvpass", config, cudagraphs=False)
        try:
            step = bench.decode_stepper(model, "kvpass", batch=args.batch, context=args.context,
                                        capacity=args.context + 64)
            # 32 warm-up steps: the attention kernel is specialised on the positions' divisibility by 16, so the
            # first steps after a new remainder compile (one compile would swamp the profile).
            for _ in range(32):
                step()
            times = [1e3 * bench.timed_step(step, model.device) for _ in range(args.steps)]
            print(f"\n== ffn {ffn}, B{args.batch} ctx {args.context}: {statistics.median(times):.2f} ms per step "
                  f"(median of {args.steps}, min {min(times):.2f}, max {max(times):.2f}; no profiler)", flush=True)
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.steps):
                step()
            sync()
            profiler.disable()
            stats = pstats.Stats(profiler)
            stats.sort_stats("tottime").print_stats(args.rows)
            stats.sort_stats("cumulative").print_stats("kvpass|kernels", args.rows)
        finally:
            undo()


if __name__ == "__main__":
    main()
