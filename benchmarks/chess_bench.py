"""CHESS on the GPU: FFN time per layer and end-to-end decode tokens/s, Llama-3-8B shape, random weights.

Part 1, one layer (hidden 4096, intermediate 14336, bf16): the dense FFN (three cuBLAS GEMVs and the gating, as
the model's own code runs it) against kvpass's thresholded FFN (the fused threshold + sparse kernels), at batch
1 and 8 and several sparsities, with thresholds calibrated on random inputs (kvpass.calibration.chess's own
statistics) and timed on fresh ones; beside them a 4096x4096 projection dense vs CHESS+'s thresholded one. Times
are CUDA-event means (triton.testing.do_bench). "zeroed" is the fraction of activations the thresholds zeroed on
the timed inputs; "rows read" the fraction of intermediate channels active in at least one row of the batch (the
weight rows the kernel reads).

Part 2, end to end: `random:llama:8b` compiled by kvpass (Inductor; `--cudagraphs`: CUDA graphs between the
attention ops, which BENCHMARKS.md's issue-3 baseline found slower than without), decode steps at batch 1 and 8
over a random-filled cache of `--context` tokens, CHESS (+selective) against the dense FFN with their steps
interleaved (two copies of the model; kvpass.eval.bench.interleaved_decode: the host-bound step drifts with the
CPU's speed, so back-to-back runs would compare drifts). The CHESS thresholds are calibrated by the backend on
random token ids (the model has no tokenizer).

    python benchmarks/chess_bench.py --out benchmarks/results              # both parts (--parts ffn | e2e)
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

H, I = 4096, 14336


def layer_weights(seed: int, dtype=torch.bfloat16, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)

    def linear(out_features, in_features):     # nn.Linear's default scale: unit-variance outputs for unit inputs
        return (torch.randn(out_features, in_features, device=device, generator=g) / in_features ** 0.5).to(dtype)

    return linear(I, H), linear(I, H), linear(H, I)   # gate, up, down


def calibrated_thresholds(w_gate, w_up, w_down, sparsities, tokens: int = 2048, seed: int = 1) -> dict:
    """{sparsity: (I,) CHESS thresholds} of this layer from `tokens` random inputs, by kvpass's calibration code."""
    from kvpass.calibration import chess

    recorder = chess.Recorder(tokens_per_call=None)
    x = torch.randn(tokens, H, device=w_up.device, generator=torch.Generator(device=w_up.device).manual_seed(seed))
    for chunk in x.to(w_up.dtype).split(512):
        recorder.ffn(chunk, w_up, None, w_down, None, w_gate, None, None, None, "silu", 0)
    return {s: chess.thresholds(recorder, s)["layers.0.thresholds"].to(w_up.device) for s in sparsities}


def do_bench(fn) -> float:
    """Mean ms of fn after a first call: triton's do_bench sizes its repetitions from one timed call, which
    must not include a JIT compile."""
    from triton.testing import do_bench as bench

    fn()
    torch.cuda.synchronize()
    return bench(fn)


