"""Which part of the captured decode launch costs time at B8 32K: the fused new token (APPEND), the per-slot
validity loads (valid), the pointer tiles (a loop over TMA tensor descriptors instead), the split count. Each launch is timed as
a replayed CUDA graph (do_bench_cudagraph) over the same static store, beside torch SDPA; registers and spills of
each compiled variant are printed.

    python benchmarks/probes/decode_kernel_variants.py --points 8x32768,1x4096
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kvpass.kernels.attention import dense
from kvpass.kernels.attention.dense import (finish_rows, key_range, keys_ok, load_q, program_rows, query_slots,
                                            scores, softmax_step, visible)


@triton.jit
def _attn_tma_kernel(
    Q, VALID, MASK, OUT, M_PART, L_PART, LSE,
    sqb, sqh, sql, sqd, svalb, svals, smb, smh, smi, smj, sob, soh, sol, sod, slb, slh, sll,
    Hkv, group, Lq, q_start, kv_len, window, num_splits, D, DV, qk_scale, softcap_log2,
    K_DESC, V_DESC, S,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_VALID: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_LSE: tl.constexpr, IS_SPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
    UPCAST_DOT: tl.constexpr, Q_START_ON_DEVICE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """The dense decode loop (no APPEND) with K/V tiles read through host-made tensor descriptors over the
    store viewed as (B * Hkv * S, D) rows (TMA on sm_90: no pointer tiles in registers)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b, hkv, R, rows, row_ok, qi, head = program_rows(pid_m, pid_bh, Hkv, group, Lq, BLOCK_M)
    q = load_q(Q, b, head, qi, row_ok, sqb, sqh, sql, sqd, D, BLOCK_D)
    q_start, kv_len = query_slots(q_start, kv_len, Lq, Q_START_ON_DEVICE)
    q_pos = q_start + qi
    lo, hi = key_range(pid_m, pid_s, R, group, q_start, kv_len, window, num_splits,
                       CAUSAL, HAS_WINDOW, IS_SPLIT, BLOCK_M, BLOCK_N)
    mask_rows = b * smb + head * smh + qi.to(tl.int64) * smi
    offs_t = tl.arange(0, BLOCK_N)
    row0 = pid_bh * S
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + offs_t
        key_ok = keys_ok(VALID, b * svalb, svals, offs_n, hi, HAS_VALID)
        k = tl.where(key_ok[:, None], K_DESC.load([row0 + start, 0]), 0.0)
        s = scores(q, k.to(K_DESC.dtype), qk_scale, softcap_log2, HAS_SOFTCAP, UPCAST_DOT)
        vis = visible(MASK, mask_rows, smj, row_ok, key_ok, offs_n, q_pos, window, CAUSAL, HAS_WINDOW, HAS_MASK)
        v = tl.where(key_ok[:, None], V_DESC.load([row0 + start, 0]), 0.0)
        m_i, l_i, acc = softmax_step(m_i, l_i, acc, s, vis, v.to(V_DESC.dtype), DOT_FP32, UPCAST_DOT)
    finish_rows(OUT, M_PART, L_PART, LSE, acc, m_i, l_i, pid_bh, pid_s, num_splits,
                b, head, qi, rows, row_ok, R, DV, sob, soh, sol, sod, slb, slh, sll, HAS_LSE, IS_SPLIT, BLOCK_DV)


def _registers(kernel) -> str:
    """n_regs / n_spills of every compiled specialization of kernel (Triton's per-device cache)."""
    found = []
    for cache in getattr(kernel, "device_caches", {}).values():
        for compiled in cache[0].values():
            found.append(f"{getattr(compiled, 'n_regs', '?')} regs / {getattr(compiled, 'n_spills', '?')} spills")
    return ", ".join(sorted(set(found))) or "?"


def main() -> None:
    from triton.testing import do_bench_cudagraph

    from kvpass.kernels.attention.reference import check_attention_inputs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default="8x32768,1x4096")
    args = parser.parse_args()
    hq, hkv, d = 32, 8, 128
    for point in args.points.split(","):
        batch, context = (int(x) for x in point.split("x"))
        capacity = context + 84
        gen = torch.Generator(device="cuda").manual_seed(0)
        k = torch.randn(batch, hkv, capacity, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn_like(k)
        q = torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        valid = torch.ones(batch, capacity, dtype=torch.bool, device="cuda")
        slot = torch.tensor([context], device="cuda")
        new_k, new_v = k[:, :, context:context + 1].clone(), v[:, :, context:context + 1].clone()
        kv_bytes = 2 * batch * hkv * (context + 1) * d * 2
        ref = F.scaled_dot_product_attention(q, k[:, :, :context + 1], v[:, :, :context + 1], enable_gqa=True)
        sdpa_ms = do_bench_cudagraph(lambda: F.scaled_dot_product_attention(
            q, k[:, :, :context + 1], v[:, :, :context + 1], enable_gqa=True))
        print(f"\n== B{batch} ctx {context}: SDPA {sdpa_ms * 1e3:.1f} us ({kv_bytes / sdpa_ms / 1e6:.0f} GB/s)",
              flush=True)
        dims = check_attention_inputs(q, k, v, valid, None, scale=d ** -0.5, window=0, softcap=0.0, mask=None)
        for kernel_name in ("pointers", "tma"):
            for append in ((True, False) if kernel_name == "pointers" else (False,)):
                for with_valid in (True, False):
                    for splits in (None, 2, 4, 8, 16):
                        for block_n, warps in ((64, 4), (32, 4), (64, 8)):
                            def config(rows, block_d, fp32, block_n=block_n, warps=warps):
                                return 16, block_n, warps, 3
                            if kernel_name == "pointers":
                                new = (new_k, new_v, *new_k.stride()[:2], new_k.stride(3), *new_v.stride()[:2],
                                       new_v.stride(3)) if append else (None, None, 0, 0, 0, 0, 0, 0)
                                kernel, store_args, meta = dense._attn_fwd_kernel, (
                                    k, v, *k.stride(), *v.stride(), *new), {"APPEND": append}
                            else:
                                kernel, store_args, meta = _attn_tma_kernel, (
                                    TensorDescriptor.from_tensor(k.view(-1, d), [block_n, d]),
                                    TensorDescriptor.from_tensor(v.view(-1, d), [block_n, d]), capacity), {}

                            def run():
                                return dense.launch_attention(
                                    kernel, store_args, meta, {"k": k, "v": v}, q, valid if with_valid else None,
                                    None, dims, scale=d ** -0.5, causal=True, window=0, softcap=0.0,
                                    num_splits=splits, return_lse=False, caller="variants", launch_config=config,
                                    q_start_on_device=slot)
                            try:
                                err = (run().float() - ref.float()).abs().max().item()
                                ms = do_bench_cudagraph(run)
                            except Exception as exc:
                                print(f"{kernel_name} append {append} valid {with_valid} splits {splits} "
                                      f"BLOCK_N {block_n} warps {warps}: {type(exc).__name__} {exc}"[:300])
                                continue
                            print(f"{kernel_name:8s} append {append!s:5} valid {with_valid!s:5} splits {splits!s:>4} "
                                  f"BLOCK_N {block_n:3d} warps {warps}: {ms * 1e3:7.1f} us "
                                  f"{kv_bytes / ms / 1e6:5.0f} GB/s x{sdpa_ms / ms:.2f} of SDPA err {err:.1e}",
                                  flush=True)
        print("registers: pointers", _registers(dense._attn_fwd_kernel), "| tma",
              _registers(_attn_tma_kernel), "| sm count", dense._sm_count(0), flush=True)


if __name__ == "__main__":
    main()
