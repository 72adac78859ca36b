"""Wave index on the GPU: decode attention time per layer vs fp16 SDPA, memory, wave-buffer hit rate, and the
longest context that runs with offload.

Llama-3-8B layer shape (32 query / 8 KV heads, head dim 128), batch 1, fp16, synthetic K/V: keys drawn around
a few hundred random directions (so k-means has structure to find) and queries that drift slowly from step to
step (so consecutive steps want overlapping clusters, as real decoding does). Speed does not depend on the
values; hit rates and keys read do, and are reported for the real model by `kvpass eval` (docs/wave.md).

Times are CUDA-event means (triton.testing.do_bench's default) of one layer's decode attention: the store's whole
tripartite step (scoring, top-k, steady zone, retrieved clusters, estimation, merge, counters), launched
eagerly and replayed as a CUDA graph (the device path has no host sync, so it captures), against
torch SDPA over the dense fp16 cache (enable_gqa) in the same process.

    python benchmarks/wave_bench.py --contexts 32768 131072 524288 --out benchmarks/results
    python benchmarks/wave_bench.py --contexts --longest 262144 --gpu-memory-gib 24 --out benchmarks/results
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from kvpass.eval.bench import graph_time_ms

HQ, HKV, D = 32, 8, 128


def synthetic_kv(length: int, seed: int, dtype=torch.float16, device="cuda"):
    """(1, HKV, length, D) keys around 256 random directions per head, and values; on `device`."""
    g = torch.Generator(device=device).manual_seed(seed)
    directions = torch.randn(HKV, 256, D, device=device, generator=g)
    pick = torch.randint(0, 256, (HKV, length), device=device, generator=g)
    k = torch.empty(1, HKV, length, D, dtype=dtype, device=device)
    v = torch.empty_like(k)
    step = 1 << 16      # in chunks, so a 1M-token context does not need fp32 temporaries of its full size
    for s in range(0, length, step):
        e = min(length, s + step)
        centre = torch.gather(directions, 1, pick[:, s:e, None].expand(-1, -1, D))
        k[0, :, s:e] = (centre + 0.5 * torch.randn(HKV, e - s, D, device=device, generator=g)).to(dtype)
        v[0, :, s:e] = torch.randn(HKV, e - s, D, device=device, generator=g).to(dtype)
    return k, v


def drifting_queries(steps: int, seed: int, dtype=torch.float16, device="cuda"):
    """steps queries (1, HQ, 1, D), each 90 % its predecessor + 10 % fresh noise (renormalized)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, HQ, 1, D, device=device, generator=g)
    out = []
    for _ in range(steps):
        q = 0.9 * q + math.sqrt(1 - 0.81) * torch.randn(1, HQ, 1, D, device=device, generator=g)
        out.append((2.0 * q).to(dtype))
    return out


def loaded_store(method, k, v, layer=0):
    """A wave store holding k, v (its index built), as after a prompt, without running the prompt's attention."""
    from kvpass.methods.wave import WaveStore

    store = WaveStore(method, layer=layer, capacity=k.shape[2] + 4096)
    torch.cuda.synchronize()
    start = time.perf_counter()
    store.load(k, v)
    torch.cuda.synchronize()
    return store, time.perf_counter() - start


def probe_layer(length: int, steps: int, method=None):
    """The probes' setup: a store holding `length` synthetic tokens (seed 0) under `method` (default WaveIndex()),
    the layer's AttentionSpec, and `steps` drifting queries (seed 1)."""
    from kvpass import WaveIndex
    from kvpass.methods.base import AttentionSpec

    k, v = synthetic_kv(length, seed=0)
    store, _ = loaded_store(WaveIndex() if method is None else method, k, v)
    return store, AttentionSpec(scale=D ** -0.5), drifting_queries(steps, seed=1)


def per_layer(length: int, steps: int) -> dict:
    """Decode attention time and bytes of one layer at `length` tokens: SDPA, wave (device), wave (offload)."""
    import triton

    from kvpass import WaveIndex
    from kvpass.methods.base import AttentionSpec

    spec = AttentionSpec(scale=D ** -0.5)
    k, v = synthetic_kv(length, seed=length)
    queries = drifting_queries(steps, seed=1)
    q = queries[0]
    row = {"context": length}
    row["sdpa_ms"] = triton.testing.do_bench(
        lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), warmup=25, rep=200)
    store, row["index_build_s"] = loaded_store(WaveIndex(), k, v)
    row["wave_ms"] = triton.testing.do_bench(lambda store=store: store.tripartite(q, spec), warmup=25, rep=200)
    row["wave_graph_ms"] = graph_time_ms(lambda store=store: store.tripartite(q, spec), rep=200)
    store.reset_stats()             # graph replays add to the device counters only
    for query in queries:
        store.tripartite(query, spec)
    stats = store.stats()
    row.update(keys_exact=stats["keys_exact"], keys_estimated=stats["keys_estimated"], clusters=stats["clusters"])
    dense_bytes = k.nbytes + v.nbytes
    row.update(dense_bytes=dense_bytes, wave_device_bytes=sum(store.nbytes().values()))
    del store
    offload, _ = loaded_store(WaveIndex(offload=True), k, v)
    del k, v
    torch.cuda.empty_cache()
    for query in queries[:8]:               # warm the buffer and the allocator
        offload.tripartite(query, spec)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for query in queries:
        offload.tripartite(query, spec)
    torch.cuda.synchronize()
    row["wave_offload_ms"] = 1e3 * (time.perf_counter() - start) / len(queries)
    parts = offload.nbytes()
    row.update(offload_host_bytes=parts["clustered_kv_host"],
               offload_device_bytes=sum(n for name, n in parts.items() if name != "clustered_kv_host"),
               hit_rate=offload.stats()["hit_rate"])
    row["speedup_vs_sdpa"] = row["sdpa_ms"] / row["wave_graph_ms"]
    return row


