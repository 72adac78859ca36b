"""Decode attention of one layer over an AnTKV store vs a dense fp16/bf16 store (Triton) and torch SDPA.

Llama-3-8B layer shape (32 query / 8 KV heads, head dim 128), batch 1, bf16, random data: the kernels' speed
does not depend on the values. Times are CUDA-event medians (triton.testing.do_bench); bytes are those of the
store representation (codes + anchors + window + codebooks). Each rate runs with pre-RoPE key codes (the store's
default: the kernel rotates decoded keys, Llama-3's RoPE) and without, each with centroids read a sub-vector at
a time (the kernel's choice) and element by element (the earlier gather, "-elementwise"). Writes a JSON record
and prints one table.

    python benchmarks/antkv_kernels.py --contexts 4096 32768 131072 --out benchmarks/results
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F


def coded_store(B, Hkv, S, D, bits, anchor_ratio, window, dtype, device, pre_rope: bool):
    from kvpass.kernels.coded_attention import CodedKV, KeyRotation

    from kvpass.config import ANTKV_RATES

    sub, size = ANTKV_RATES[bits]
    g = torch.Generator(device=device).manual_seed(0)
    anchors = max(1, math.ceil(anchor_ratio * S))
    dtype_map = torch.int16 if anchors + 1 <= torch.iinfo(torch.int16).max else torch.int32   # as the store keeps it
    slot = torch.full((B, Hkv, S), -1, dtype=dtype_map, device=device)
    picked = torch.randperm(S - window, generator=g, device=device)[:anchors]
    slot[:, :, picked] = torch.arange(anchors, dtype=dtype_map, device=device)
    return CodedKV(
        codes_k=torch.randint(0, size, (B, Hkv, S, D // sub), dtype=torch.uint8, device=device, generator=g),
        codes_v=torch.randint(0, size, (B, Hkv, S, D // sub), dtype=torch.uint8, device=device, generator=g),
        codebook_k=torch.randn(Hkv, D // sub, size, sub, dtype=dtype, device=device, generator=g),
        codebook_v=torch.randn(Hkv, D // sub, size, sub, dtype=dtype, device=device, generator=g),
        anchor_slot=slot, anchor_k=torch.randn(B, Hkv, anchors, D, dtype=dtype, device=device, generator=g),
        anchor_v=torch.randn(B, Hkv, anchors, D, dtype=dtype, device=device, generator=g),
        exact_k=torch.randn(B, Hkv, window, D, dtype=dtype, device=device, generator=g),
        exact_v=torch.randn(B, Hkv, window, D, dtype=dtype, device=device, generator=g), exact_start=S - window,
        rotation=KeyRotation(500000.0 ** -(torch.arange(0, D, 2, device=device) / D), 1.0,
                             torch.zeros(B, dtype=torch.int32, device=device)) if pre_rope else None)


def main() -> None:
    import triton
    from kvpass.kernels.attention import attention_over_store
    from kvpass.kernels.coded_attention import attention_over_codes
    from kvpass.kernels.coded_attention import kernel as coded_kernel

    from kvpass.eval.records import write_record

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    parser.add_argument("--bits", type=float, nargs="+", default=[2.0, 1.0, 0.375])
    parser.add_argument("--out", default="runs/bench")
    args = parser.parse_args()
    device, dtype, B, Hq, Hkv, D = "cuda", torch.bfloat16, 1, 32, 8, 128
    scale = D ** -0.5
    rows = []
    print(f"{'context':>8s} {'path':>32s} {'ms':>8s} {'MB held':>9s} {'GB/s':>7s}")
    for S in args.contexts:
        q = torch.randn(B, Hq, 1, D, dtype=dtype, device=device)
        k = torch.randn(B, Hkv, S, D, dtype=dtype, device=device)
        v = torch.randn_like(k)
        dense_bytes = k.nbytes + v.nbytes
        cases = {"sdpa": (lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, scale=scale,
                                                                              enable_gqa=True), dense_bytes),
                 "kvpass-dense": (lambda q=q, k=k, v=v: attention_over_store(q, k, v, scale=scale, causal=True),
                                  dense_bytes)}
        for bits in args.bits:
            for pre_rope in (True, False):
                kv = coded_store(B, Hkv, S, D, bits, 0.01, 32, dtype, device, pre_rope)
                held = sum(t.nbytes for t in kv.tensors().values())
                name = f"antkv-{bits:g}bit" + ("-pre-rope" if pre_rope else "")
                cases[name] = (lambda q=q, kv=kv: attention_over_codes(q, kv, scale=scale, causal=True), held)
                cases[name + "-elementwise"] = cases[name]
        whole_sub_vectors = coded_kernel.whole_sub_vectors
        for name, (fn, held) in cases.items():
            coded_kernel.whole_sub_vectors = ((lambda sub, rot_half: False) if name.endswith("-elementwise")
                                              else whole_sub_vectors)
            ms = triton.testing.do_bench(fn, warmup=25, rep=100)
            rows.append({"context": S, "path": name, "ms": ms, "bytes_held": held, "gb_per_s": held / ms / 1e6})
            print(f"{S:8d} {name:>32s} {ms:8.3f} {held / 1e6:9.1f} {held / ms / 1e6:7.0f}")
        coded_kernel.whole_sub_vectors = whole_sub_vectors
    path = write_record(args.out, "bench antkv-kernels", rows, config=None, model="llama-3-8b layer shape",
                        shape={"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "dtype": "bfloat16", "anchor_ratio": 0.01,
                               "window": 32})
    print(f"record: {path}")


if __name__ == "__main__":
    main()
