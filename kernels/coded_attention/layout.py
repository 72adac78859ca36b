"""Layout of a vector-quantized (product-quantized) KV store with exact anchor and recent tokens.

The key of slot ``j`` of (batch ``b``, kv head ``h``) is

* ``exact_k[b, h, j - exact_start]`` if ``j >= exact_start`` (the newest tokens, kept exact);
* else ``anchor_k[b, h, anchor_slot[b, h, j]]`` if that index is ``>= 0`` (an anchor token);
* else the concatenation over sub-spaces ``m`` of ``codebook_k[h, m, codes_k[b, h, j, m], :]``,
  rotated by RoPE at position ``j - rotation.position_offset[b]`` when the store has a
  :class:`KeyRotation` (its codes then hold keys from before RoPE; anchors and exact tokens are
  held rotated).

Values likewise, with their own codes and codebook (``Dv`` may differ from ``D``, ``Mv`` from
``Mk``) and the same ``anchor_slot``. The store has ``S`` slots (its capacity); the first
``length = exact_start + P`` hold tokens. Codes and ``anchor_slot`` entries at slots
``>= exact_start`` are never read, nor are the codes of anchor slots, nor unused anchor rows.
Values are not checked (that would synchronize with the GPU): codes of coded slots must be
``< C`` and ``anchor_slot[..., :exact_start]`` in ``[-1, A)``.
"""
from __future__ import annotations

import dataclasses

import torch

__all__ = ["CodedKV", "KeyRotation", "rope_rotate"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# name -> (rank, allowed dtypes) of every tensor field
_FIELDS = {
    "codes_k": (4, (torch.uint8,)),
    "codes_v": (4, (torch.uint8,)),
    "codebook_k": (4, _FLOAT_DTYPES),
    "codebook_v": (4, _FLOAT_DTYPES),
    "anchor_slot": (3, (torch.int16, torch.int32)),
    "anchor_k": (4, _FLOAT_DTYPES),
    "anchor_v": (4, _FLOAT_DTYPES),
    "exact_k": (4, _FLOAT_DTYPES),
    "exact_v": (4, _FLOAT_DTYPES),
}
_MAX_CENTROIDS = 256    # a code is one uint8


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
                inverse: bool = False) -> torch.Tensor:
    """Hugging Face's "rotate half" RoPE, forward or back, computed in fp32, returned in x's dtype.

    x: (B, H, L, D); positions: (B, L) integer; inv_freq: (R/2,), R <= D (R < D: partial rotary). The first
    R dimensions are rotated, d < R/2 paired with d + R/2 at angle position * inv_freq[d], then scaled:
        out[d] = scaling * (x[d] cos - x[d + R/2] sin),  out[d + R/2] = scaling * (x[d + R/2] cos + x[d] sin);
    inverse=True undoes that (rotates by -angle, divides by scaling).
    """
    half = inv_freq.numel()
    angle = positions.to(torch.float32)[:, None, :, None] * inv_freq.to(x.device, torch.float32)  # (B, 1, L, R/2)
    cos, sin = angle.cos(), -angle.sin() if inverse else angle.sin()
    xf = x.float()
    lo, hi, rest = xf[..., :half], xf[..., half : 2 * half], xf[..., 2 * half :]
    factor = 1.0 / scaling if inverse else scaling
    rotated = torch.cat([lo * cos - hi * sin, hi * cos + lo * sin], dim=-1) * factor
    return torch.cat([rotated, rest], dim=-1).to(x.dtype)


@dataclasses.dataclass(frozen=True)
class KeyRotation:
    """RoPE re-applied to coded keys (see :func:`rope_rotate`): inv_freq (R/2,) float32, R <= D and even;
    scaling: python float > 0; position_offset (B,) int32: slot j of row b is at position j - offset[b]
    (the row's left padding)."""

    inv_freq: torch.Tensor
    scaling: float
    position_offset: torch.Tensor

    def positions(self, start: int, stop: int) -> torch.Tensor:
        """(B, stop - start) int64 positions of slots start .. stop - 1."""
        return self.positions_of(torch.arange(start, stop, device=self.position_offset.device))

    def positions_of(self, slots: torch.Tensor) -> torch.Tensor:
        """(B, n) int64 positions of the slots (n,) int64 (a device tensor: no host sync)."""
        return slots[None, :] - self.position_offset.long()[:, None]

    def validate(self, B: int, D: int, device) -> None:
        for name, t, dtype, shape in (("inv_freq", self.inv_freq, torch.float32, None),
                                      ("position_offset", self.position_offset, torch.int32, (B,))):
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 1 or t.device != device \
                    or (shape is not None and tuple(t.shape) != shape):
                got = (tuple(t.shape), t.dtype, str(t.device)) if isinstance(t, torch.Tensor) else type(t).__name__
                where = f" of shape {shape}" if shape else ""
                raise ValueError(f"KeyRotation.{name} must be a 1-D {dtype} tensor{where} on {device}, got {got}")
        if not 1 <= 2 * self.inv_freq.numel() <= D:
            raise ValueError(f"KeyRotation rotates 2 * {self.inv_freq.numel()} dimensions; the head dim is {D}")
        if not isinstance(self.scaling, float) or not self.scaling > 0:
            raise ValueError(f"KeyRotation.scaling must be a python float > 0, got {self.scaling!r}")


