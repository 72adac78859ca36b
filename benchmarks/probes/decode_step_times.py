"""Every step's wall time, not a summary: eager kvpass decode of `random:llama:8b` at batch 1 over a 4096-token
random-filled cache (kvpass.eval.bench.decode_stepper), CHESS 0.5, dense, CHESS 0.5 again, 40 steps
each with Python's garbage collector as is and 40 with the heap frozen (gc.freeze), to tell host-speed drift
from slow steps of one path.

    python benchmarks/probes/decode_step_times.py
"""
from __future__ import annotations

import gc
import statistics

import torch


def main() -> None:
    import kvpass
    from kvpass.eval import bench
    from kvpass.models import load_model

    model, _ = load_model("random:llama:8b", dtype=torch.bfloat16, device="cuda")
    for ffn in ("chess", "dense", "chess"):
        config = kvpass.Config(ffn=kvpass.Chess(sparsity=0.5)) if ffn == "chess" else kvpass.Config()
        undo = bench.prepare(model, "kvpass", config, cudagraphs=False)
        step = bench.decode_stepper(model, "kvpass", batch=1, context=4096, capacity=4096 + 64)
        for _ in range(32):
            step()
        for freeze in (False, True):
            if freeze:
                gc.collect()
                gc.freeze()
            times = [1e3 * bench.timed_step(step, model.device) for _ in range(40)]
            gc.unfreeze()
            print(ffn, "gc.freeze" if freeze else "default  ", f"median {statistics.median(times):.1f}",
                  " ".join(f"{t:.0f}" for t in times), flush=True)
        undo()


if __name__ == "__main__":
    main()
