"""Validated configuration dataclasses: one per method, and the `Config` that combines them.

A config is data: it is validated when it is built (a bad value raises `ValueError` naming the value and
the allowed range), it round-trips through `to_dict`/`from_dict`, and `kvpass.backend(config)` applies it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

_STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype | str | None) -> str | None:
    if dtype is None:
        return None
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in _STORAGE_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not a supported cache storage dtype; use one of "
                         f"{sorted(_STORAGE_DTYPES)} or None (the model's own dtype)")
    return name


@dataclasses.dataclass(frozen=True)
class AttentionMethod:
    """Base of the attention (KV-cache) method configs."""

    method: ClassVar[str]


@dataclasses.dataclass(frozen=True)
class Dense(AttentionMethod):
    """Exact attention over a runtime-owned KV cache; the reference every other method is measured against.

    dtype: storage dtype of the cache (e.g. float16 under an fp32 model); None keeps the model's dtype.
    """

    method: ClassVar[str] = "dense"
    dtype: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else _STORAGE_DTYPES[self.dtype]


@dataclasses.dataclass(frozen=True)
class FFNMethod:
    """Base of the FFN method configs."""

    method: ClassVar[str]


@dataclasses.dataclass(frozen=True)
class DenseFFN(FFNMethod):
    """The FFN rewritten into a kvpass op that computes it exactly: tests the FFN rewrite; CHESS plugs in here."""

    method: ClassVar[str] = "dense"


ATTENTION_METHODS: dict[str, type[AttentionMethod]] = {"dense": Dense}
FFN_METHODS: dict[str, type[FFNMethod]] = {"dense": DenseFFN}


@dataclasses.dataclass(frozen=True)
class Config:
    """What kvpass does to a model.

    attention: the KV-cache method of every attention site (`Dense()`; later AnTKV, WaveIndex).
    ffn: the FFN method, or None to leave FFN sites to Inductor (they are still found and counted).
    calibration: path of a calibration artefact for methods that need one.
    """

    attention: AttentionMethod = dataclasses.field(default_factory=Dense)
    ffn: FFNMethod | None = None
    calibration: str | None = None

    VERSION: ClassVar[int] = 1

    def __post_init__(self):
        if not isinstance(self.attention, AttentionMethod):
            raise ValueError(f"attention={self.attention!r} is not an attention method; use one of "
                             f"{[cls.__name__ + '()' for cls in ATTENTION_METHODS.values()]}")
        if self.ffn is not None and not isinstance(self.ffn, FFNMethod):
            raise ValueError(f"ffn={self.ffn!r} is not an FFN method; use None or one of "
                             f"{[cls.__name__ + '()' for cls in FFN_METHODS.values()]}")
        if self.calibration is not None and not isinstance(self.calibration, str):
            raise ValueError(f"calibration={self.calibration!r} must be a file path (str) or None")

    def to_dict(self) -> dict[str, Any]:
        def method(m):
            return None if m is None else {"method": m.method, **dataclasses.asdict(m)}

        return {"version": self.VERSION, "attention": method(self.attention), "ffn": method(self.ffn),
                "calibration": self.calibration}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        if data.get("version") != cls.VERSION:
            raise ValueError(f"config version={data.get('version')!r} is not supported; this kvpass reads "
                             f"version {cls.VERSION}")

        def method(entry, table, what):
            if entry is None:
                return None
            entry = dict(entry)
            name = entry.pop("method")
            if name not in table:
                raise ValueError(f"{what} method={name!r} is unknown; known: {sorted(table)}")
            return table[name](**entry)

        return cls(attention=method(data["attention"], ATTENTION_METHODS, "attention"),
                   ffn=method(data.get("ffn"), FFN_METHODS, "ffn"), calibration=data.get("calibration"))
