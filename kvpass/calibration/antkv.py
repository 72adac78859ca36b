"""AnTKV codebooks: token-aware product-quantization codebooks per layer and KV head.

Keys and values are collected where kvpass's attention op sees them, keys after RoPE; for pre-RoPE key
codebooks (the default, docs/antkv.md has the measurement) each key is rotated back by its position with the
layer's RoPE parameters, which the section stores for the cache to re-apply. Codebooks come from weighted
k-means. A token's weight is its error-propagation
factor from the attention bound (docs/antkv.md): for keys  scale * sum_i A_ij |q_i| |v_j - o_i|, for values
sum_i A_ij, summed over the calibration queries. The top `ANCHOR_EXCLUDED` tokens by weight are left out:
they are the anchors the method keeps exact, and their weight would otherwise pull whole codebooks.

With `key_metric="query"` the key codebooks minimize the expected squared score error e^T E[q q^T] e instead of
|e|^2: the collector also sums the queries' second moment per KV head, in the keys' space (pre-RoPE queries
rotated back by their own position, the zero-distance term of the score's rotation), and k-means runs in the
space whitened by each sub-space's block of it (`pq.whiten`), which the section stores for encoding:

    layers.{l}.key_whitening   (Hkv, M, sub, sub) fp32
"""
from __future__ import annotations

import torch

from .._progress import progress as _progress
from ..config import AnTKV
from ..kernels.coded_attention import rope_rotate
from ..methods import pq
from ..methods.antkv import section_name  # the section the store reads
from ..methods.rope import model_rotations, rotation_tensors
from .artefact import Calibration
from .collect import AttentionCall, run_windows

ANCHOR_EXCLUDED = 0.01
KMEANS_ITERATIONS = 12
# Points per layer, KV head and sub-space: 32 per centroid of a 256-entry codebook. More barely moves the
# codebooks but costs linearly (4-bit codebooks are 2-d: distances to 256 centroids dominate calibration time).
MAX_POINTS = 8192


def section_params(method: AnTKV) -> dict:
    return {"bits": method.bits, "sub_vector": method.rate("keys")[0], "codebook_size": method.rate("keys")[1],
            **({} if method.value_bits is None else {"value_bits": method.value_bits,
                                                     "value_sub_vector": method.rate("values")[0],
                                                     "value_codebook_size": method.rate("values")[1]}),
            **({} if method.key_metric == "euclidean" else {"key_metric": method.key_metric}),
            "keys": method.keys, "kmeans_iterations": KMEANS_ITERATIONS, "max_points": MAX_POINTS,
            "anchor_excluded": ANCHOR_EXCLUDED}


