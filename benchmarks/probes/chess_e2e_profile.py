"""Where an end-to-end decode step's time goes with CHESS against the dense FFN (`random:llama:8b` compiled by
kvpass, bf16, H100): the kernels by GPU time and the step's wall time, at each batch, from torch.profiler over a
few decode steps of a kvpass cache random-filled by kvpass.eval.bench (the CHESS thresholds auto-calibrated on
random ids, as in benchmarks/chess_bench.py), after 8 warm-up steps. Written to find why CHESS 0.5 halved
batch-8 tokens/s (BENCHMARKS.md) when its FFN kernel alone matches the dense FFN at batch 8.

    python benchmarks/probes/chess_e2e_profile.py --batch 1 8 --context 4096
"""
from __future__ import annotations

import argparse
import time

import torch


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    import kvpass
    from kvpass.eval import bench
    from kvpass.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama:8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rows", type=int, default=14)
    args = parser.parse_args()
    model, _ = load_model(args.model, dtype=torch.bfloat16, device=args.device)
    for name, config in (("dense", kvpass.Config()), ("chess-0.5", kvpass.Config(ffn=kvpass.Chess(sparsity=0.5)))):
        undo = bench.prepare(model, "kvpass", config, cudagraphs=False)
        try:
            for batch in args.batch:
                step = bench.decode_stepper(model, "kvpass", batch=batch, context=args.context,
                                            capacity=args.context + 64)
                for _ in range(8):            # compiles, calibrates, specialises
                    step()
                _synchronize()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                        torch.profiler.ProfilerActivity.CUDA]) as profile:
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        step()
                    _synchronize()
                    ms = (time.perf_counter() - start) / args.steps * 1e3
                print(f"\n== {name} B{batch} ctx {args.context}: {ms:.2f} ms per step under the profiler", flush=True)
                print(profile.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows,
                                                   max_name_column_width=70), flush=True)
        finally:
            undo()


if __name__ == "__main__":
    main()
