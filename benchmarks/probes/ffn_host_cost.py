"""Host time per FFN, the cost that made eager CHESS decode slower than dense (docs/chess.md): a chain of `--depth`
FFN layers so small that their GPU time is negligible (hidden 64, intermediate 128, bf16, one token), called
`--calls` times without a synchronisation, so the time per call is what the host spends launching it; divided by
the depth it is the cost per FFN, the compiled function's own overhead (guards, wrapper) spread over the chain as
a model spreads it over its layers. Three ways of running the chain:

- dense, Inductor: the model's own FFN code (three linears and the gating) compiled by Inductor;
- kvpass::ffn, Inductor: the CHESS op (thresholds, input-major down copy) inside a compiled function: Inductor traces
  through the triton_op and launches its three kernels from generated code;
- kvpass::ffn, eager: the same op called directly, its Python body running every call (what the op cost when it
  was an opaque custom op inside the compiled graph).

Medians of `--rounds` rounds, in microseconds per FFN, interleaved round by round (the host's speed drifts).

    python benchmarks/probes/ffn_host_cost.py
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def per_call_us(fn, calls: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - start) / calls


def main() -> None:
    import kvpass.ffn_ops  # noqa: F401  (registers torch.ops.kvpass.ffn)

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--depth", type=int, default=8)
    args = parser.parse_args()
    hidden, inter = 64, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 1, hidden, device="cuda", generator=g).bfloat16()
    # unit-variance outputs for unit inputs (nn.Linear's scale): the chain neither overflows nor vanishes
    w_gate, w_up = ((torch.randn(inter, hidden, device="cuda", generator=g) / hidden ** 0.5).bfloat16()
                    for _ in range(2))
    w_down = (torch.randn(hidden, inter, device="cuda", generator=g) / inter ** 0.5).bfloat16()
    w_down_t = w_down.t().contiguous()
    thresholds = torch.full((inter,), 0.1, device="cuda")

    def dense(x, w_gate, w_up, w_down):
        for _ in range(args.depth):
            x = F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)
        return x

    def chess(x, w_gate, w_up, w_down, thresholds, w_down_t):
        for _ in range(args.depth):
            x = torch.ops.kvpass.ffn(x, w_up, None, w_down, None, w_gate, None, thresholds, w_down_t, "silu")
        return x

    dense_compiled = torch.compile(dense, fullgraph=True)
    chess_compiled = torch.compile(chess, fullgraph=True)
    ways = {
        "dense, Inductor": lambda: dense_compiled(x, w_gate, w_up, w_down),
        "kvpass::ffn, Inductor": lambda: chess_compiled(x, w_gate, w_up, w_down, thresholds, w_down_t),
        "kvpass::ffn, eager": lambda: chess(x, w_gate, w_up, w_down, thresholds, w_down_t),
    }
    expected = chess(x, w_gate, w_up, w_down, thresholds, w_down_t)
    torch.testing.assert_close(chess_compiled(x, w_gate, w_up, w_down, thresholds, w_down_t), expected)
    times = {name: [] for name in ways}
    for fn in ways.values():
        per_call_us(fn, 20)   # compile and warm up
    for _ in range(args.rounds):
        for name, fn in ways.items():
            times[name].append(per_call_us(fn, args.calls) / args.depth)
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; host time per FFN (us) in chains of "
          f"{args.depth}, median of {args.rounds} rounds of {args.calls} calls")
    for name, values in times.items():
        print(f"{name:24s} {statistics.median(values):7.1f}   (min {min(values):6.1f}, max {max(values):6.1f})")


if __name__ == "__main__":
    main()
