"""Where a captured dense decode step spends its GPU time, and which launch of the decode attention kernel reads
the store fastest.

--part profile: `random:llama:8b` bf16, kvpass dense (captured) and the fp16 peer at each point (B x fill);
  each one's recorded step replayed under torch.profiler; GPU time per kernel name, per step.
--part prefill: where a 32K-token prefill spends its GPU time, kvpass-compiled against HF's own SDPA forward
  (torch.profiler, top kernels), and torch SDPA's causal prompt attention with enable_gqa against repeated K/V.
--part sweep: the decode attention kernel alone (kernels/attention, q_start on the device, valid and the new
  token given, as the captured step launches it) against torch SDPA over the same static store, Llama-3-8B's heads
  (32 q, 8 kv, dim 128), for several split counts and tile shapes; each timed as a replayed CUDA graph
  (do_bench_cudagraph); GB/s = the K/V bytes below the position over the time. `--no-append` (the new token not
  fused into the launch) and `--no-valid` (no per-slot validity loads) time the launch without either part: at B8
  32K neither explained the step's gap, the split count did (log probe-decode-kernel-variants-20261207-h100.txt;
  a loop over TMA tensor descriptors, timed then too, was no faster than the pointer tiles).

    python benchmarks/probes/decode_attention_tuning.py --part profile
    python benchmarks/probes/decode_attention_tuning.py --part prefill
    python benchmarks/probes/decode_attention_tuning.py --part sweep [--no-append] [--no-valid]
"""
from __future__ import annotations

import argparse
import collections
import itertools

import torch
import torch.nn.functional as F