class _Collector:
    """Observer: per layer, the keys in each of `key_modes` ("post-rope": as attention sees them; "pre-rope":
    rotated back by `rotations[layer]`, when not None), the values (fp16, CPU) and their error-propagation
    weights, per KV head. Calibration windows are unpadded: slot i is at position i."""

    def __init__(self, key_modes, rotations: dict | None = None, query_moments: bool = False):
        self.rotations = rotations
        self.keys = {mode: {} for mode in key_modes}
        self.values, self.key_weights, self.value_weights = {}, {}, {}
        # (layer, key mode) -> [sum of q q^T per KV head (Hkv, D, D) fp64, count], when a method wants them
        self.query_moments = {} if query_moments else None

    def __call__(self, call: AttentionCall) -> None:
        from ..kernels.anchor_scores import anchor_scores_reference

        stats = anchor_scores_reference(call.q, call.k, call.v, call.lse, call.out, q_start=0, key_start=0,
                                        scale=call.scale, softcap=call.softcap, mask=call.mask)
        parts = [(self.values, call.v)]
        for mode, store in self.keys.items():
            rotation = self.rotations[call.layer] if mode == "pre-rope" else None
            if rotation is not None:
                positions = torch.arange(call.k.shape[2], device=call.k.device).expand(call.k.shape[0], -1)
            parts.append((store, call.k if rotation is None else rope_rotate(call.k, positions, *rotation,
                                                                              inverse=True)))
            if self.query_moments is not None:
                q = call.q if rotation is None else rope_rotate(call.q, positions, *rotation, inverse=True)
                B, Hq, L, D = q.shape
                H = call.k.shape[1]
                x = q.reshape(B, H, Hq // H * L, D).transpose(0, 1).reshape(H, -1, D).double()
                total = self.query_moments.setdefault((call.layer, mode), [0, 0])
                total[0] = total[0] + (x.transpose(-1, -2) @ x).cpu()
                total[1] += x.shape[1]
        for store, tensor in parts:                                             # (B, Hkv, L, D) -> (Hkv, B*L, D)
            store.setdefault(call.layer, []).append(tensor.transpose(0, 1).flatten(1, 2).half().cpu())
        for store, weight in ((self.key_weights, call.scale * stats[2]), (self.value_weights, stats[0])):
            store.setdefault(call.layer, []).append(weight.transpose(0, 1).flatten(1).cpu())


def _codebook(vectors: torch.Tensor, weights: torch.Tensor, sub: int, size: int, device,
              generator: torch.Generator, whitening: torch.Tensor | None = None) -> torch.Tensor:
    """vectors: (H, N, D), weights: (H, N) -> codebook (H, D // sub, size, sub) fp32; whitening: None, or
    (H, D // sub, sub, sub) W: k-means of x @ W (centroids mapped back by W^-1)."""
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
    if whitening is not None:
        white = whitening.to(device).reshape(H * M, sub, sub)
        groups = groups @ white
    book = pq.weighted_kmeans(groups, w, size, KMEANS_ITERATIONS, generator=generator)
    if whitening is not None:
        book = torch.linalg.solve(white.transpose(1, 2), book.transpose(1, 2)).transpose(1, 2)   # c' W^-1
    return book.reshape(H, M, size, sub).cpu()


def calibrate_antkv(model: torch.nn.Module, windows: torch.Tensor, methods: list[AnTKV], calibration: Calibration,
                    progress: bool = True, seed: int = 0) -> None:
    """Run `model` over `windows` (K, L) token ids once and add the codebooks of every rate in `methods` to
    `calibration` (one section per rate)."""
    layers = range(model.config.get_text_config().num_hidden_layers)
    key_modes = {m.keys for m in methods}
    rotations = (model_rotations(model, layers, "AnTKV quantizes this model's keys after RoPE")
                 if "pre-rope" in key_modes else None)
    collector = _Collector(key_modes, rotations, query_moments=any(m.key_metric == "query" for m in methods))
    run_windows(model, windows, collector, progress=progress)
    if not collector.values:
        raise RuntimeError("no attention call was observed while calibrating: the model does not use transformers' "
                           "attention interface, so kvpass cannot calibrate it")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    rates = {section_name(m): m for m in methods}
    tensors = {name: {} for name in rates}
    for layer in _progress(sorted(collector.values), progress, "layers", "k-means"):
        key_weights = torch.cat(collector.key_weights.pop(layer), 1)
        value_weights = torch.cat(collector.value_weights.pop(layer), 1)
        keys = {mode: torch.cat(store.pop(layer), 1) for mode, store in collector.keys.items()}
        values = torch.cat(collector.values.pop(layer), 1)
        for part, w in (("keys", key_weights), ("values", value_weights)):
            for name, method in rates.items():
                vectors = keys[method.keys] if part == "keys" else values
                whitening = None
                if part == "keys" and method.key_metric == "query":
                    total, count = collector.query_moments[(layer, method.keys)]
                    whitening = pq.whiten(total / count, method.rate("keys")[0])
                    tensors[name][f"layers.{layer}.key_whitening"] = whitening
                tensors[name][f"layers.{layer}.{part}"] = _codebook(vectors, w, *method.rate(part), device,
                                                                    generator, whitening)
        for name, method in rates.items():
            if method.keys == "pre-rope":
                tensors[name].update(rotation_tensors(layer, rotations[layer]))
    for name, method in rates.items():
        calibration.add_section(name, section_params(method), tensors[name])
