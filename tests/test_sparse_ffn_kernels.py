"""CHESS sparse FFN and sparse linear: Triton kernels vs their fp32 PyTorch references.

Runs on a GPU, or on CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
when there is no GPU). Errors are relative Frobenius errors ||out - ref|| / ||ref|| (<= 1e-4 for
fp32, 1e-2 fp16, 2e-2 bf16).

Thresholds are chosen from the activations computed in fp64, each at least a relative 1e-3 away from
every |a| of its channel: the kernels sum in another order than torch, so a channel within rounding of
its threshold could flip, and here none is. Weight rows the kernels must not read are NaN: the rows of
w_up (gated) and w_down_t of channels zeroed in every token row, the rows of w_t of inputs below the
threshold in every row, and the padding around every weight (each one is a view into a larger
NaN-filled tensor). A leak shows up as NaN.

Under the interpreter a kernel's time grows with its programs times their loop steps, so the large
shapes run with larger tiles there (:data:`LARGE_TILES`: the same kernels, other constexprs); the
small shapes, and every test on a GPU, run the shipped tiles.
"""
from __future__ import annotations

import os

import pytest
import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not torch.cuda.is_available() and not _INTERPRET:
    pytest.skip("Triton kernels need a CUDA GPU; on CPU run with TRITON_INTERPRET=1 in the environment",
                allow_module_level=True)
pytest.importorskip("triton")

from kvpass.kernels.sparse_ffn import (
    MAX_DECODE_TOKENS,
    sparse_ffn,
    sparse_ffn_reference,
    sparse_linear,
    sparse_linear_reference,
)
from kvpass.kernels.sparse_ffn import kernel as sparse_kernel

from kvpass.methods.ffn import ACTIVATIONS, dense_ffn

DEVICE = "cpu" if _INTERPRET else "cuda"
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
TOLERANCE = {F32: 1e-4, F16: 1e-2, BF16: 2e-2}
NAN = float("nan")
MARGIN = 1e-3   # relative distance of every threshold from every |a| of its channel
LARGE_TILES = sparse_kernel.Blocks(hidden_i=64, hidden_k=256, ffn_rows_k=64, linear_rows_k=64, rows_n=256,
                                    min_rows_per_split=1024)


@pytest.fixture
def large_tiles(monkeypatch):
    if _INTERPRET:
        monkeypatch.setattr(sparse_kernel, "BLOCKS", LARGE_TILES)


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def padded(w, column_major):
    """w (R, C) as a view into a larger NaN-filled tensor (row-major, or column-major storage)."""
    R, C = w.shape
    if column_major:
        big = torch.full((C + 3, R + 5), NAN, dtype=w.dtype)
        big[:C, :R] = w.t()
        return big.t()[:R, :C].to(DEVICE)
    big = torch.full((R + 5, C + 3), NAN, dtype=w.dtype)
    big[:R, :C] = w
    return big[:R, :C].to(DEVICE)


def thresholds_apart(mag, sparsity, g):
    """(C,) fp32 thresholds for magnitudes mag (T, C) fp64: about a `sparsity` fraction of mag falls below
    its channel's threshold (a global quantile spread by a random factor per channel), and each threshold
    lies in a gap of its channel's values, at least a relative MARGIN from every one of them."""
    base = torch.quantile(mag.flatten(), sparsity).item()
    t = base * torch.exp(0.5 * torch.randn(mag.shape[1], generator=g, dtype=torch.float64))
    for _ in range(100):
        below = torch.where(mag <= t, mag, 0.0).amax(0)               # the gap around t: (below, above)
        above = torch.where(mag > t, mag, float("inf")).amin(0)
        t = torch.where(below > 0, (below * above).sqrt(), above / 2)  # its geometric middle ...
        t = torch.where(torch.isinf(above), torch.where(below > 0, 2 * below, base), t)   # ... or past its end
        narrow = ((mag - t).abs() <= MARGIN * mag).any(0)
        if not narrow.any():
            return t.float()
        t = torch.where(narrow, above, t)                               # try the next gap
    raise AssertionError("no thresholds apart from the activations")


