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

    @property
    def needs_calibration(self) -> bool:
        """Whether the method learns something from calibration text (kvpass.calibration makes it, the store reads
        it): the runtime is then given the loaded calibration, and never runs one itself."""
        return False


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


# AnTKV rates: bits/value -> (sub-vector length, codebook size); bits = log2(codebook size) / sub-vector length.
# Every codebook has at most 256 entries, so a code is one uint8 per sub-vector.
ANTKV_RATES: dict[float, tuple[int, int]] = {4.0: (2, 256), 3.0: (2, 64), 2.0: (4, 256), 1.5: (4, 64),
                                             1.0: (8, 256), 0.75: (8, 64), 0.5: (16, 256), 0.375: (16, 64)}
ANCHOR_SCORES = ("attention", "attention_variance", "bound")
# How AnTKV's key codebooks measure a key's error: plain squared distance, or the expected squared error of the
# query-key score, e^T E[q q^T] e (k-means and encoding in the space whitened by the calibration queries' moment).
ANTKV_KEY_METRICS = ("euclidean", "query")
# Where AnTKV's key codebooks live: before RoPE (keys rotated back by their position, RoPE re-applied when read;
# the better one, docs/antkv.md) or after it (keys as attention sees them).
ANTKV_KEYS = ("pre-rope", "post-rope")
# Which of a prompt's queries score a prompt token: every later query of the prompt (the paper's prefill; the score
# pass costs O(L^2)) or the `window` queries from its own slot on, as a generated token is scored (O(L * window)).
ANTKV_PROMPT_SCORING = ("all", "window")


@dataclasses.dataclass(frozen=True)
class AnTKV(AttentionMethod):
    """Anchor-token-aware vector quantization of the KV cache (arXiv 2506.19505); see docs/antkv.md.

    bits: bits per value, one of ANTKV_RATES (product quantization of keys and values per layer and KV head);
    value_bits: the values' rate when it differs from the keys' (then `bits` is the keys' rate and the average is
        their mean; keys carry the larger error, docs/antkv.md); None: values at `bits` too;
    anchor_ratio: fraction of tokens kept exact, chosen online by the highest Anchor Score;
    window: the newest tokens stay exact until `window` later queries have scored them (then they are encoded
        or become anchors); score: the Anchor Score candidate (ANCHOR_SCORES);
    keys: "pre-rope" or "post-rope" key codebooks (ANTKV_KEYS);
    key_metric: "query" or "euclidean" (ANTKV_KEY_METRICS): what the key codebooks minimize and encoding uses;
        "query" (the expected score error under the calibration queries) won at 1 and 2 bit (docs/antkv.md §6);
    prompt_scoring: "all" or "window" (ANTKV_PROMPT_SCORING): which of a prompt's queries score a prompt token.
    """

    method: ClassVar[str] = "antkv"
    bits: float = 1.0
    anchor_ratio: float = 0.01
    window: int = 32
    score: str = "bound"
    keys: str = "pre-rope"
    value_bits: float | None = None
    key_metric: str = "query"
    prompt_scoring: str = "all"

    def __post_init__(self):
        for name in ("bits", "value_bits"):
            value = getattr(self, name)
            if name == "value_bits" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) not in ANTKV_RATES:
                raise ValueError(f"{name}={value!r} is not an AnTKV rate; use one of {sorted(ANTKV_RATES)}")
            object.__setattr__(self, name, float(value))
        if self.value_bits == self.bits:
            object.__setattr__(self, "value_bits", None)   # one spelling per configuration (names, sections)
        if isinstance(self.anchor_ratio, bool) or not isinstance(self.anchor_ratio, (int, float)) \
                or not 0.0 <= self.anchor_ratio <= 0.5:
            raise ValueError(f"anchor_ratio={self.anchor_ratio!r} must be a fraction in [0, 0.5] (0.01 keeps 1 % of "
                             f"tokens exact)")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window={self.window!r} must be an int >= 1 (recent tokens kept exact while scored)")
        if self.score not in ANCHOR_SCORES:
            raise ValueError(f"score={self.score!r} is not an Anchor Score; use one of {list(ANCHOR_SCORES)}")
        if self.keys not in ANTKV_KEYS:
            raise ValueError(f"keys={self.keys!r}: key codebooks are {' or '.join(map(repr, ANTKV_KEYS))}")
        if self.key_metric not in ANTKV_KEY_METRICS:
            raise ValueError(f"key_metric={self.key_metric!r}: use one of {list(ANTKV_KEY_METRICS)}")
        if self.prompt_scoring not in ANTKV_PROMPT_SCORING:
            raise ValueError(f"prompt_scoring={self.prompt_scoring!r}: use one of {list(ANTKV_PROMPT_SCORING)}")

    def rate(self, part: str) -> tuple[int, int]:
        """(sub-vector length, codebook size) of the "keys" or the "values"."""
        return ANTKV_RATES[self.bits if part == "keys" or self.value_bits is None else self.value_bits]

    @property
    def needs_calibration(self) -> bool:
        return True  # the codebooks


