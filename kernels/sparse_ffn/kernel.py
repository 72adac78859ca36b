"""Triton decode kernels of CHESS activation sparsity: an FFN and a linear layer that skip the weight
rows of zeroed channels.

Public entry points: :func:`sparse_ffn` and :func:`sparse_linear`. Their semantics and shapes are those
of :mod:`kvpass.kernels.sparse_ffn.reference`, the ground truth in the tests.

Design
------
Decode at batch 1 is memory-bound: the time is the bytes of weights read. A zeroed channel i needs no
row i of the matrix after the activation (``w_down_t``, ``w_t``) and, in a gated FFN, no row i of
``w_up`` (its product with 0 is 0). Those rows are skipped by **masking whole rows at the load**: a
predicated-off load issues no memory request, so an inactive row costs no traffic. A channel is
*active* when it is non-zero in at least one of the T token rows (the union: every weight row loaded
serves all tokens at once).

* **Tokens** are padded to ``BLOCK_T = 16`` rows, the smallest M of ``tl.dot``; padding rows load
  nothing and are never written. Hence at most 16 tokens (:data:`MAX_TOKENS`).
* **sparse_ffn**, three launches:

  1. ``_ffn_hidden_kernel``, grid ``(cdiv(I, BLOCK_I),)``: a program owns BLOCK_I channels. It reads
     its rows of the first matrix (the gate, or up for a plain MLP) densely, since their product
     decides the mask, over H in tiles of BLOCK_K; adds the bias, applies the activation and the
     thresholds in registers; for a gated FFN it then reads the rows of ``w_up`` of its active
     channels only and multiplies. It writes h (T, I) fp32, 0 where a channel is zeroed.
  2. ``_sparse_rows_kernel``, grid ``(cdiv(Ho, BLOCK_N), splits)``: split-K over the channels. A
     program walks its split's channels in steps of BLOCK_K, loads h for them, and loads the rows of
     ``w_down_t`` (BLOCK_N columns) of those that are non-zero in some token row. It writes its fp32
     partial (T, BLOCK_N) into a (splits, T, Ho) buffer.
  3. ``_sum_splits_kernel`` adds the partials in a fixed order, adds the bias and casts to x's dtype.

  Up and down are not fused into one kernel: a program would then need every output of its channels,
  and an fp32 (T, Ho) accumulator does not fit in registers. One partial per channel block would also
  mean I / BLOCK_I partials of (T, Ho) fp32: 58 MB at T = 8 for Llama-3-8B, against 235 MB of weights
  read at 50 % sparsity. The round trip of h through memory costs T * I * 8 bytes (0.1 % of them).
* **sparse_linear** is kernels 2 and 3: kernel 2 thresholds the input tile in registers.
* **Splits** of kernel 2: enough programs for ``programs_per_sm`` per SM, at least
  ``min_rows_per_split`` rows each; a function of the shapes and the SM count only.
* **Deterministic, no host synchronisation**: no atomics, every output element is summed in a fixed
  order; launch decisions read shapes only (no ``.item()``, no data-dependent shapes), so a CUDA graph
  can capture the calls.
* **Traceable**: traced on CUDA, the launches go through ``torch.library.wrap_triton``, so the ``kvpass::ffn`` and
  ``kvpass::sparse_linear`` ops (``torch.library.triton_op``) are traced into Inductor's graph, which
  launches the kernels from its generated code with no Python op body per call (kvpass/ffn_ops.py). Dummy
  pointers for absent biases are tensors the kernel only reads (never an output: an argument aliasing
  a written one would confuse the mutation analysis).
* **Layout**: any strides are correct; the fast path wants contiguous rows (``w_down_t`` =
  ``w_down.t().contiguous()`` made once, not a transposed view, whose rows are strided).

Precision
---------
When x and every weight share a 16-bit dtype, the products are 16-bit ``tl.dot``\\ s with fp32
accumulation: gate and up equal the reference's up to summation order, and h is rounded to that dtype
before the down product, as a 16-bit dense model does. Otherwise (fp32 or mixed dtypes) the operands
are fp32 and the dots run with ``input_precision="ieee"`` (no TF32; FMA units, slower). Under the CPU
interpreter, bf16 operands are multiplied as fp32 (numpy has no bf16). Activations, thresholds and
biases are fp32. A channel whose |a| is within rounding of its threshold may be kept by one summation
order and zeroed by the other.

Speed (H100 SXM, Triton 3.6, benchmarks/probes/sparse_ffn_bench.py, CUDA-graph replays)
----------------------------------------------------------------------------------------
Llama-3-8B FFN (H = 4096, I = 14336, bf16, SiLU), dense torch 145 us (2.4 TB/s). With the tiles of
:class:`Blocks`, at 50 % sparsity: T = 1 104.6 us (1.38x; the bound at the dense bandwidth is 97 us;
hidden kernel 64.5 us, rows kernel 23.6, split sum 1.9), T = 8 tokens sharing most zeroed channels 108.9 us
(benchmarks/results/probe-sparse-ffn-bench-20261124.txt). The tiles before the rows kernel's second sweep
took 112 / 115 us (rows kernel 29.3 us, the sweep's profile). With the first tiles (32/128/32/128), T = 1 took
124 / 119 / 118 / 117 us at 30 / 50 / 60 / 70 % sparsity, and T = 8 random tokens, whose union of active
channels is ~100 %, 141 us (dense 146). The time stops falling past ~50 %: masking a row skips its
bytes but not its loop step, and the steps of the up half of kernel 1 and of kernel 2 appear bound by
latency rather than bandwidth (the compacting version below, whose steps scale, kept falling).
4096 x 4096 projection (sparse_linear, T = 1, 50 %): 21 us, F.linear 24 us. All these were measured
with the first split sum (see ``_SUM_BLOCK``).

Tried and not kept: compacting the active channels into a list on the device (per-block counts, a
prefix sum and ``tl.cumsum``) and gathering only listed rows, so that loop steps scale too. It did
scale (105 us at 70 %) but its five launches (~14 us of gaps and tails between them) made it slower
at 50 % (118 us with its best tiles), at T = 8 with every channel active (172 us, slower than dense)
and for the projection (27 us).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from ..attention.dense import _check_device, _mma, _sm_count
from ..wave_attention.kernel import _dot_modes
from .reference import check_ffn_inputs, check_linear_inputs

__all__ = ["BLOCKS", "MAX_TOKENS", "Blocks", "sparse_ffn", "sparse_linear"]

MAX_TOKENS = 16   # one tl.dot tile of rows (BLOCK_T); the dense path serves more tokens
_BLOCK_T = 16     # tl.dot's smallest M
# The split sum reads BLOCK_S x BLOCK partials per step. The first version, (1, 1024) and a loop over the
# splits, ran 4 programs that summed the 17 x 4096 partials of T = 1 in 4.8 us (H100 profiler); these sizes
# were NOT measured.
_SUM_BLOCK = 128
_SUM_BLOCK_S = 64
_DEFAULT_SM_COUNT = 132   # H100 SXM; used off CUDA (the CPU interpreter)


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch parameters of the kernels.

    Chosen by one sweep of 10 configurations on an H100 (Llama-3-8B FFN at 50 % sparsity, T = 1 and T = 8
    sharing most zeroed channels; the 4096 x 4096 projection at T = 1): hidden_i 64 with ffn_rows_k 64
    took 112 / 115 us where the first tiles (hidden_i 32, hidden_k 128, rows_k 32, rows_n 128) took
    119 / 120 us; the projection keeps the rows step of 32 (21 us; 24 us with 64). 8 warps, 2 or 4
    stages and 8 programs per SM were slower or no faster. A second sweep of the rows kernel (18 configurations,
    benchmarks/results/probe-sparse-ffn-sweep-20261124.txt, each config's time reproduced within 0.2 us) chose
    rows_n 256 with ffn_rows_k 32: 104 / 110 us against 110 / 113 us, each program reading 512 contiguous
    bytes of an active row instead of 256; rows_n 64 or 512, and 16 or 64 rows per step, were slower.
    """

    hidden_i: int = 64          # channels per program of kernel 1 (224 programs at I = 14336)
    hidden_k: int = 128         # hidden-dim tile of kernel 1: 256 contiguous bytes of a 16-bit row
    ffn_rows_k: int = 32        # channels per step of kernel 2 in sparse_ffn
    linear_rows_k: int = 32     # input channels per step of kernel 2 in sparse_linear
    rows_n: int = 256           # output columns per program of kernel 2
    programs_per_sm: int = 4    # kernel 2 aims for this many programs per SM ...
    min_rows_per_split: int = 256   # ... but gives each split at least this many channels
    num_warps: int = 4
    num_stages: int = 3


