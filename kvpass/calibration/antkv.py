"""AnTKV codebooks: token-aware product-quantization codebooks per layer and KV head.

Keys and values are collected where kvpass's attention op sees them (post-RoPE keys; docs/antkv.md has the
pre- vs post-RoPE measurement) and clustered by weighted k-means. A token's weight is its error-propagation
factor from the attention bound (docs/antkv.md): for keys  scale * sum_i A_ij |q_i| |v_j - o_i|, for values
sum_i A_ij, summed over the calibration queries. The top `ANCHOR_EXCLUDED` tokens by weight are left out:
they are the anchors the method keeps exact, and their weight would otherwise pull whole codebooks.
"""
from __future__ import annotations

import torch

from .._progress import progress as _progress
from ..config import AnTKV
from ..methods import pq
from .artefact import Calibration
from .collect import AttentionCall, run_windows

ANCHOR_EXCLUDED = 0.01
KMEANS_ITERATIONS = 12
# Points per layer, KV head and sub-space: 32 per centroid of a 256-entry codebook. More barely moves the
# codebooks but costs linearly (4-bit codebooks are 2-d: distances to 256 centroids dominate calibration time).
MAX_POINTS = 8192


def section_name(method: AnTKV) -> str:
    return f"antkv-{method.bits:g}bit"


def section_params(method: AnTKV) -> dict:
    return {"bits": method.bits, "sub_vector": method.sub_vector, "codebook_size": method.codebook_size,
            "keys": "post-rope", "kmeans_iterations": KMEANS_ITERATIONS, "max_points": MAX_POINTS,
            "anchor_excluded": ANCHOR_EXCLUDED}


class _Collector:
    """Observer: per layer, keys/values (fp16, CPU) and their error-propagation weights, per KV head."""

    def __init__(self):
        self.keys, self.values, self.key_weights, self.value_weights = {}, {}, {}, {}

    def __call__(self, call: AttentionCall) -> None:
        from ..kernels.anchor_scores import anchor_scores_reference

        stats = anchor_scores_reference(call.q, call.k, call.v, call.lse, call.out, q_start=0, key_start=0,
                                        scale=call.scale, softcap=call.softcap, mask=call.mask)
        for store, tensor in ((self.keys, call.k), (self.values, call.v)):      # (B, Hkv, L, D) -> (Hkv, B*L, D)
            store.setdefault(call.layer, []).append(tensor.transpose(0, 1).flatten(1, 2).half().cpu())
        for store, weight in ((self.key_weights, call.scale * stats[2]), (self.value_weights, stats[0])):
            store.setdefault(call.layer, []).append(weight.transpose(0, 1).flatten(1).cpu())


def _codebook(vectors: torch.Tensor, weights: torch.Tensor, sub: int, size: int, device,
              generator: torch.Generator) -> torch.Tensor:
    """vectors: (H, N, D), weights: (H, N) -> codebook (H, D // sub, size, sub) fp32."""
    H, N, D = vectors.shape
    keep = max(size, int(N * (1 - ANCHOR_EXCLUDED)))
    order = weights.argsort(dim=1)[:, :keep]                         # drop the heaviest (anchor-like) tokens
    if keep > MAX_POINTS:
        order = order[:, torch.randperm(keep, generator=generator)[:MAX_POINTS]]
    points = torch.gather(vectors, 1, order[..., None].expand(-1, -1, D)).to(device, torch.float32)
    w = torch.gather(weights, 1, order).to(device, torch.float32)
    M = D // sub
    groups = pq.split(points, sub).permute(0, 2, 1, 3).reshape(H * M, -1, sub)   # (H*M, n, sub)
    w = w.repeat_interleave(M, dim=0)
    book = pq.weighted_kmeans(groups, w, size, KMEANS_ITERATIONS, generator=generator)
    return book.reshape(H, M, size, sub).cpu()


def calibrate_antkv(model: torch.nn.Module, windows: torch.Tensor, methods: list[AnTKV], calibration: Calibration,
                    progress: bool = True, seed: int = 0) -> None:
    """Run `model` over `windows` (K, L) token ids once and add the codebooks of every rate in `methods` to
    `calibration` (one section per rate)."""
    collector = _Collector()
    run_windows(model, windows, collector, progress=progress)
    if not collector.keys:
        raise RuntimeError("no attention call was observed while calibrating: the model does not use transformers' "
                           "attention interface, so kvpass cannot calibrate it")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    rates = {section_name(m): m for m in methods}
    tensors = {name: {} for name in rates}
    for layer in _progress(sorted(collector.keys), progress, "layers", "k-means"):
        for part, store, weights in (("keys", collector.keys, collector.key_weights),
                                     ("values", collector.values, collector.value_weights)):
            vectors, w = torch.cat(store.pop(layer), dim=1), torch.cat(weights.pop(layer), dim=1)
            for name, method in rates.items():
                tensors[name][f"layers.{layer}.{part}"] = _codebook(vectors, w, method.sub_vector,
                                                                    method.codebook_size, device, generator)
    for name, method in rates.items():
        calibration.add_section(name, section_params(method), tensors[name])