@dataclasses.dataclass(frozen=True)
class KIVI(AttentionMethod):
    """Scalar KV quantization baseline in the style of KIVI (arXiv 2402.02750): keys per channel over groups of
    `group` tokens, values per token, asymmetric min/max at `bits`; the newest `residual` tokens stay exact."""

    method: ClassVar[str] = "kivi"
    bits: int = 2
    group: int = 32
    residual: int = 32

    def __post_init__(self):
        if self.bits not in (2, 4, 8) or isinstance(self.bits, bool):
            raise ValueError(f"bits={self.bits!r}: KIVI quantizes to 2, 4 or 8 bits")
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"group={self.group!r} must be an int >= 1 (tokens sharing a key scale)")
        if isinstance(self.residual, bool) or not isinstance(self.residual, int) or self.residual < 0:
            raise ValueError(f"residual={self.residual!r} must be an int >= 0 (recent tokens kept exact)")


# How the wave index builds and scores its clusters (docs/wave.md §7): "centroid" (RetroInfer: spherical k-means of
# the centred keys, scored by the query against the mean key), "whitened" (Euclidean k-means of the keys whitened by
# the second moment of the prompt's own queries) or "pre-rope" (A2ATS: k-means of the keys rotated back to before
# RoPE, whitened by the calibration queries' second moment; each cluster's pre-RoPE mean is a code scored by the
# query rotated to a fixed distance of `rope_window` tokens). Needs a calibration (kvpass calibrate --attention wave).
WAVE_SCORING = ("centroid", "whitened", "pre-rope")
# How a decode step finds its best clusters: "scan" scores every centroid; "graph" (RetrievalAttention) searches a
# graph of the clusters built from the prompt's queries and scores only the centroids it reaches (docs/wave.md §7).
WAVE_SEARCH = ("scan", "graph")


def _fraction(name: str, value, low: float, high: float, meaning: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name}={value!r} must be a fraction in [{low}, {high}] ({meaning})")
    return float(value)


def _count(name: str, value, low: int, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low} ({meaning})")
    return value


@dataclasses.dataclass(frozen=True)
class WaveIndex(AttentionMethod):
    """Retrieval attention over a clustered KV cache (RetroInfer's wave index, arXiv 2505.02922); docs/wave.md.

    Decode attention is tripartite: exact over the steady zone (the first `sinks` and the last `recent` tokens),
    exact over the tokens of the `retrieval` fraction of clusters that score highest against the query, and
    estimated over the next `estimation` fraction (each cluster one pseudo-token: key = centroid, value = mean,
    weight = size); the rest is skipped. Prompts attend exactly.

    sinks, recent: steady-zone tokens; segment: tokens clustered together (segmented k-means); cluster_size:
    mean tokens per cluster; iterations: k-means iterations; update_every: decode tokens collected past the
    recent window before they are clustered into the index; min_context: tokens a sequence must hold before its
    index is built (shorter ones attend exactly); retrieval, estimation: fractions of the clusters; scoring: how
    the clusters are built and scored (WAVE_SCORING); rope_window: with scoring "pre-rope", the query-key distance
    at which every code is scored (A2ATS's windowed RoPE); search: how a step finds its clusters (WAVE_SEARCH).
    offload: keep the clusters' K/V in pinned CPU memory and a GPU cache of `page`-token pages (the wave buffer)
    holding `buffer` of the indexed tokens; False keeps every page on the GPU.
    """

    method: ClassVar[str] = "wave"
    sinks: int = 4
    recent: int = 64
    segment: int = 8192
    cluster_size: int = 16
    iterations: int = 10
    update_every: int = 1024
    min_context: int = 1024
    retrieval: float = 0.018
    estimation: float = 0.232
    scoring: str = "centroid"
    rope_window: int = 2048
    search: str = "scan"
    offload: bool = False
    buffer: float = 0.1
    page: int = 16

    def __post_init__(self):
        _count("sinks", self.sinks, 0, "first tokens always attended exactly")
        _count("recent", self.recent, 1, "newest tokens always attended exactly")
        _count("cluster_size", self.cluster_size, 1, "mean tokens per k-means cluster")
        _count("segment", self.segment, self.cluster_size, "tokens clustered together; at least cluster_size")
        _count("iterations", self.iterations, 1, "k-means iterations")
        _count("update_every", self.update_every, self.cluster_size,
               "decode tokens clustered into the index at once; at least cluster_size")
        _count("min_context", self.min_context, self.sinks + self.recent + self.cluster_size,
               "tokens before the index is built; at least sinks + recent + cluster_size")
        _fraction("retrieval", self.retrieval, 0.0, 1.0, "clusters attended exactly")
        _fraction("estimation", self.estimation, 0.0, 1.0, "clusters estimated by their centroid")
        if self.retrieval + self.estimation > 1.0:
            raise ValueError(f"retrieval + estimation = {self.retrieval} + {self.estimation} exceeds 1: they are "
                             f"fractions of the same clusters")
        if self.scoring not in WAVE_SCORING:
            raise ValueError(f"scoring={self.scoring!r} is not a wave-index scoring; use one of {list(WAVE_SCORING)}")
        _count("rope_window", self.rope_window, 0, "query-key distance at which pre-RoPE codes are scored")
        if self.search not in WAVE_SEARCH:
            raise ValueError(f"search={self.search!r} is not a wave-index search; use one of {list(WAVE_SEARCH)}")
        if self.search == "graph" and self.scoring == "pre-rope":
            raise ValueError("search='graph' ranks clusters by their mean key, which scoring='pre-rope' does not "
                             "choose by; use search='scan' with pre-rope")
        if not isinstance(self.offload, bool):
            raise ValueError(f"offload={self.offload!r} must be True or False")
        _fraction("buffer", self.buffer, 0.0, 1.0, "share of the indexed tokens the GPU wave buffer holds")
        if self.buffer == 0.0:
            raise ValueError("buffer=0.0 leaves the wave buffer no room; use a fraction in (0, 1]")
        if isinstance(self.page, bool) or self.page not in (8, 16, 32, 64):
            raise ValueError(f"page={self.page!r}: wave-buffer pages hold 8, 16, 32 or 64 tokens")

    @property
    def needs_calibration(self) -> bool:
        return self.scoring == "pre-rope"  # the calibration queries' moments