def ffn_table(batches, sparsities) -> list[dict]:
    from kvpass.kernels.sparse_ffn import sparse_ffn, sparse_linear

    from kvpass.methods.ffn import dense_ffn

    w_gate, w_up, w_down = layer_weights(0)
    w_down_t = w_down.t().contiguous()
    thresholds = calibrated_thresholds(w_gate, w_up, w_down, sparsities)
    rows = []
    for batch in batches:
        x = torch.randn(batch, H, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2)).bfloat16()
        dense_ms = do_bench(lambda: dense_ffn(x, w_up, None, w_down, None, w_gate, None, None, "silu"))
        print(f"B{batch} dense FFN {dense_ms * 1e3:7.1f} us ({3 * I * H * 2 / dense_ms / 1e6:6.0f} GB/s)", flush=True)
        rows.append({"part": "ffn", "batch": batch, "sparsity": 0.0, "ms": dense_ms, "kind": "dense"})
        for sparsity in sparsities:
            t = thresholds[sparsity]
            a = F.silu(x.float() @ w_gate.float().t())
            zeroed = float((a.abs() < t).float().mean())
            rows_read = float((a.abs() >= t).any(0).float().mean())
            ms = do_bench(lambda: sparse_ffn(x, w_up, None, w_down_t, None, w_gate, None, t, "silu"))
            got = sparse_ffn(x, w_up, None, w_down_t, None, w_gate, None, t, "silu").float()
            ref = dense_ffn(x.float(), w_up.float(), None, w_down.float(), None, w_gate.float(), None, t, "silu")
            error = float((got - ref).norm() / ref.norm())
            print(f"B{batch} CHESS {sparsity:.1f}: {ms * 1e3:7.1f} us  {dense_ms / ms:5.2f}x dense  zeroed {zeroed:.3f}"
                  f"  rows read {rows_read:.3f}  rel err {error:.1e}", flush=True)
            rows.append({"part": "ffn", "batch": batch, "sparsity": sparsity, "ms": ms, "kind": "chess",
                         "speedup": dense_ms / ms, "zeroed": zeroed, "rows_read": rows_read, "rel_error": error})
        w = (torch.randn(H, H, device="cuda") / H ** 0.5).bfloat16()
        w_t = w.t().contiguous()
        dense_ms = do_bench(lambda: F.linear(x, w))
        threshold = float(x.float().abs().quantile(0.5))
        ms = do_bench(lambda: sparse_linear(x, w_t, None, threshold))
        print(f"B{batch} projection 4096x4096: dense {dense_ms * 1e3:6.1f} us, thresholded at 0.5 {ms * 1e3:6.1f} us "
              f"({dense_ms / ms:4.2f}x)", flush=True)
        rows.append({"part": "projection", "batch": batch, "sparsity": 0.5, "dense_ms": dense_ms, "ms": ms,
                     "speedup": dense_ms / ms})
    return rows


def end_to_end(batches, context: int, steps: int, sparsity: float, cudagraphs: bool) -> list[dict]:
    """Each CHESS configuration against dense, their decode steps interleaved (kvpass.eval.bench.
    interleaved_decode): two copies of the model, one compiled dense, the other with the configuration."""
    import kvpass
    from kvpass.eval import bench
    from kvpass.models import load_model

    dense_model, _ = load_model("random:llama:8b", dtype=torch.bfloat16, device="cuda")
    model, _ = load_model("random:llama:8b", dtype=torch.bfloat16, device="cuda")   # the same weights (seeded)
    configs = {f"chess-{sparsity:g}": kvpass.Config(ffn=kvpass.Chess(sparsity=sparsity)),
               f"chess-{sparsity:g}+selective": kvpass.Config(ffn=kvpass.Chess(sparsity=sparsity, selective=True))}
    undo_dense = bench.prepare(dense_model, "kvpass", kvpass.Config(), cudagraphs=cudagraphs)
    rows = []
    try:
        for name, config in configs.items():
            undo = bench.prepare(model, "kvpass", config, cudagraphs=cudagraphs)
            try:
                for batch in batches:
                    pair = bench.interleaved_decode({"dense": dense_model, name: model}, "kvpass", batch=batch,
                                                    context=context, steps=steps)
                    for label, row in pair.items():
                        row.update(name=label, cudagraphs=cudagraphs, against=name)
                        rows.append(row)
                    row = pair[name]
                    row["weight_copy_gib"] = kvpass.report(model)["chess"]["weight_copy_bytes"] / 2**30
                    print(f"e2e B{batch} interleaved: dense {pair['dense']['tokens_per_s']:7.1f} tok/s "
                          f"({pair['dense']['step_ms']:6.2f} ms/step), {name} {row['tokens_per_s']:7.1f} tok/s "
                          f"({row['step_ms']:6.2f} ms/step): {row['paired_speedup']:5.2f}x dense (median of "
                          f"paired steps)", flush=True)
            finally:
                undo()
    finally:
        undo_dense()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cudagraphs", action="store_true", help="e2e: CUDA graphs between the attention ops")
    parser.add_argument("--parts", nargs="+", choices=["ffn", "e2e"], default=["ffn", "e2e"])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    from kvpass.eval.records import write_record

    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    rows = ffn_table(args.batch, args.sparsity) if "ffn" in args.parts else []
    if "e2e" in args.parts:
        rows += end_to_end(args.batch, args.context, args.steps, 0.5, args.cudagraphs)
    path = write_record(args.out, "bench chess", rows, config=None, model="llama-3-8b shape, random weights",
                        context=args.context, steps=args.steps)
    print(f"record: {path}")
    print(json.dumps({"record": str(path)}))


if __name__ == "__main__":
    main()
