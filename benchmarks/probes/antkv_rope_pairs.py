"""Probe: does putting each RoPE rotation pair (dimensions i and i + D/2 under HF's rotate-half) in one
sub-vector make post-RoPE keys easier to product-quantize? Held-out key SQNR of SmolLM2-135M, layers 2, 15 and
28: codebooks trained on two 1024-token windows of the calibration text, tested on a third, at 1 bit (8-d/256)
and 0.375 bit (16-d/64). CPU, about two minutes.

    python benchmarks/probes/antkv_rope_pairs.py
"""
from __future__ import annotations

import torch

from kvpass.calibration import calibration_windows
from kvpass.calibration.collect import run_windows
from kvpass.methods import pq
from kvpass.models import load_model

LAYERS = (2, 15, 28)


def main() -> None:
    model, tokenizer = load_model("smollm2-135m")
    windows, _ = calibration_windows(model, tokenizer, tokens=3072, seqlen=1024)
    keys = {}
    run_windows(model, windows, lambda call: keys.setdefault(call.layer, []).append(call.k[0])
                if call.layer in LAYERS else None, progress=False)
    D = keys[LAYERS[0]][0].shape[-1]
    orders = {"contiguous": torch.arange(D),
              "rope-pairs": torch.stack([torch.arange(D // 2), torch.arange(D // 2) + D // 2], 1).flatten()}
    for layer in LAYERS:
        train, test = torch.cat(keys[layer][:2], 1), keys[layer][2][None]      # (H, N, D), (1, H, L, D)
        for name, order in orders.items():
            for sub, size in ((8, 256), (16, 64)):
                points = train[..., order]
                H, N, _ = points.shape
                groups = pq.split(points, sub).permute(0, 2, 1, 3).reshape(H * D // sub, N, sub)
                book = pq.weighted_kmeans(groups, torch.ones(groups.shape[:2]), size, 12,
                                          generator=torch.Generator().manual_seed(0)).reshape(H, D // sub, size, sub)
                held_out = test[..., order]
                sqnr = pq.sqnr_db(held_out, pq.decode(pq.encode(held_out, book), book))
                print(f"layer {layer:2d} {name:10s} {sub:2d}-d/{size:3d}: {sqnr:5.2f} dB")


if __name__ == "__main__":
    main()