def _kernel_table(run, repeats: int, title: str) -> None:
    """GPU time per kernel name of `repeats` calls of run(), per call, under torch.profiler."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            run()
        torch.cuda.synchronize()
    totals, counts = collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time
            counts[event.name] += 1
    total = sum(totals.values()) / repeats
    print(f"\n== {title}: GPU kernel time {total / 1e3:.3f} ms per call, {sum(counts.values()) / repeats:.0f} "
          f"kernels per call", flush=True)
    for kernel, us in totals.most_common(25):
        print(f"{us / repeats:9.1f} us/call {counts[kernel] / repeats:5.0f}x  {kernel[:110]}")


def _sdpa_prompt_attention(context: int) -> None:
    from triton.testing import do_bench

    q = torch.randn(1, 32, context, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, context, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    gqa = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    rep = do_bench(lambda: F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                                          is_causal=True))
    print(f"SDPA causal {context}: enable_gqa {gqa:.2f} ms, repeated K/V {rep:.2f} ms", flush=True)


def prefill(context: int) -> None:
    import kvpass
    from kvpass.eval import bench
    from kvpass.models import load_model

    _sdpa_prompt_attention(context)
    model = load_model("random:llama:8b", dtype=torch.bfloat16, device="cuda")[0]
    ids = bench._random_prompt(model, 1, context, 0)
    with torch.no_grad():
        model.forward(ids, use_cache=False, logits_to_keep=1)
        _kernel_table(lambda: model.forward(ids, use_cache=False, logits_to_keep=1), 1, f"HF SDPA forward {context}")
        kvpass.compile(model, kvpass.Config(attention=kvpass.Dense()))
        model.generate(ids, max_new_tokens=1, do_sample=False)
        _kernel_table(lambda: model.generate(ids, max_new_tokens=1, do_sample=False), 1,
                      f"kvpass generate of one token {context}")


def profile(batch: int, context: int, steps: int) -> None:
    import kvpass
    from kvpass.attach import backend_of
    from kvpass.eval import bench
    from kvpass.models import load_model

    model = load_model("random:llama:8b", dtype=torch.bfloat16, device="cuda")[0]
    kvpass.compile(model, kvpass.Config(attention=kvpass.Dense()))
    for name in ("kvpass", "peer"):
        step = bench.decode_stepper(model, name, batch=batch, context=context, capacity=context + 64 + steps)
        for _ in range(12):
            step()
        _kernel_table(step, steps, f"{name} decode step")
        del step
        backend_of(model).runtime.release()
        torch.cuda.empty_cache()


def sweep(points, append: bool = True, with_valid: bool = True) -> None:
    from triton.testing import do_bench_cudagraph

    from kvpass.kernels.attention import dense
    from kvpass.kernels.attention.reference import check_attention_inputs

    hq, hkv, d = 32, 8, 128
    for batch, context in points:
        capacity = context + 64
        gen = torch.Generator(device="cuda").manual_seed(0)
        k = torch.randn(batch, hkv, capacity, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn_like(k)
        q = torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        valid = torch.ones(batch, capacity, dtype=torch.bool, device="cuda")
        slot = torch.tensor([context], device="cuda")
        new_k, new_v = k[:, :, context:context + 1].clone(), v[:, :, context:context + 1].clone()
        kv_bytes = 2 * batch * hkv * (context + 1) * d * 2
        sdpa_ms = do_bench_cudagraph(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        ref = F.scaled_dot_product_attention(q, k[:, :, :context + 1], v[:, :, :context + 1], enable_gqa=True)
        print(f"\n== B{batch} ctx {context}: SDPA over the capacity {sdpa_ms * 1e3:.1f} us "
              f"({kv_bytes * (capacity / (context + 1)) / sdpa_ms / 1e6:.0f} GB/s)", flush=True)
        dims = check_attention_inputs(q, k, v, valid, None, scale=d ** -0.5, window=0, softcap=0.0, mask=None)
        best = None
        for splits, block_n, warps, stages in itertools.product((None, 8, 16, 32, 64, 128), (32, 64, 128),
                                                                (4, 8), (2, 3)):
            def config(rows, block_d, fp32, block_n=block_n, warps=warps, stages=stages):
                return 16, block_n, warps, stages

            new = ((new_k, new_v, *new_k.stride()[:2], new_k.stride(3), *new_v.stride()[:2], new_v.stride(3))
                   if append else (None, None, 0, 0, 0, 0, 0, 0))

            def run():
                return dense.launch_attention(
                    dense._attn_fwd_kernel, (k, v, *k.stride(), *v.stride(), *new),
                    {"APPEND": append}, {"k": k, "v": v}, q, valid if with_valid else None, None,
                    dims, scale=d ** -0.5, causal=True, window=0, softcap=0.0, num_splits=splits, return_lse=False,
                    caller="sweep", launch_config=config, q_start_on_device=slot)
            try:
                err = (run().float() - ref.float()).abs().max().item()
                ms = do_bench_cudagraph(run)
            except Exception as exc:  # a tile shape that does not fit shared memory
                print(f"splits {splits} BLOCK_N {block_n} warps {warps} stages {stages}: {type(exc).__name__}")
                continue
            line = (f"splits {str(splits):>4} BLOCK_N {block_n:3d} warps {warps} stages {stages}: {ms * 1e3:7.1f} us "
                    f"{kv_bytes / ms / 1e6:6.0f} GB/s  x{sdpa_ms / ms:.2f} of SDPA  max err {err:.1e}")
            if best is None or ms < best[0]:
                best = (ms, line)
            if splits is None or ms < 1.15 * best[0]:
                print(line, flush=True)
        print("best:", best[1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("profile", "prefill", "sweep"), required=True)
    parser.add_argument("--points", default="1x4096,1x32768,1x131072,8x32768")
    parser.add_argument("--no-append", action="store_true", help="--part sweep: the new token not fused")
    parser.add_argument("--no-valid", action="store_true", help="--part sweep: no per-slot validity loads")
    args = parser.parse_args()
    points = [tuple(int(x) for x in p.split("x")) for p in args.points.split(",")]
    if args.part == "profile":
        for batch, context in points:
            profile(batch, context, 20)
    elif args.part == "prefill":
        prefill(32768)
    else:
        sweep(points, append=not args.no_append, with_valid=not args.no_valid)


if __name__ == "__main__":
    main()
