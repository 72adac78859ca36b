"""CHESS as applied by the rewrite: which thresholds each FFN site and projection gets, and the input-major weight
copies the sparse decode kernels read (docs/chess.md).

The plan is built once per backend from the calibration section and shared by every graph it compiles, so the
weight copies and device thresholds exist once per model, however many graphs (prefill, decode) use them.
"""
from __future__ import annotations

import torch

from ..calibration.chess import section_name
from ..config import Chess
from ..kernels_dispatch import use_triton


class ChessPlan:
    """method: the Chess config; tensors: its calibration section ({"layers.<l>.thresholds": (I,), ...})."""

    def __init__(self, method: Chess, tensors: dict[str, torch.Tensor]):
        self.method = method
        self.tensors = tensors
        self._on_device: dict[tuple, torch.Tensor] = {}
        self._copies: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}   # layout key -> (source, copy)

    @classmethod
    def from_calibration(cls, method: Chess, calibration) -> ChessPlan:
        return cls(method, calibration.section(section_name(method)))

    @property
    def selective(self) -> bool:
        return self.method.selective

    def ffn_thresholds(self, layer: int | None, channels: int, device: torch.device) -> torch.Tensor | None:
        """(channels,) fp32 thresholds of the layer's FFN on `device` (None: the layer was not calibrated)."""
        key = ("ffn", layer, device)
        if key not in self._on_device:
            per_channel = self.tensors.get(f"layers.{layer}.thresholds")
            if per_channel is None or per_channel.numel() != channels:
                return None
            if self.method.rule == "cats":
                per_channel = torch.full_like(per_channel, float(self.tensors[f"layers.{layer}.cats"]))
            self._on_device[key] = per_channel.to(device, torch.float32)
        return self._on_device[key]

    def projection_threshold(self, kind: str, layer: int | None) -> float | None:
        """The threshold of the query ("q") or output ("o") projection's input (None: not calibrated there)."""
        value = self.tensors.get(f"layers.{layer}.{kind}_input")
        return None if value is None else float(value)

    def input_major(self, weight: torch.Tensor) -> torch.Tensor:
        """weight (out, in) as a contiguous (in, out) tensor: the sparse kernels read whole rows of the input
        channels that survive, which the (out, in) layout scatters. A Conv1D weight already is one (a view comes
        back); a Linear weight is copied once (the copy doubles those weights' bytes; `nbytes` counts them).
        Copies are keyed by storage address and layout, so any alias of the same parameter finds its copy."""
        if weight.t().is_contiguous():
            return weight.t()
        key = (weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype, weight.device)
        if key not in self._copies:
            # The source is kept alive with its copy: its address cannot be reused by another tensor.
            self._copies[key] = (weight, weight.detach().t().contiguous())
        return self._copies[key][1]

    def prepare_ffn(self, layer: int | None, down_weight: torch.Tensor | None, transposed: bool) -> bool:
        """At rewrite time: whether `layer` has thresholds; with the real down weight as stored (Linear (out, in),
        Conv1D (in, out)) on a GPU, also make its copy and device thresholds now rather than at the first decode
        step (which may be a CUDA-graph warm-up)."""
        if f"layers.{layer}.thresholds" not in self.tensors:
            return False
        if down_weight is not None and use_triton(down_weight):
            weight = down_weight.t() if transposed else down_weight
            self.input_major(weight)
            self.ffn_thresholds(layer, weight.shape[1], weight.device)
        return True

    def prepare_projection(self, weight: torch.Tensor | None, transposed: bool) -> None:
        """At rewrite time: the projection weight's copy, made now when its kernels will run (see prepare_ffn)."""
        if weight is not None and use_triton(weight):
            self.input_major(weight.t() if transposed else weight)

    def nbytes(self) -> int:
        """Bytes of the weight copies held."""
        return sum(copy.numel() * copy.element_size() for _, copy in self._copies.values())