def longest(length: int, layers: int, steps: int) -> dict:
    """A `layers`-layer stack of offloaded stores at `length` tokens each: does a decode step run, at what cost."""
    from kvpass import WaveIndex
    from kvpass.methods.base import AttentionSpec

    spec = AttentionSpec(scale=D ** -0.5)
    try:        # does the dense fp16 cache of this context fit in the GPU memory this process may use?
        dense_fits = len([torch.empty(2, HKV, length, D, dtype=torch.float16, device="cuda") for _ in range(layers)]) > 0
    except torch.cuda.OutOfMemoryError:
        dense_fits = False
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    stores, build = [], 0.0
    for layer in range(layers):
        k, v = synthetic_kv(length, seed=layer)
        store, seconds = loaded_store(WaveIndex(offload=True), k, v, layer=layer)
        del k, v
        stores.append(store)
        build += seconds
        print(f"  layer {layer}: index built in {seconds:.1f} s", flush=True)
    queries = drifting_queries(steps, seed=2)
    new_k, new_v = synthetic_kv(steps, seed=99)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for t, q in enumerate(queries):
        for store in stores:
            store.append(new_k[:, :, t : t + 1], new_v[:, :, t : t + 1])
            store.tripartite(q, spec)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    host = sum(s.nbytes()["clustered_kv_host"] for s in stores)
    return {"context": length, "layers": layers, "decode_step_s": seconds, "index_build_s": build,
            "host_bytes": host, "dense_fp16_bytes": layers * 2 * HKV * D * 2 * length,
            "gpu_total_bytes": torch.cuda.get_device_properties(0).total_memory,
            "gpu_peak_bytes": torch.cuda.max_memory_allocated(),
            "hit_rate": sum(s.stats()["hit_rate"] for s in stores) / layers, "dense_fits": dense_fits}


def main() -> None:
    from kvpass.eval.records import write_record

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="*", default=[32768, 131072, 524288])
    parser.add_argument("--steps", type=int, default=64, help="decode steps of drifting queries per context")
    parser.add_argument("--longest", type=int, default=0, help="context of the offloaded multi-layer run (0: skip)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--gpu-memory-gib", type=float, default=0.0,
                        help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction; 0: all)")
    parser.add_argument("--out", default="runs/bench")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.gpu_memory_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory_gib * 2**30 / total))
    rows = []
    print(f"{'context':>8} {'SDPA ms':>8} {'wave ms':>8} {'graph ms':>8} {'x SDPA':>7} {'offload ms':>10} "
          f"{'hit':>5} {'exact %':>8} {'est %':>6} {'dev GB':>7} {'dense GB':>8} {'build s':>7}")
    for length in args.contexts:
        row = per_layer(length, args.steps)
        rows.append(row)
        print(f"{length:>8} {row['sdpa_ms']:8.3f} {row['wave_ms']:8.3f} {row['wave_graph_ms']:8.3f} "
              f"{row['speedup_vs_sdpa']:7.2f} {row['wave_offload_ms']:10.3f} {row['hit_rate']:5.2f} "
              f"{100 * row['keys_exact']:8.2f} {100 * row['keys_estimated']:6.2f} {row['wave_device_bytes'] / 1e9:7.3f} "
              f"{row['dense_bytes'] / 1e9:8.3f} {row['index_build_s']:7.2f}", flush=True)
        torch.cuda.empty_cache()
    extra = {}
    if args.longest:
        result = longest(args.longest, args.layers, steps=8)
        extra["longest"] = {**result, "gpu_memory_cap_gib": args.gpu_memory_gib or None}
        print(f"longest: {result['context']} tokens x {result['layers']} layers ran with offload: "
              f"{result['decode_step_s'] * 1e3:.1f} ms/step (attention only), host {result['host_bytes'] / 2**30:.1f} GiB, "
              f"GPU peak {result['gpu_peak_bytes'] / 2**30:.1f} GiB (cap {args.gpu_memory_gib or 'none'}, device "
              f"{result['gpu_total_bytes'] / 2**30:.1f} GiB); dense "
              f"fp16 KV would need {result['dense_fp16_bytes'] / 2**30:.1f} GiB (fits: {result['dense_fits']}); hit rate "
              f"{result['hit_rate']:.2f}")
    path = write_record(args.out, "bench wave", rows, config=None, model="llama-3-8b shape, synthetic K/V", **extra)
    print(f"record: {path}")


if __name__ == "__main__":
    main()
