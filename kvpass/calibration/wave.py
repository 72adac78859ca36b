"""Wave index with pre-RoPE codes (A2ATS): the calibration queries' second moment per layer and KV head.

A2ATS clusters keys before RoPE in the space whitened by the queries' second moment, so that k-means minimizes
the expected error of the query-key score. The moment is taken here over the calibration text's queries,
rotated back to before RoPE with the layer's own parameters (stored beside it, for the cache to rotate keys
and queries the same way), and summed over each KV head's GQA group:

    layers.{l}.query_moment   (Hkv, D, D) fp32   mean over positions and group heads of q q^T (pre-RoPE)
    layers.{l}.rope_inv_freq  (R/2,) fp32, layers.{l}.rope_scaling (1,)   only for layers with a RoPE
"""
from __future__ import annotations

import torch

from ..config import WaveIndex
from ..kernels.coded_attention import rope_rotate
from ..methods.rope import model_rotations, rotation_tensors
from ..methods.wave import section_name  # the section the store reads
from .artefact import Calibration
from .collect import AttentionCall, run_windows


def section_params(method: WaveIndex) -> dict:
    return {"scoring": method.scoring}


class _MomentCollector:
    """Observer: per layer, the running sum of q q^T of pre-RoPE queries per KV head, and the count."""

    def __init__(self, rotations: dict):
        self.rotations = rotations
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def __call__(self, call: AttentionCall) -> None:
        q, rotation = call.q, self.rotations[call.layer]
        B, Hq, L, D = q.shape
        H = call.k.shape[1]
        if rotation is not None:   # calibration windows are unpadded: slot i is at position i
            q = rope_rotate(q, torch.arange(L, device=q.device).expand(B, -1), *rotation, inverse=True)
        x = q.reshape(B, H, Hq // H * L, D).transpose(0, 1).reshape(H, -1, D).double()
        moment = (x.transpose(-1, -2) @ x).cpu()
        self.sums[call.layer] = self.sums.get(call.layer, 0) + moment
        self.counts[call.layer] = self.counts.get(call.layer, 0) + x.shape[1]


def calibrate_wave(model: torch.nn.Module, windows: torch.Tensor, methods: list[WaveIndex], calibration: Calibration,
                   progress: bool = True) -> None:
    """Run `model` over `windows` (K, L) token ids and add the section of the pre-RoPE query moments."""
    layers = range(model.config.get_text_config().num_hidden_layers)
    collector = _MomentCollector(model_rotations(model, layers, "the wave index codes this model's keys after RoPE"))
    run_windows(model, windows, collector, progress=progress)
    if not collector.sums:
        raise RuntimeError("no attention call was observed while calibrating: the model does not use transformers' "
                           "attention interface, so kvpass cannot calibrate it")
    tensors = {}
    for layer, total in collector.sums.items():
        tensors[f"layers.{layer}.query_moment"] = (total / collector.counts[layer]).float()
        tensors.update(rotation_tensors(layer, collector.rotations[layer]))
    calibration.add_section(section_name(methods[0]), section_params(methods[0]), tensors)   # one section for all