BLOCKS = Blocks()   # what the public functions launch with; tests and benchmarks may swap it


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    """ACTIVATIONS[ACTIVATION](z) of reference.py, in fp32."""
    if ACTIVATION == "silu":
        out = z / (1.0 + tl.exp(-z))
    elif ACTIVATION == "gelu":
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        # 0.5 * (1 + tanh(u)) = sigmoid(2u): no tanh needed, and no cancellation near 0.
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        out = z / (1.0 + tl.exp(-2.0 * u))
    else:
        out = tl.maximum(z, 0.0)
    return out


@triton.jit
def _rows_dot_x(X, W, sxt, sxk, swi, swk, t_ok, offs_i, rows_ok, K,
                EVEN_K: tl.constexpr, UPCAST_DOT: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_T, BLOCK_I) fp32 x @ W[offs_i].T over the K columns: X (T, K), W (rows, K); EVEN_K:
    K % BLOCK_K == 0 (no column mask).

    Rows of W that are not rows_ok are masked at the load: never fetched, they count as 0."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + tl.arange(0, BLOCK_T)[:, None] * sxt + offs_k[None, :] * sxk
    # int64: row offsets of a large matrix overflow int32.
    w_ptrs = W + offs_i.to(tl.int64)[:, None] * swi + offs_k[None, :] * swk
    x_step = BLOCK_K * sxk
    w_step = BLOCK_K * swk
    acc = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=t_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=rows_ok[:, None], other=0.0)
        else:
            k_ok = offs_k[None, :] < K - k0
            x = tl.load(x_ptrs, mask=t_ok[:, None] & k_ok, other=0.0)
            w = tl.load(w_ptrs, mask=rows_ok[:, None] & k_ok, other=0.0)
        acc += _mma(x, tl.trans(w), UPCAST_DOT)
        x_ptrs += x_step
        w_ptrs += w_step
    return acc


