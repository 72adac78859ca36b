"""CHESS as applied by the rewrite: which thresholds each FFN site and projection gets, and the input-major weights
the sparse decode kernels read (docs/chess.md).

The plan is built once per backend from the calibration section and shared by every graph it compiles, so the
device thresholds (and any weight copies) exist once per model, however many graphs (prefill, decode) use them.
The weights are input-major without a copy where `kvpass.compile` re-laid them out in place before the first trace
(`relayout`, kvpass/weight_layout.py); a copy is made only for a weight that was not (a model met by
`model.compile(backend=...)` at its first compile, or one the discovery trace could not see).
"""
from __future__ import annotations

import torch

from ..config import Chess
from ..kernels_dispatch import use_triton


def section_name(method: Chess) -> str:
    """The calibration section of the thresholds (kvpass.calibration.chess writes it)."""
    return f"chess-{method.sparsity:g}"


class ChessPlan:
    """method: the Chess config; tensors: its calibration section ({"layers.<l>.thresholds": (I,), ...})."""

    def __init__(self, method: Chess, tensors: dict[str, torch.Tensor]):
        self.method = method
        self.tensors = tensors
        self._on_device: dict[tuple, torch.Tensor] = {}
        self._copies: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}   # layout key -> (source, copy)
        self._relaid: list[torch.nn.Parameter] = []   # parameters stored input-major in place (relayout)

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

    def wants_ffn(self, layer: int | None, down_weight: torch.Tensor, transposed: bool) -> bool:
        """Whether the sparse kernels will read this FFN's down weight (as stored: Linear (Ho, I), Conv1D (I, Ho))
        input-major: its layer has thresholds and the kernels run where the weight lives."""
        weight = down_weight.t() if transposed else down_weight
        return use_triton(weight) and self.ffn_thresholds(layer, weight.shape[1], weight.device) is not None

    def wants_projection(self, kind: str, layer: int | None, weight: torch.Tensor) -> bool:
        """Whether the sparse kernels will read this query ("q") or output ("o") projection's weight input-major."""
        return self.selective and use_triton(weight) and self.projection_threshold(kind, layer) is not None

    def relayout(self, parameters) -> None:
        """Store each (out, in) parameter input-major in place: its `.data` becomes the transpose of a contiguous
        (in, out) tensor, the same shape with strides (1, out), so `input_major` finds a view and copies nothing.
        One parameter at a time (the transient is one weight). Dynamo guards strides: do it before the first trace.
        `restore_layouts` undoes it."""
        for parameter in parameters:
            if parameter.dim() == 2 and parameter.is_contiguous() and not parameter.t().is_contiguous():
                parameter.data = parameter.data.t().contiguous().t()
                self._relaid.append(parameter)

    def restore_layouts(self) -> None:
        """The re-laid-out parameters row-major again (as the model had them)."""
        for parameter in self._relaid:
            parameter.data = parameter.data.contiguous()
        self._relaid.clear()

    def relaid_out(self) -> int:
        """How many parameters are stored input-major in place."""
        return len(self._relaid)

    def ffn_tensors(self, layer: int | None, down_weight: torch.Tensor, transposed: bool):
        """At rewrite time, what the layer's `kvpass::ffn` reads: (thresholds (I,) fp32, the input-major copy (I, Ho)
        of the down weight or None), or None when the layer has no thresholds for this weight. down_weight: the real
        weight as stored (Linear (Ho, I), Conv1D (I, Ho)); the copy is made (once, now rather than at a decode step
        that may be a CUDA-graph warm-up) only where the sparse kernels run."""
        weight = down_weight.t() if transposed else down_weight
        thresholds = self.ffn_thresholds(layer, weight.shape[1], weight.device)
        if thresholds is None:
            return None
        return thresholds, self.input_major(weight) if use_triton(weight) else None

    def projection_copy(self, weight: torch.Tensor, transposed: bool) -> torch.Tensor | None:
        """At rewrite time: the input-major copy (K, N) of a query/output projection weight as stored, where the
        sparse kernels run (see ffn_tensors), else None."""
        weight = weight.t() if transposed else weight
        return self.input_major(weight) if use_triton(weight) else None

    def nbytes(self) -> int:
        """Bytes of the weight copies held."""
        return sum(copy.numel() * copy.element_size() for _, copy in self._copies.values())