@dataclasses.dataclass(frozen=True)
class CodedKV:
    """A product-quantized KV store (see the module doc for the slot rule). Shapes:

    codes_k (B, Hkv, S, Mk), codes_v (B, Hkv, S, Mv): uint8 codes, one per sub-vector;
    codebook_k (Hkv, Mk, Ck, D // Mk), codebook_v (Hkv, Mv, Cv, Dv // Mv): centroids, C <= 256;
    anchor_slot (B, Hkv, S) int16 or int32: -1 for a coded slot, else its row in anchor_k / anchor_v (int16
        addresses up to 32,767 anchor rows at half the bytes per slot);
    anchor_k (B, Hkv, A, D), anchor_v (B, Hkv, A, Dv): exact anchor tokens, A >= 1;
    exact_k (B, Hkv, P, D), exact_v (B, Hkv, P, Dv): exact tokens of slots exact_start + i;
    exact_start: python int, exact_start + P <= S;
    rotation: None, or the :class:`KeyRotation` that turns decoded (pre-RoPE) keys into post-RoPE ones.
    Float tensors may be float16 / bfloat16 / float32, any strides; all on one device.
    """

    codes_k: torch.Tensor
    codes_v: torch.Tensor
    codebook_k: torch.Tensor
    codebook_v: torch.Tensor
    anchor_slot: torch.Tensor
    anchor_k: torch.Tensor
    anchor_v: torch.Tensor
    exact_k: torch.Tensor
    exact_v: torch.Tensor
    exact_start: int
    rotation: KeyRotation | None = None

    @property
    def length(self) -> int:
        """Number of slots holding tokens: exact_start + P."""
        return self.exact_start + self.exact_k.shape[2]

    def tensors(self) -> dict[str, torch.Tensor]:
        """name -> tensor of every tensor field."""
        return {name: getattr(self, name) for name in _FIELDS}

    def validate(self) -> CodedKV:
        """Check ranks, dtypes, shapes and the device; raise ValueError naming the bad field.

        Returns self, so that ``kv = CodedKV(...).validate()`` reads naturally.
        """
        tensors = self.tensors()
        for name, (rank, dtypes) in _FIELDS.items():
            t = tensors[name]
            if not isinstance(t, torch.Tensor) or t.dim() != rank:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"CodedKV.{name} must be a {rank}-D tensor, got {got}")
            if t.dtype not in dtypes:
                raise ValueError(f"CodedKV.{name} must be {' / '.join(map(str, dtypes))}, got {t.dtype}")
        devices = {t.device for t in tensors.values()}
        if len(devices) != 1:
            raise ValueError(f"CodedKV tensors must be on one device, got {sorted(map(str, devices))}")
        B, Hkv, S = self.anchor_slot.shape
        A, P = self.anchor_k.shape[2], self.exact_k.shape[2]
        if A < 1:
            raise ValueError("CodedKV.anchor_k must have at least one row (A >= 1; rows may be unused)")
        for side in ("k", "v"):
            _check_side(side, tensors, B, Hkv, S, A, P)
        start = self.exact_start
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= S - P:
            raise ValueError(f"CodedKV.exact_start = {start!r} must be an int with 0 <= exact_start and "
                             f"exact_start + P <= S (P = {P} exact tokens, capacity S = {S})")
        if self.rotation is not None:
            self.rotation.validate(B, self.anchor_k.shape[3], self.anchor_slot.device)
        return self


def _check_side(side: str, tensors: dict, B: int, Hkv: int, S: int, A: int, P: int) -> None:
    """Shapes of the codes, codebook, anchors and exact tokens of keys (side "k") or values ("v")."""
    codes, codebook = tensors[f"codes_{side}"], tensors[f"codebook_{side}"]
    d, M, C = tensors[f"anchor_{side}"].shape[3], codes.shape[3], codebook.shape[2]
    if M == 0 or d % M != 0:
        raise ValueError(f"head dim {d} (anchor_{side}) is not a multiple of the number of sub-vectors "
                         f"{M} (codes_{side} {tuple(codes.shape)})")
    if not 1 <= C <= _MAX_CENTROIDS:
        raise ValueError(f"codebook_{side} {tuple(codebook.shape)} has {C} centroids per sub-space; "
                         f"uint8 codes address 1 to {_MAX_CENTROIDS}")
    expected = {f"codes_{side}": (B, Hkv, S, M), f"codebook_{side}": (Hkv, M, C, d // M),
                f"anchor_{side}": (B, Hkv, A, d), f"exact_{side}": (B, Hkv, P, d)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"CodedKV.{name} must have shape {shape} (B, Hkv, S = {(B, Hkv, S)} from "
                             f"anchor_slot, A = {A}, P = {P}), got {tuple(tensors[name].shape)}")