@dataclasses.dataclass(frozen=True)
class FFNMethod:
    """Base of the FFN method configs."""

    method: ClassVar[str]

    @property
    def needs_calibration(self) -> bool:
        """As AttentionMethod.needs_calibration."""
        return False


@dataclasses.dataclass(frozen=True)
class DenseFFN(FFNMethod):
    """The FFN rewritten into a kvpass op that computes it exactly: tests the FFN rewrite; CHESS plugs in here."""

    method: ClassVar[str] = "dense"


# How CHESS-style thresholds are set (docs/chess.md): "chess" per channel (tau / E|up_i|, EMNLP 2024) or "cats" one
# scalar per layer on |act(gate)| (the CATS baseline, arXiv 2404.08763).
CHESS_RULES = ("chess", "cats")


@dataclasses.dataclass(frozen=True)
class Chess(FFNMethod):
    """Calibrated activation sparsity of every FFN (CHESS, EMNLP 2024); see docs/chess.md.

    The activation feeding the down projection is zeroed where it is below a calibrated threshold, and decode
    kernels skip the weight rows of zeroed channels. sparsity: the fraction of activations zeroed on the
    calibration text; rule: CHESS_RULES; selective: also zero the small inputs of each attention's query and
    output projections (CHESS+; key and value projections are never touched).
    """

    method: ClassVar[str] = "chess"
    sparsity: float = 0.5
    selective: bool = False
    rule: str = "chess"

    def __post_init__(self):
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                or not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"sparsity={self.sparsity!r} must be a fraction in (0, 1) (0.5 zeroes half the FFN "
                             f"activations)")
        object.__setattr__(self, "sparsity", float(self.sparsity))
        if not isinstance(self.selective, bool):
            raise ValueError(f"selective={self.selective!r} must be True or False")
        if self.rule not in CHESS_RULES:
            raise ValueError(f"rule={self.rule!r} is not a threshold rule; use one of {list(CHESS_RULES)}")

    @property
    def needs_calibration(self) -> bool:
        return True  # the thresholds


ATTENTION_METHODS: dict[str, type[AttentionMethod]] = {"dense": Dense, "antkv": AnTKV, "kivi": KIVI,
                                                      "wave": WaveIndex}
FFN_METHODS: dict[str, type[FFNMethod]] = {"dense": DenseFFN, "chess": Chess}


@dataclasses.dataclass(frozen=True)
class Config:
    """What kvpass does to a model.

    attention: the KV-cache method of every attention site (`Dense()`, `AnTKV()`, `KIVI()`, `WaveIndex()`).
    ffn: the FFN method (`DenseFFN()`, `Chess()`), or None to leave FFN sites to Inductor (they are still found
    and counted).
    calibration: path of a calibration artefact for the methods that need one (one file may hold the sections
    of both).
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
