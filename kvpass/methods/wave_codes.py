"""Pre-RoPE key codes for the wave index (A2ATS, scoring="pre-rope").

RoPE spreads keys of the same content over rotations that depend on their positions, so clusters of post-RoPE
keys mix content with position. A2ATS clusters the keys rotated back to before RoPE and scores each cluster's
pre-RoPE mean (its code) with the query rotated as if every key sat `window` tokens before it:

    q_post . k_post = a^T R(j - p) b s^2            (a, b: pre-RoPE query and key; p, j: their positions;
                    ~ (s^2 R(w) a) . b               s: the RoPE scaling; exact when p - j = w)
    s^2 R(w) a = rope_rotate(q_post, w - p)          (one rotation of the post-RoPE query per step)

The codes are learned in the space whitened by the second moment of those rotated queries, E[q_w q_w^T] =
R(w) M R(w)^T for the calibration's pre-RoPE query moment M, so that k-means minimizes the expected score error.
The codes only choose the clusters: exact attention over the retrieved ones reads the post-RoPE keys, and the
estimated ones are weighted by the exact logits of their mean post-RoPE key (as in the other scorings), since a
windowed score is only right for keys at the window distance.
"""
from __future__ import annotations

import torch

from ..kernels.coded_attention import rope_rotate
from .wave_index import whitening


class PreRopeCodes:
    """One layer's rotation between post- and pre-RoPE space, and its whitening.

    moment: (H, D, D) fp32 second moment of the calibration's pre-RoPE queries per KV head; rotation: (inv_freq
    (R/2,), scaling) of the layer's RoPE, None when it has none (codes are then the keys themselves); window:
    the query-key distance every code is scored at. `offsets` (B,) int64 must be set before use: a row's slot s
    holds position s - offsets[b] (its left padding).
    """

    def __init__(self, moment: torch.Tensor, rotation: tuple[torch.Tensor, float] | None, window: int):
        self.moment, self.rotation, self.window = moment, rotation, window
        self.offsets: torch.Tensor | None = None

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        if self.rotation is None:
            return x
        inv_freq, scaling = self.rotation
        return rope_rotate(x, positions, inv_freq, scaling, inverse=inverse)

    def keys(self, k: torch.Tensor, first_slot: int) -> torch.Tensor:
        """Pre-RoPE keys of k (B, H, n, D), the post-RoPE keys of slots first_slot .. first_slot + n - 1."""
        slots = torch.arange(first_slot, first_slot + k.shape[2], device=k.device)
        return self._rotate(k, slots[None, :] - self.offsets.to(k.device)[:, None], inverse=True)

    def query(self, q: torch.Tensor, slot: int) -> torch.Tensor:
        """The scoring query of q (B, Hq, 1, D), the post-RoPE query of `slot`: rotated to position
        window - p, so its dot product with a code is the score of a key `window` tokens before it."""
        positions = self.window - (slot - self.offsets.to(q.device))
        return self._rotate(q, positions[:, None])

    def whitening(self, batch: int, device) -> torch.Tensor:
        """W (B, H, D, D) of the scoring queries' second moment R(w) M R(w)^T (wave_index.whitening)."""
        H, D, _ = self.moment.shape
        moment = self.moment.to(device)[None]                          # (1, H, D, D): rows are vectors
        if self.rotation is not None:
            at_window = torch.full((1, D), self.window, device=device)
            moment = self._rotate(self._rotate(moment, at_window).transpose(-1, -2), at_window)
        return whitening(moment.expand(batch, H, D, D).contiguous())
