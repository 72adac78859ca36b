"""Decode speed of the CHESS kernels against dense torch: a Llama-3-8B FFN (H = 4096, I = 14336, bf16, SiLU) and a
4096 x 4096 projection, at T = 1 and 8 tokens, with achieved bandwidth over the weight bytes each one reads.

    python benchmarks/probes/sparse_ffn_bench.py [--sweep]

Thresholds are per-channel quantiles of |silu(gate(x))| over 512 random calibration tokens (CHESS-style), so a
fresh token has about the target sparsity. Random tokens share few zeroed channels: at T = 8 the union of active
channels is nearly all of them. The "T=8 shared" rows use 8 tokens close to one another (one token plus 5 %
noise), so their zeroed channels mostly coincide, as the kernel's best case at T = 8.
Times are means of triton.testing.do_bench over CUDA-graph replays (no launch overhead); GB/s counts weight bytes
read: the dense gate and, of up and down, the rows of active channels. Then the kernel times of one sparse_ffn
call (profiler); --sweep times a few tile configurations.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F
import triton
from kvpass.kernels.sparse_ffn import kernel as sparse_kernel
from kvpass.kernels.sparse_ffn import sparse_ffn, sparse_ffn_reference, sparse_linear

from kvpass.eval.bench import graph_time_ms

H, I = 4096, 14336
DTYPE = torch.bfloat16
SPARSITIES = (0.3, 0.5, 0.6, 0.7)


def graph_time_us(fn):
    """Mean time of one call of fn (no arguments) replayed from a CUDA graph, in microseconds."""
    return graph_time_ms(fn) * 1e3


def tokens(g, T, shared):
    if shared:
        return (torch.randn(1, H, generator=g, device="cuda") + 0.05 * torch.randn(T, H, generator=g, device="cuda")
                ).to(DTYPE)
    return torch.randn(T, H, generator=g, device="cuda").to(DTYPE)


def setup():
    g = torch.Generator(device="cuda").manual_seed(0)
    w_gate, w_up = (H ** -0.5 * torch.randn(I, H, generator=g, device="cuda")).to(DTYPE), \
        (H ** -0.5 * torch.randn(I, H, generator=g, device="cuda")).to(DTYPE)
    w_down = (I ** -0.5 * torch.randn(H, I, generator=g, device="cuda")).to(DTYPE)
    calib = F.silu(F.linear(tokens(g, 512, False), w_gate).float()).abs()
    thresholds = {s: torch.quantile(calib, s, dim=0).contiguous() for s in SPARSITIES}
    return g, w_gate, w_up, w_down, w_down.t().contiguous(), thresholds


def ffn_rows(g, w_gate, w_up, w_down, w_down_t, thresholds):
    weight_bytes = I * H * DTYPE.itemsize
    rows = []
    for T, shared in ((1, False), (8, False), (8, True)):
        x = tokens(g, T, shared)
        name = f"T={T}" + (" shared" if shared else "")
        dense_us = graph_time_us(lambda: F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down))
        rows.append((f"FFN {name}", "dense", 0.0, 1.0, dense_us, 3 * weight_bytes))
        a = F.silu(F.linear(x, w_gate).float()).abs()
        for s, t in thresholds.items():
            args = (x, w_up, None, w_down_t, None, w_gate, None, t, "silu")
            out = sparse_ffn(*args)
            ref = sparse_ffn_reference(*args)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            active = (a >= t).any(0).float().mean().item()
            us = graph_time_us(lambda: sparse_ffn(*args))
            rows.append((f"FFN {name}", f"sparse (err {err:.1e})", (a < t).float().mean().item(), active, us,
                         (1 + 2 * active) * weight_bytes))
    return rows


def linear_rows(g):
    w = (H ** -0.5 * torch.randn(H, H, generator=g, device="cuda")).to(DTYPE)
    w_t = w.t().contiguous()
    rows = []
    for T in (1, 8):
        x = tokens(g, T, False)
        rows.append((f"linear T={T}", "dense", 0.0, 1.0, graph_time_us(lambda: F.linear(x, w)), H * H * 2))
        threshold = torch.quantile(x.float().abs().flatten(), 0.5).item()
        active = (x.float().abs() >= threshold).any(0).float().mean().item()
        us = graph_time_us(lambda: sparse_linear(x, w_t, None, threshold))
        rows.append((f"linear T={T}", "sparse", 0.5, active, us, active * H * H * 2))
    return rows


def print_rows(rows):
    print(f"{'case':<16} {'kernel':<22} {'zeroed':>7} {'active':>7} {'us':>8} {'GB/s':>7}")
    for case, kind, zeroed, active, us, nbytes in rows:
        print(f"{case:<16} {kind:<22} {zeroed:>7.2f} {active:>7.2f} {us:>8.1f} {nbytes / us / 1e3:>7.0f}")


CANDIDATES = [   # changes to the Blocks defaults of the time (results files name them)
    dict(),
    dict(hidden_i=32, ffn_rows_k=32),       # the first tiles
    dict(hidden_i=64, hidden_k=256, num_warps=8),
    dict(ffn_rows_k=32, rows_n=256),
    dict(num_stages=4),
    dict(programs_per_sm=8, min_rows_per_split=128),
    # the rows kernel (down projection), the slower of the two by bandwidth in the end-to-end profile
    dict(rows_n=64),
    dict(rows_n=64, ffn_rows_k=128),
    dict(ffn_rows_k=128),
    dict(ffn_rows_k=32),
    dict(programs_per_sm=2),
    dict(programs_per_sm=6),
    # wider rows for the rows kernel: 512 B and more of each active row per program
    dict(ffn_rows_k=16, rows_n=256),
    dict(ffn_rows_k=64, rows_n=256),
    dict(ffn_rows_k=16, rows_n=512),
    dict(ffn_rows_k=32, rows_n=512),
    dict(ffn_rows_k=32, rows_n=256, programs_per_sm=8, min_rows_per_split=128),
    dict(),                                 # again, and the best of the first sweep again: run-to-run spread
    dict(ffn_rows_k=32, rows_n=256),
]


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def sweep(g, w_gate, w_up, w_down_t, thresholds):
    """Times sparse_ffn (50 % sparsity; T = 1, and T = 8 shared) and sparse_linear (T = 1) per tile config,
    with the FFN's largest relative error against the reference."""
    t = thresholds[0.5]
    ffn_args = [(x, w_up, None, w_down_t, None, w_gate, None, t, "silu") for x in (tokens(g, 1, False),
                                                                                  tokens(g, 8, True))]
    refs = [sparse_ffn_reference(*args) for args in ffn_args]
    w_t = w_down_t[:H]            # a 4096 x 4096 block: rows of a (K, N) weight
    xl = tokens(g, 1, False)
    thr = torch.quantile(xl.float().abs().flatten(), 0.5).item()
    print(f"{'config':<70} {'T=1':>7} {'T=8sh':>7} {'lin':>7} {'err':>8}")
    for change in CANDIDATES:
        sparse_kernel.BLOCKS = dataclasses.replace(sparse_kernel.Blocks(), **change)
        err = max(rel_err(sparse_ffn(*args), ref) for args, ref in zip(ffn_args, refs))
        times = [graph_time_us(lambda args=args: sparse_ffn(*args)) for args in ffn_args]
        times.append(graph_time_us(lambda: sparse_linear(xl, w_t, None, thr)))
        print(f"{str(change):<70} " + " ".join(f"{us:>7.1f}" for us in times) + f" {err:>8.1e}")
    sparse_kernel.BLOCKS = sparse_kernel.Blocks()


def profile(g, w_gate, w_up, w_down_t, thresholds):
    """Kernel times of sparse_ffn at T = 1, 50 % sparsity (torch profiler, 20 eager calls)."""
    args = (tokens(g, 1, False), w_up, None, w_down_t, None, w_gate, None, thresholds[0.5], "silu")
    sparse_ffn(*args)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            sparse_ffn(*args)
        torch.cuda.synchronize()
    for event in prof.key_averages():
        if event.device_time_total > 0:
            print(f"{event.key[:40]:<40} {event.device_time_total / event.count:>8.1f} us x {event.count // 20}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time a few tile configurations")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "| triton", triton.__version__, "| torch", torch.__version__)
    g, w_gate, w_up, w_down, w_down_t, thresholds = setup()
    print_rows(ffn_rows(g, w_gate, w_up, w_down, w_down_t, thresholds) + linear_rows(g))
    profile(g, w_gate, w_up, w_down_t, thresholds)
    if args.sweep:
        sweep(g, w_gate, w_up, w_down_t, thresholds)


if __name__ == "__main__":
    main()