def ffn_case(seed, H, I, T, dtype, activation, gated, bias, sparsity):
    """Random inputs (x (T, H), w_up (I, H), b_up, w_down (Ho=H, I) transposed, b_down, w_gate, b_gate) in
    dtype on the CPU, the fp64 activation magnitudes |a| (T, I) that are thresholded, and thresholds."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype)

    x = rand(T, H)
    w_up, w_down_t = rand(I, H, scale=H ** -0.5), rand(I, H, scale=I ** -0.5)
    w_gate = rand(I, H, scale=H ** -0.5) if gated else None
    b_up, b_gate, b_down = (rand(I, scale=0.5), rand(I, scale=0.5) if gated else None, rand(H)) if bias \
        else (None, None, None)
    first, first_b = (w_gate, b_gate) if gated else (w_up, b_up)
    z = x.double() @ first.double().t() + (0 if first_b is None else first_b.double())
    mag = ACTIVATIONS[activation](z).abs()
    thresholds = thresholds_apart(mag, sparsity, g) if sparsity > 0 else torch.zeros(I)
    return (x, w_up, b_up, w_down_t, b_down, w_gate, b_gate), mag, thresholds


def on_device(tensors):
    return tuple(None if t is None else t.to(DEVICE) for t in tensors)


def check_ffn(inputs, mag, thresholds, activation, column_major=False):
    """sparse_ffn on NaN-padded weights whose never-needed rows are NaN vs the reference on clean ones."""
    x, w_up, b_up, w_down_t, b_down, w_gate, b_gate = inputs
    ref = sparse_ffn_reference(*on_device(inputs), thresholds.to(DEVICE), activation)
    off = (mag < thresholds.double()).all(0)            # zeroed in every token row
    down = padded(w_down_t, column_major)
    down[off] = NAN
    up = padded(w_up, column_major)
    if w_gate is not None:
        up[off] = NAN                                   # a plain MLP reads up densely: its output is thresholded
    gate = None if w_gate is None else padded(w_gate, column_major)
    x, b_up, b_down, b_gate = on_device((x, b_up, b_down, b_gate))
    out = sparse_ffn(x, up, b_up, down, b_down, gate, b_gate, thresholds.to(DEVICE), activation)
    assert out.shape == ref.shape and out.dtype == x.dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= TOLERANCE[x.dtype]
    return out, ref, off


# --- sparse_ffn ----------------------------------------------------------------------------------

@pytest.mark.parametrize("H, I, T, dtype, activation, gated, bias, column_major, sparsity", [
    (576, 1536, 1, F32, "silu", True, False, False, 0.5),
    (576, 1536, 3, BF16, "gelu_tanh", True, True, True, 0.5),
    (576, 1536, 5, F16, "gelu", False, True, True, 0.5),
    (576, 1536, 16, F32, "relu", False, False, False, 0.8),      # the most tokens a kernel takes
    (200, 333, 2, F16, "silu", True, True, False, 0.6),          # no size a multiple of a tile
])
def test_sparse_ffn_matches_reference(H, I, T, dtype, activation, gated, bias, column_major, sparsity):
    inputs, mag, thresholds = ffn_case(H + I + T, H, I, T, dtype, activation, gated, bias, sparsity)
    _, _, off = check_ffn(inputs, mag, thresholds, activation, column_major)
    assert 0 < off.sum() < I     # some rows skipped, some read


@pytest.mark.parametrize("H, I, T, dtype, activation, gated, bias, column_major, sparsity", [
    (896, 4864, 8, F16, "silu", True, True, False, 0.6),
    (896, 4864, 1, BF16, "relu", False, False, True, 0.5),
    (4096, 1536, 3, BF16, "silu", True, False, False, 0.5),
    (576, 14336, 8, F32, "gelu_tanh", True, True, False, 0.7),
    # Llama-3-8B at batch 8, on a GPU only: 80 s under CI's interpreter, and the shapes above already take each
    # dimension past its tiles (H 4096, I 14336)
    pytest.param(4096, 14336, 8, BF16, "silu", True, False, False, 0.5,
                 marks=pytest.mark.skipif(DEVICE == "cpu", reason="Llama-3-8B's FFN: on a GPU only")),
])
def test_sparse_ffn_matches_reference_large(large_tiles, H, I, T, dtype, activation, gated, bias, column_major,
                                            sparsity):
    inputs, mag, thresholds = ffn_case(H + I + T, H, I, T, dtype, activation, gated, bias, sparsity)
    check_ffn(inputs, mag, thresholds, activation, column_major)


@pytest.mark.parametrize("activation, gated, dtype", [("silu", True, BF16), ("relu", False, F32)])
def test_zero_thresholds_give_the_dense_ffn(activation, gated, dtype):
    inputs, mag, thresholds = ffn_case(7, 576, 1536, 3, dtype, activation, gated, True, 0.0)
    out, _, off = check_ffn(inputs, mag, thresholds, activation)
    assert not off.any()
    f32 = [None if t is None else t.float() for t in on_device(inputs)]
    dense = dense_ffn(f32[0], f32[1], f32[2], f32[3].t(), f32[4], f32[5], f32[6], None, activation)
    assert rel_err(out, dense) <= TOLERANCE[dtype]


@pytest.mark.parametrize("gated, bias", [(True, True), (False, False)])
def test_thresholds_above_every_activation_give_the_down_bias(gated, bias):
    """Every channel zeroed: no row of w_up or w_down_t is read (all NaN) and out = b_down (or 0)."""
    inputs, mag, _ = ffn_case(11, 576, 1536, 8, F16, "gelu_tanh" if gated else "gelu", gated, bias, 0.0)
    thresholds = (2 * mag.amax(0)).float()
    out, _, off = check_ffn(inputs, mag, thresholds, "gelu_tanh" if gated else "gelu")
    assert off.all()
    b_down = inputs[4]
    expected = torch.zeros_like(out) if b_down is None else b_down.to(DEVICE).expand_as(out)
    assert torch.equal(out, expected)


def test_sparse_ffn_is_deterministic():
    inputs, mag, thresholds = ffn_case(3, 576, 1536, 8, BF16, "silu", True, True, 0.5)
    args = (*on_device(inputs), thresholds.to(DEVICE), "silu")
    assert torch.equal(sparse_ffn(*args), sparse_ffn(*args))


# --- sparse_linear -------------------------------------------------------------------------------

@pytest.mark.parametrize("K, N, T, dtype, bias, column_major, sparsity", [
    (576, 333, 1, F32, True, False, 0.5),
    (896, 1001, 3, BF16, False, True, 0.5),
    (4096, 257, 8, F16, True, False, 0.7),
    (333, 77, 16, F32, False, False, 0.9),       # no size a multiple of a tile, the most tokens
])
def test_sparse_linear_matches_reference(K, N, T, dtype, bias, column_major, sparsity):
    g = torch.Generator().manual_seed(K + N + T)
    x = torch.randn(T, K, generator=g).to(dtype)
    w_t = (K ** -0.5 * torch.randn(K, N, generator=g)).to(dtype)
    b = torch.randn(N, generator=g).to(dtype).to(DEVICE) if bias else None
    # x itself is compared (no sum precedes it): kernel and reference agree on every channel, at any threshold.
    threshold = torch.quantile(x.float().abs().flatten(), sparsity).item()
    ref = sparse_linear_reference(x.to(DEVICE), w_t.to(DEVICE), b, threshold)
    off = (x.float().abs() < threshold).all(0)
    assert 0 < off.sum() < K
    w = padded(w_t, column_major)
    w[off] = NAN
    out = sparse_linear(x.to(DEVICE), w, b, threshold)
    assert out.shape == (T, N) and out.dtype == dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= TOLERANCE[dtype]
    assert torch.equal(sparse_linear(x.to(DEVICE), w, b, threshold), out)


def test_sparse_linear_zero_threshold_is_the_dense_layer():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 896, generator=g).to(DEVICE)
    w_t = torch.randn(896, 300, generator=g).to(DEVICE)
    b = torch.randn(300, generator=g).to(DEVICE)
    assert rel_err(sparse_linear(x, w_t, b, 0.0), x @ w_t + b) <= TOLERANCE[F32]


# --- input checks --------------------------------------------------------------------------------

def _bad_inputs():
    x, w, wd, t = torch.zeros(2, 64), torch.zeros(96, 64), torch.zeros(96, 64), torch.zeros(96)
    return {
        "ffn-hidden": ("sparse_ffn", (x, torch.zeros(96, 65), None, wd, None, None, None, t, "silu"),
                       r"w_up must have shape"),
        "ffn-down": ("sparse_ffn", (x, w, None, torch.zeros(95, 64), None, None, None, t, "silu"),
                     r"w_down_t must have shape"),
        "ffn-gate": ("sparse_ffn", (x, w, None, wd, None, torch.zeros(96, 63), None, t, "silu"),
                     r"w_gate must have shape"),
        "ffn-gate-bias": ("sparse_ffn", (x, w, None, wd, None, None, torch.zeros(96), t, "silu"),
                          r"b_gate is given without w_gate"),
        "ffn-bias": ("sparse_ffn", (x, w, torch.zeros(95), wd, None, None, None, t, "silu"), r"b_up must be"),
        "ffn-thresholds": ("sparse_ffn", (x, w, None, wd, None, None, None, t.half(), "silu"),
                           r"thresholds must be a float32 tensor"),
        "ffn-activation": ("sparse_ffn", (x, w, None, wd, None, None, None, t, "tanh"), r"activation must be"),
        "ffn-int": ("sparse_ffn", (x.long(), w, None, wd, None, None, None, t, "silu"), r"x must be a 2-D"),
        "linear-shape": ("sparse_linear", (x, torch.zeros(63, 10), None, 0.5), r"w_t must have shape"),
        "linear-negative": ("sparse_linear", (x, torch.zeros(64, 10), None, -0.1), r"threshold must be"),
        "linear-tensor": ("sparse_linear", (x, torch.zeros(64, 10), None, torch.tensor(0.5)),
                          r"threshold must be"),
    }


@pytest.mark.parametrize("name", list(_bad_inputs()))
def test_bad_inputs_are_rejected_by_kernel_and_reference(name):
    import kvpass.kernels.sparse_ffn as sparse

    function, args, message = _bad_inputs()[name]
    for fn in (getattr(sparse, function), getattr(sparse, f"{function}_reference")):
        with pytest.raises(ValueError, match=message):
            fn(*args)


def test_kernels_take_at_most_max_tokens():
    assert MAX_DECODE_TOKENS <= sparse_kernel.MAX_TOKENS
    T = sparse_kernel.MAX_TOKENS + 1
    x, w = torch.zeros(T, 64, device=DEVICE), torch.zeros(96, 64, device=DEVICE)
    with pytest.raises(ValueError, match="at most 16 tokens"):
        sparse_ffn(x, w, None, w, None, None, None, torch.zeros(96, device=DEVICE), "relu")
    with pytest.raises(ValueError, match="at most 16 tokens"):
        sparse_linear(x, torch.zeros(64, 8, device=DEVICE), None, 0.5)


@pytest.mark.skipif(not _INTERPRET, reason="on a GPU the kernels are compiled by running them")
def test_kernels_compile_for_hopper():
    """The interpreter runs kernels as numpy: also compile what small FFN and linear cases (16-bit, gated with
    bias, column-major) launch for sm_90, as a GPU would (tests/hopper_compile.py)."""
    from hopper_compile import assert_what_runs_compiles_for_hopper

    assert_what_runs_compiles_for_hopper(
        lambda: test_sparse_ffn_matches_reference(200, 333, 2, F16, "silu", True, True, False, 0.6),
        lambda: test_sparse_ffn_matches_reference(576, 1536, 3, BF16, "gelu_tanh", True, True, True, 0.5),
        lambda: test_sparse_linear_matches_reference(896, 1001, 3, BF16, False, True, 0.5))
