"""Launch parameters of the wave scoring's centroid-logits kernel (kvpass.kernels.wave_attention: centroids per
program and warps), timed by CUDA-graph replay of score_clusters on the wave index's shapes (Llama-3-8B layer: 32
query / 8 kv heads, d 128, fp16 centroids; 8,192 clusters at 128K tokens, 32,768 at 512K). The module's two
constants are set for each run and restored after.

    python benchmarks/probes/wave_score_blocks.py
"""
from __future__ import annotations

import torch

BLOCKS = (32, 64, 128)
WARPS = (2, 4, 8)


def main() -> None:
    from kvpass.eval.bench import graph_time_ms
    from kvpass.kernels.wave_attention import kernel

    saved = kernel._SCORE_BLOCK_C, kernel._SCORE_WARPS
    print(f"{'clusters':>8} {'block':>5} {'warps':>5}  score_clusters us  centroid GB/s")
    try:
        for clusters in (8192, 32768):
            q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.float16)
            centroids = torch.randn(1, 8, clusters, 128, device="cuda", dtype=torch.float16)
            for block in BLOCKS:
                for warps in WARPS:
                    kernel._SCORE_BLOCK_C, kernel._SCORE_WARPS = block, warps
                    ms = graph_time_ms(lambda: kernel.score_clusters(q, centroids, clusters, scale=0.088))
                    print(f"{clusters:8d} {block:5d} {warps:5d}  {1e3 * ms:17.1f}  {centroids.nbytes / ms / 1e6:13.0f}")
    finally:
        kernel._SCORE_BLOCK_C, kernel._SCORE_WARPS = saved


if __name__ == "__main__":
    main()