@triton.jit
def _ffn_hidden_kernel(
    X, W1, B1, W2, B2, THR, HID,
    sxt, sxk, s1i, s1k, s2i, s2k,
    T, H, I,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """h of channels [pid * BLOCK_I, +BLOCK_I) for all tokens.

    Grid: (cdiv(I, BLOCK_I),). X (T, H); W1 (I, H), B1 (I,): the gate if GATED, else up; W2 (I, H),
    B2 (I,): up if GATED (else unused); THR (I,) fp32. Writes HID (T, I) fp32 contiguous:
    a = act(x @ W1.T + B1) where |a| >= THR, else 0, times x @ W2.T + B2 if GATED. The rows of W2 of
    channels zeroed in every token row are not read.
    """
    offs_t = tl.arange(0, BLOCK_T)
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    t_ok = offs_t < T
    i_ok = offs_i < I
    a = _rows_dot_x(X, W1, sxt, sxk, s1i, s1k, t_ok, offs_i, i_ok, H,
                    EVEN_K, UPCAST_DOT, BLOCK_T, BLOCK_I, BLOCK_K)
    if HAS_B1:
        a += tl.load(B1 + offs_i, mask=i_ok, other=0.0).to(tl.float32)[None, :]
    a = _activation(a, ACTIVATION)
    thr = tl.load(THR + offs_i, mask=i_ok, other=0.0)
    keep = (tl.abs(a) >= thr[None, :]) & t_ok[:, None] & i_ok[None, :]
    if GATED:
        active = tl.max(keep.to(tl.int32), 0) > 0
        u = _rows_dot_x(X, W2, sxt, sxk, s2i, s2k, t_ok, offs_i, active, H,
                        EVEN_K, UPCAST_DOT, BLOCK_T, BLOCK_I, BLOCK_K)
        if HAS_B2:
            u += tl.load(B2 + offs_i, mask=i_ok, other=0.0).to(tl.float32)[None, :]
        a = a * u
    tl.store(HID + offs_t[:, None] * I + offs_i[None, :], tl.where(keep, a, 0.0),
             mask=t_ok[:, None] & i_ok[None, :])


@triton.jit
def _sparse_rows_kernel(
    A, W, PART,
    sat, sak, swk, swn,
    T, K, N, rows_per_split, threshold,
    EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Split pid_s of where(|A| >= threshold, A, 0) @ W, columns [pid_n * BLOCK_N, +BLOCK_N).

    Grid: (cdiv(N, BLOCK_N), splits). A (T, K); W (K, N). Split s covers the rows
    [s * rows_per_split, +rows_per_split) of W, rows_per_split a multiple of BLOCK_K; EVEN_K: so is K
    (no row mask). Rows whose thresholded A column is 0 in every token row are masked at the load
    (never fetched). Writes PART (splits, T, N) fp32 contiguous. Unless DOT_FP32, A is rounded to W's
    16-bit dtype for the product.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_ok = offs_t < T
    n_ok = offs_n < N
    lo = pid_s * rows_per_split
    hi = tl.minimum(lo + rows_per_split, K)
    a_ptrs = A + offs_t[:, None] * sat + (lo + offs_k)[None, :] * sak
    # int64: row offsets of a large matrix overflow int32.
    w_ptrs = W + (lo + offs_k).to(tl.int64)[:, None] * swk + offs_n[None, :] * swn
    a_step = BLOCK_K * sak
    w_step = BLOCK_K * swk
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=t_ok[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=t_ok[:, None] & (offs_k[None, :] < hi - k0), other=0.0)
        a = a.to(tl.float32)
        a = tl.where(tl.abs(a) >= threshold, a, 0.0)
        active = tl.max(tl.abs(a), 0) > 0.0
        w = tl.load(w_ptrs, mask=active[:, None] & n_ok[None, :], other=0.0)
        if not DOT_FP32:
            a = a.to(W.dtype.element_ty)
        acc += _mma(a, w, UPCAST_DOT)
        a_ptrs += a_step
        w_ptrs += w_step
    part = PART + (pid_s * T + offs_t)[:, None] * N + offs_n[None, :]
    tl.store(part, acc, mask=t_ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_splits_kernel(PART, BIAS, OUT, splits, size, N, HAS_BIAS: tl.constexpr, BLOCK_S: tl.constexpr,
                       BLOCK: tl.constexpr):
    """OUT = sum over s of PART[s] (+ BIAS) in OUT's dtype, in a fixed order.

    Grid: (cdiv(size, BLOCK),). PART (splits, T, N) fp32 and OUT (T, N) contiguous, size = T * N;
    BIAS (N,) contiguous. BLOCK_S splits are loaded at once (one round trip to memory for the usual
    splits <= BLOCK_S) and reduced by tl.sum, whose tree is fixed at compile time."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < size
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        part = tl.load(PART + s[:, None] * size + offs[None, :], mask=(s < splits)[:, None] & ok[None, :], other=0.0)
        acc += tl.sum(part, 0)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=ok)


def _tracing_on_cuda(x) -> bool:
    """Whether the call is being traced into a graph on CUDA: then the launches go through
    torch.library.wrap_triton, so that the triton_ops calling them are traced into Inductor's graph. Eagerly, a
    wrapped kernel goes through the wrapper's higher-order op on every call, which took ~1 ms per sparse_ffn on an
    H100 (record bench-chess-20261124T033430637248.json); on the CPU interpreter torch 2.11's wrap_triton rejects
    interpreted kernels, and a traced CPU graph never gets here (kvpass.kernels_dispatch takes the dense path).
    Asked once per call (is_fake costs ~2 us)."""
    return x.is_cuda and is_fake(x)


def _launcher(kernel, traced: bool):
    return wrap_triton(kernel) if traced else kernel


def _check_tokens(caller, T):
    if T > MAX_TOKENS:
        raise ValueError(f"{caller} is a decode kernel for at most {MAX_TOKENS} tokens, got T = {T}; "
                         f"use the dense path above that")


def _sparse_matmul(a, w_t, bias, threshold, out_dtype, dot_fp32, upcast_dot, block_k, traced):
    """Kernels 2 and 3: where(|a| >= threshold, a, 0) @ w_t + bias, a (T, K), w_t (K, N), in steps of block_k
    rows; returns a new (T, N) tensor of out_dtype. traced: _tracing_on_cuda of the caller's input."""
    T, K = a.shape
    N = w_t.shape[1]
    blocks = BLOCKS
    out = torch.empty((T, N), dtype=out_dtype, device=a.device)
    col_blocks = triton.cdiv(N, blocks.rows_n)
    sms = _sm_count(a.device.index or 0) if a.device.type == "cuda" else _DEFAULT_SM_COUNT
    splits = max(1, min(triton.cdiv(blocks.programs_per_sm * sms, col_blocks), K // blocks.min_rows_per_split))
    # Whole steps of block_k per split: only the last one can end inside a step.
    rows_per_split = max(1, triton.cdiv(triton.cdiv(K, splits), block_k)) * block_k
    splits = max(1, triton.cdiv(K, rows_per_split))
    part = torch.empty((splits, T, N), dtype=torch.float32, device=a.device)
    _launcher(_sparse_rows_kernel, traced)[(col_blocks, splits)](
        a, w_t, part, *a.stride(), *w_t.stride(), T, K, N, rows_per_split, float(threshold),
        EVEN_K=K % block_k == 0, DOT_FP32=dot_fp32, UPCAST_DOT=upcast_dot, BLOCK_T=_BLOCK_T, BLOCK_K=block_k,
        BLOCK_N=blocks.rows_n, num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    _launcher(_sum_splits_kernel, traced)[(triton.cdiv(T * N, _SUM_BLOCK),)](
        part, part if bias is None else bias.contiguous(), out, splits, T * N, N, HAS_BIAS=bias is not None,
        BLOCK_S=min(triton.next_power_of_2(splits), _SUM_BLOCK_S), BLOCK=_SUM_BLOCK, num_warps=4,
    )
    return out


def sparse_ffn(x, w_up, b_up, w_down_t, b_down, w_gate, b_gate, thresholds, activation):
    """CHESS-sparse FFN for decode (Triton): the result of
    :func:`~kvpass.kernels.sparse_ffn.reference.sparse_ffn_reference`, reading only the rows of w_up
    (gated FFN) and of w_down_t whose channel is kept in at least one token row.

    x: (T, H) fp16/bf16/fp32, T <= MAX_TOKENS; w_up: (I, H); b_up: (I,) or None; w_down_t: (I, Ho),
    the down weight transposed (contiguous for speed); b_down: (Ho,) or None; w_gate: (I, H) or None
    (a plain MLP); b_gate: (I,) or None; thresholds: (I,) fp32, >= 0; activation: a key of
    ``reference.ACTIVATIONS``. Any strides. Returns a new contiguous (T, Ho) tensor of x's dtype.
    """
    T, H, I, Ho = check_ffn_inputs(x, w_up, b_up, w_down_t, b_down, w_gate, b_gate, thresholds, activation)
    _check_tokens("sparse_ffn", T)
    device = _check_device("sparse_ffn", {"x": x, "w_up": w_up, "b_up": b_up, "w_down_t": w_down_t,
                                          "b_down": b_down, "w_gate": w_gate, "b_gate": b_gate,
                                          "thresholds": thresholds})
    if T == 0 or I == 0 or Ho == 0:
        out = torch.zeros((T, Ho), dtype=torch.float32, device=device)
        return (out if b_down is None else out + b_down.float()).to(x.dtype)
    dot_fp32, upcast_dot = _dot_modes(x, [w for w in (w_up, w_down_t, w_gate) if w is not None], device)
    blocks = BLOCKS
    gated = w_gate is not None
    w1, b1 = (w_gate, b_gate) if gated else (w_up, b_up)
    b2 = b_up if gated else None     # a plain MLP reads no second matrix (W2 = w_up is a placeholder)
    thresholds = thresholds.contiguous()
    hidden = torch.empty((T, I), dtype=torch.float32, device=device)
    traced = _tracing_on_cuda(x)
    _launcher(_ffn_hidden_kernel, traced)[(triton.cdiv(I, blocks.hidden_i),)](
        x, w1, thresholds if b1 is None else b1.contiguous(), w_up,
        thresholds if b2 is None else b2.contiguous(), thresholds, hidden,
        *x.stride(), *w1.stride(), *w_up.stride(), T, H, I,
        ACTIVATION=activation, GATED=gated, HAS_B1=b1 is not None, HAS_B2=b2 is not None,
        EVEN_K=H % blocks.hidden_k == 0, UPCAST_DOT=upcast_dot, BLOCK_T=_BLOCK_T, BLOCK_I=blocks.hidden_i,
        BLOCK_K=blocks.hidden_k, num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    return _sparse_matmul(hidden, w_down_t, b_down, 0.0, x.dtype, dot_fp32, upcast_dot, blocks.ffn_rows_k,
                          traced)


def sparse_linear(x, w_t, bias, threshold):
    """CHESS+ linear layer for decode (Triton): the result of
    :func:`~kvpass.kernels.sparse_ffn.reference.sparse_linear_reference`, reading only the rows of w_t
    whose input channel reaches the threshold in at least one token row.

    x: (T, K) fp16/bf16/fp32, T <= MAX_TOKENS; w_t: (K, N), a Linear weight transposed (contiguous for
    speed); bias: (N,) or None; threshold: python float >= 0 (a kernel scalar: no device read). Any
    strides. Returns a new contiguous (T, N) tensor of x's dtype.
    """
    T, K, N = check_linear_inputs(x, w_t, bias, threshold)
    _check_tokens("sparse_linear", T)
    device = _check_device("sparse_linear", {"x": x, "w_t": w_t, "bias": bias})
    if T == 0 or K == 0 or N == 0:
        out = torch.zeros((T, N), dtype=torch.float32, device=device)
        return (out if bias is None else out + bias.float()).to(x.dtype)
    dot_fp32, upcast_dot = _dot_modes(x, [w_t], device)
    return _sparse_matmul(x, w_t, bias, threshold, x.dtype, dot_fp32, upcast_dot, BLOCKS.linear_rows_k,
                          _tracing_on_cuda(x))
