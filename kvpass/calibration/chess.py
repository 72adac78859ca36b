"""CHESS thresholds: per-layer statistics of the FFN activations and of the attention projection inputs.

The model runs over the calibration windows compiled with a recording backend: the same pattern matchers that
rewrite the model find every FFN site and each attention's query and output projection, and the recording
backend computes each site exactly while it records (so any family kvpass matches is calibrated, and nothing is
found by module names). Per layer (docs/chess.md):

- gated FFN (SwiGLU, GeGLU): a = act(gate(x)), m_i = E|up_i(x)| over all calibration tokens; the importance of
  a channel on a token is |a_i| * m_i; tau = the s-quantile of the importances; thresholds t_i = tau / m_i, so
  |a_i| < t_i exactly when the importance is below tau (CHESS, EMNLP 2024).
- plain MLP (GELU, ReLU): a = act(up(x)) feeds the down projection directly; the analogous per-channel factor
  is the norm of the down-projection column channel i multiplies, m_i = ||W_down[:, i]||, then as above.
- "cats": one threshold per layer, the s-quantile of |a| (CATS).
- selective (CHESS+): the s-quantile of |x| at the query-projection input and at the output-projection input.

Quantiles are exact (numpy's "linear" rule) over the recorded values; a layer records at most `max_values`
activations per site (tokens sampled uniformly per window with a seeded generator), which bounds memory for
large models while leaving millions of samples per quantile.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._progress import progress as _progress
from ..config import Chess
from ..methods.chess import section_name  # the section the plan reads
from ..methods.ffn import ACTIVATIONS
from .artefact import Calibration

MAX_VALUES = 1 << 22  # per layer and site: 16 MB of fp32 samples, millions per quantile
PLAIN_MLP_FACTOR = "down-column-norm"


def section_params(method: Chess) -> dict:
    return {"sparsity": method.sparsity, "max_values": MAX_VALUES, "plain_mlp_factor": PLAIN_MLP_FACTOR}


class Recorder:
    """The recording backend's observers: FFN activations and projection inputs per layer.

    tokens_per_call: tokens of each call whose values are kept (None: all)."""

    def __init__(self, tokens_per_call: int | None, seed: int = 0):
        self.tokens_per_call = tokens_per_call
        self.generator = torch.Generator().manual_seed(seed)
        self.up_abs_sum: dict[int, torch.Tensor] = {}   # layer -> (I,) float64 sum of |up_i| over all tokens
        self.up_tokens: dict[int, int] = {}
        self.factor: dict[int, torch.Tensor] = {}       # layer -> (I,) plain MLPs: ||W_down[:, i]||
        self.activations: dict[int, list] = {}          # layer -> [(n, I) fp32 |a|]
        self.inputs: dict[tuple[str, int], list] = {}   # ("q"|"o", layer) -> [(n, K) fp32 |x|]

    def _sample(self, rows: torch.Tensor) -> torch.Tensor:
        """rows: (T, C) -> the kept rows, on the CPU."""
        if self.tokens_per_call is not None and rows.shape[0] > self.tokens_per_call:
            keep = torch.randperm(rows.shape[0], generator=self.generator)[: self.tokens_per_call].sort().values
            rows = rows[keep.to(rows.device)]
        return rows.cpu()

    def ffn(self, x, w_up, b_up, w_down, b_down, w_gate, b_gate, thresholds, w_down_t, activation, layer):
        """Signature of kvpass::ffn plus layer: records, then returns the exact FFN (in x's dtype)."""
        act = ACTIVATIONS[activation]
        flat = x.reshape(-1, x.shape[-1]).float()
        up = F.linear(flat, w_up.float(), None if b_up is None else b_up.float())
        if w_gate is not None:
            a = act(F.linear(flat, w_gate.float(), None if b_gate is None else b_gate.float()))
            total = self.up_abs_sum.get(layer, 0)
            self.up_abs_sum[layer] = total + up.abs().sum(0, dtype=torch.float64).cpu()
            self.up_tokens[layer] = self.up_tokens.get(layer, 0) + flat.shape[0]
            hidden = a * up
        else:
            a = hidden = act(up)
            self.factor[layer] = w_down.float().norm(dim=0).double().cpu()
        self.activations.setdefault(layer, []).append(self._sample(a.abs()))
        out = F.linear(hidden, w_down.float(), None if b_down is None else b_down.float())
        return out.to(x.dtype).reshape(*x.shape[:-1], -1)

    def projection(self, x, weight, bias, threshold, w_t, kind, layer):
        """Signature of kvpass::sparse_linear plus kind and layer: records |x|, returns the exact projection."""
        self.inputs.setdefault((kind, layer), []).append(self._sample(x.reshape(-1, x.shape[-1]).float().abs()))
        return F.linear(x, weight, bias)

    def layers(self) -> list[int]:
        return sorted(self.activations)


def _quantile(values: torch.Tensor, q: float) -> float:
    """numpy.quantile(values, q) (linear interpolation) of values of any shape and size (torch.quantile stops at
    2**24 values)."""
    flat = values.flatten()
    position = q * (flat.numel() - 1)
    below = math.floor(position)
    low = flat.kthvalue(below + 1).values
    # The next order statistic without a second selection (each takes ~60 ms on 4M values): low again when it
    # repeats, else the smallest value above it.
    if below + 1 == flat.numel() or int((flat <= low).sum()) >= below + 2:
        high = low
    else:
        high = flat[flat > low].min()
    return float(low) + (float(high) - float(low)) * (position - below)


def thresholds(recorder: Recorder, sparsity: float) -> dict[str, torch.Tensor]:
    """The section tensors for one sparsity: per layer `thresholds` (I,) (CHESS), `channel_factor` (I,) (E|up_i| or
    the down column norm), `cats` (1,), and `q_input` / `o_input` (1,) where those projections were found."""
    tensors = {}
    for layer in recorder.layers():
        a = torch.cat(recorder.activations[layer]).double()
        if layer in recorder.up_abs_sum:
            factor = recorder.up_abs_sum[layer] / recorder.up_tokens[layer]
        else:
            factor = recorder.factor[layer]
        tau = _quantile(a * factor, sparsity)
        # A channel whose factor is 0 contributes nothing: it is always zeroed (threshold +inf).
        per_channel = torch.where(factor > 0, tau / factor, torch.full_like(factor, math.inf))
        tensors[f"layers.{layer}.thresholds"] = per_channel.float()
        tensors[f"layers.{layer}.channel_factor"] = factor.float()
        tensors[f"layers.{layer}.cats"] = torch.tensor([_quantile(a, sparsity)], dtype=torch.float32)
        for kind in ("q", "o"):
            values = recorder.inputs.get((kind, layer))
            if values:
                tensors[f"layers.{layer}.{kind}_input"] = torch.tensor(
                    [_quantile(torch.cat(values), sparsity)], dtype=torch.float32)
    return tensors


def measured_sparsity(recorder: Recorder, tensors: dict[str, torch.Tensor], rule: str = "chess") -> dict:
    """The fraction of `recorder`'s activations (e.g. of held-out text) that a section's thresholds zero:
    {"ffn": mean over layers, "q", "o": the same for the projection inputs (NaN where none), "layers": per layer}."""
    per_layer = {}
    for layer in recorder.layers():
        a = torch.cat(recorder.activations[layer])
        t = tensors[f"layers.{layer}.thresholds"] if rule == "chess" else tensors[f"layers.{layer}.cats"]
        row = {"ffn": float((a < t).double().mean())}
        for kind in ("q", "o"):
            values, threshold = recorder.inputs.get((kind, layer)), tensors.get(f"layers.{layer}.{kind}_input")
            if values and threshold is not None:
                row[kind] = float((torch.cat(values) < threshold).double().mean())
        per_layer[layer] = row
    mean = {kind: float(torch.tensor([row[kind] for row in per_layer.values() if kind in row] or [math.nan]).mean())
            for kind in ("ffn", "q", "o")}
    return {**mean, "layers": per_layer}


def record(model: torch.nn.Module, windows: torch.Tensor, max_values: int = MAX_VALUES,
           progress: bool = True) -> Recorder:
    """Run `model` over `windows` (K, L) token ids (one eager-compiled forward each, no cache) and record."""
    from .recording import recording_backend

    cfg = model.config.get_text_config(decoder=True)
    widest = max(getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size, cfg.hidden_size)
    per_call = max(1, max_values // (widest * len(windows)))
    recorder = Recorder(None if per_call >= windows.shape[1] else per_call)
    forward = torch.compile(model.forward, backend=recording_backend(recorder), dynamic=False)
    device = next(model.parameters()).device
    with torch.no_grad():
        for window in _progress(windows, progress, "windows", "calibration"):
            forward(input_ids=window[None].to(device), use_cache=False)
    if not recorder.activations:
        raise RuntimeError("no FFN site was found while calibrating CHESS: kvpass's FFN patterns match nothing in "
                           "this model (kvpass inspect shows why)")
    return recorder


def calibrate_chess(model: torch.nn.Module, windows: torch.Tensor, methods: list[Chess], calibration: Calibration,
                    progress: bool = True) -> None:
    """Record `model` over `windows` once and add one section per sparsity of `methods` to `calibration`."""
    recorder = record(model, windows, progress=progress)
    for method in {section_name(m): m for m in methods}.values():
        calibration.add_section(section_name(method), section_params(method), thresholds(recorder, method.sparsity))
