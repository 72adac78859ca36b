"""KIVI baseline: the scalar quantizers (accuracy derived from the bit width) and the store's KIVI convention."""
import math

import pytest
import torch

# isort files kvpass.kernels (mapped from kernels/ by package-dir) with the third-party imports.
from kvpass.kernels.attention import attention_over_store_reference

from kvpass.config import KIVI, Dense
from kvpass.methods import OneShot, make_store
from kvpass.methods.base import AttentionSpec
from kvpass.methods.kivi import (
    KIVIStore,
    dequantize_per_channel,
    dequantize_per_token,
    quantize_per_channel,
    quantize_per_token,
)

OUTLIER_CHANNELS = [3, 40, 77, 100]  # keys of real models carry a few large fixed channels


def _gaussian(shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _with_outlier_channels(x):
    x = x.clone()
    x[..., OUTLIER_CHANNELS] *= 10
    return x


def _sqnr_db(x, x_hat):
    x, x_hat = x.double(), x_hat.double()
    return 10 * math.log10(x.square().sum() / (x - x_hat).square().sum())


def _expected_sqnr_db(bits, n):
    """SQNR of min/max quantization of i.i.d. Gaussian slices of n values, each slice scaled alike or not.

    The step is range / (2**bits - 1) and the error ~ uniform over a step (variance step**2 / 12), against a
    signal of variance sigma**2; the range of n normals is ~ 2 E[max], with E[max] ~ Phi^-1((n - 3/8) / (n + 1/4))
    (Blom). Per-slice scaling cancels in the ratio, so this also holds for per-channel keys with outlier channels.
    """
    expected_range = 2 * torch.special.ndtri(torch.tensor((n - 0.375) / (n + 0.25))).item()
    return 10 * math.log10(12 * ((1 << bits) - 1) ** 2 / expected_range ** 2)


def _round_trip_keys(x, bits, group=32):
    return dequantize_per_channel(*quantize_per_channel(x, bits, group), group)


def _round_trip_values(x, bits):
    return dequantize_per_token(*quantize_per_token(x, bits))


# -- quantizers ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_sqnr_matches_the_bit_width(bits):
    """Within 1 dB below the derived SQNR (the estimate is within 0.2 dB on these 0.5 M values)."""
    x = _gaussian((2, 2, 1024, 128))
    keys = _with_outlier_channels(x)
    assert _sqnr_db(keys, _round_trip_keys(keys, bits)) > _expected_sqnr_db(bits, n=32) - 1.0
    assert _sqnr_db(x, _round_trip_values(x, bits)) > _expected_sqnr_db(bits, n=128) - 1.0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_beats_per_token_on_outlier_channels(bits):
    """Per token, the outlier channels set every token's step: at least 6 dB lost (about 7 at every bit width)."""
    keys = _with_outlier_channels(_gaussian((2, 2, 1024, 128)))
    assert _sqnr_db(keys, _round_trip_keys(keys, bits)) > _sqnr_db(keys, _round_trip_values(keys, bits)) + 6.0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_error_is_within_half_a_step(bits):
    x = _gaussian((2, 3, 64, 16), seed=1)
    codes, scale, zero = quantize_per_token(x, bits)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= (1 << bits) - 1
    assert scale.shape == zero.shape == (2, 3, 64, 1)
    assert ((x - dequantize_per_token(codes, scale, zero)).abs() <= scale / 2 * (1 + 1e-5)).all()
    codes, scale, zero = quantize_per_channel(x, bits, group=8)
    assert scale.shape == zero.shape == (2, 3, 8, 16)
    step = scale.repeat_interleave(8, dim=2)
    assert ((x - dequantize_per_channel(codes, scale, zero, 8)).abs() <= step / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_8_bit_is_near_exact_in_the_model_dtype(dtype):
    """Scales and zeros are kept in the model dtype and the dequantized view comes back in it. 8 bits are ~ 47 dB
    in fp32 (the derived SQNR); a 16-bit model dtype costs under 1 dB more, its own rounding being ~ 55 dB down."""
    x = _with_outlier_channels(_gaussian((2, 2, 256, 128), dtype=dtype))
    codes, scale, zero = quantize_per_channel(x, 8, 32)
    assert scale.dtype == zero.dtype == dtype
    x_hat = dequantize_per_channel(codes, scale, zero, 32)
    assert x_hat.dtype == dtype
    fp32_sqnr = _sqnr_db(x.float(), _round_trip_keys(x.float(), 8))
    assert fp32_sqnr > _expected_sqnr_db(8, n=32) - 1.0
    assert _sqnr_db(x, x_hat) > fp32_sqnr - 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_constant_slices_decode_exactly_without_nan(dtype):
    keys, values = _gaussian((1, 2, 32, 16), dtype=dtype), _gaussian((1, 2, 32, 16), seed=1, dtype=dtype)
    keys[:, :, :, 5] = 0.75  # a constant channel: max == min in every key group
    values[:, :, 7, :] = -2.0  # a constant token: max == min over its values
    keys_hat, values_hat = _round_trip_keys(keys, 2), _round_trip_values(values, 2)
    assert torch.isfinite(keys_hat).all() and torch.isfinite(values_hat).all()
    assert torch.equal(keys_hat[:, :, :, 5], keys[:, :, :, 5]) and torch.equal(values_hat[:, :, 7], values[:, :, 7])
    zeros = torch.zeros(1, 1, 32, 8, dtype=dtype)
    assert torch.equal(_round_trip_keys(zeros, 4), zeros) and torch.equal(_round_trip_values(zeros, 4), zeros)


def test_keys_need_whole_groups():
    with pytest.raises(ValueError, match="groups of 32"):
        quantize_per_channel(torch.zeros(1, 1, 40, 8), 2, 32)


# -- store ---------------------------------------------------------------------------------------------------------
def _kv(L, B=2, H=2, D=16, Dv=8, seed=0, dtype=torch.float32):
    return _gaussian((B, H, L, D), seed, dtype), _gaussian((B, H, L, Dv), seed + 1, dtype)


def _store(residual, group, bits=2, capacity=None):
    return make_store(KIVI(bits=bits, group=group, residual=residual), layer=0, capacity=capacity)


def _filled(k, v, pieces, **method):
    store, start = _store(**method), 0
    for n in pieces:
        store.append(k[:, :, start : start + n], v[:, :, start : start + n])
        start += n
    return store


def test_make_store_knows_kivi():
    assert isinstance(make_store(KIVI(), layer=3), KIVIStore)


# (residual, group, tokens) -> (exact keys, exact values), written out by hand from the KIVI convention.
EXACT = {(0, 1, 17): (0, 0), (0, 32, 17): (17, 0), (0, 32, 100): (4, 0), (5, 1, 1): (1, 1), (5, 1, 100): (5, 5),
         (5, 32, 17): (17, 5), (5, 32, 100): (36, 5), (32, 32, 17): (17, 17), (32, 32, 100): (36, 32)}


@pytest.mark.parametrize("residual, group, n", sorted(EXACT))
def test_which_tokens_stay_exact_after_a_prefill(residual, group, n):
    k, v = _kv(n)
    store = _filled(k, v, [n], residual=residual, group=group)
    assert (n - store.quantized_keys, n - store.quantized_values) == EXACT[residual, group, n]
    _assert_exact_from(store, k, v)


@pytest.mark.parametrize("residual", [0, 5, 32])
@pytest.mark.parametrize("group", [1, 32])
@pytest.mark.parametrize("prefill", [1, 17, 100])
def test_which_tokens_stay_exact_while_decoding(residual, group, prefill):
    """After every append: the newest `residual` tokens exact; older values quantized; older keys quantized in
    whole groups, so r + g - 1 keys at most stay exact."""
    k, v = _kv(prefill + 70)
    store = _filled(k, v, [prefill], residual=residual, group=group)
    for n in range(prefill, prefill + 70):
        if n > prefill:
            store.append(k[:, :, n - 1 : n], v[:, :, n - 1 : n])
        older = max(0, n - residual)
        assert store.quantized_values == older
        assert store.quantized_keys % group == 0 and older - group < store.quantized_keys <= older
    _assert_exact_from(store, k, v)


def _assert_exact_from(store, k, v):
    """The materialized tokens are bit-exact exactly from quantized_keys / quantized_values on (at 2 bits a
    quantized token never decodes exactly, except keys in groups of 1: a per-value scale is lossless)."""
    keys, values = store.materialize()
    n = store.length
    assert keys.shape == k[:, :, :n].shape and values.shape == v[:, :, :n].shape
    nk, nv = store.quantized_keys, store.quantized_values
    assert torch.equal(keys[:, :, nk:], k[:, :, nk:n]) and torch.equal(values[:, :, nv:], v[:, :, nv:n])
    assert all(not torch.equal(values[:, :, i], v[:, :, i]) for i in range(nv))
    if store.method.group > 1:
        assert all(not torch.equal(keys[:, :, i], k[:, :, i]) for i in range(nk))


@pytest.mark.parametrize("residual, group, bits", [(0, 1, 2), (5, 32, 2), (32, 32, 4), (7, 16, 8)])
@pytest.mark.parametrize("pieces", [[1] * 100, [17, 1, 1, 31, 50], [37, 0, 63], [99, 1]])
def test_append_in_pieces_equals_append_at_once(residual, group, bits, pieces):
    k, v = _kv(100, dtype=torch.bfloat16)
    method = {"residual": residual, "group": group, "bits": bits}
    at_once, in_pieces = _filled(k, v, [100], **method), _filled(k, v, pieces, **method)
    for whole, split in zip(at_once.materialize(), in_pieces.materialize()):
        assert whole.dtype == torch.bfloat16 and torch.equal(whole, split)


@pytest.mark.parametrize("with_mask", [False, True])
def test_attend_is_reference_attention_over_the_materialized_view(with_mask):
    """Prefill 40 then decode 3, GQA (4 query heads over 2 KV heads)."""
    k, v = _kv(43)
    q = _gaussian((2, 4, 43, 16), seed=5)
    mask = torch.rand(2, 1, 43, 43, generator=torch.Generator().manual_seed(6)) < 0.7 if with_mask else None
    spec = AttentionSpec(scale=0.25)
    store = _store(residual=8, group=16)
    for start, stop in [(0, 40), (40, 41), (41, 42), (42, 43)]:
        store.append(k[:, :, start:stop], v[:, :, start:stop])
        step_mask = None if mask is None else mask[:, :, start:stop, :stop]
        out = store.attend(q[:, :, start:stop], step_mask, True, spec)
        expected = attention_over_store_reference(q[:, :, start:stop], *store.materialize(), scale=0.25,
                                                  causal=True, mask=step_mask)
        torch.testing.assert_close(out, expected)


def test_a_prompt_attends_over_its_own_quantized_tokens():
    """One-shot (no cache): a prompt longer than `residual` already sees its older tokens quantized; a prompt
    within `residual` is attended exactly."""
    k, v = _kv(48)
    q = _gaussian((2, 4, 48, 16), seed=5)
    spec = AttentionSpec(scale=0.25)

    def one_shot(method, L):
        return OneShot(method).attend(q[:, :, :L], k[:, :, :L], v[:, :, :L], None, True, spec, layer=0)

    kivi = KIVI(bits=2, group=16, residual=16)
    assert torch.equal(one_shot(kivi, 16), one_shot(Dense(), 16))
    assert not torch.allclose(one_shot(kivi, 48), one_shot(Dense(), 48), atol=1e-3)


def test_nbytes_counts_codes_scales_and_exact_rings():
    """bf16, 2 bits, r = g = 32, 300 tokens in a store expecting 300: keys of 256 tokens and values of 268 are
    quantized, in buffers reserved for the 300 rounded up to whole groups (320 slots)."""
    B, H, D, Dv, item = 2, 2, 16, 8, 2
    k, v = _kv(300, B, H, D, Dv, dtype=torch.bfloat16)
    store = _store(residual=32, group=32, capacity=300)
    store.append(k, v)
    assert (store.quantized_keys, store.quantized_values) == (256, 268)
    assert store.capacity == 320
    assert store.nbytes() == {
        "codes": B * H * 320 * (D + Dv),  # one uint8 per value: 2-bit codes are not bit-packed
        "scales": 2 * B * H * (320 // 32 * D + 320) * item,  # scale + zero: per (group, channel) and per token
        "exact": B * H * ((32 + 32) * D + (32 + 1) * Dv) * item,  # rings of r + g (keys) and r + 1 (values)
    }
    exact = store.nbytes()["exact"]
    for i in range(200):  # decoding past the reserved 320 grows the quantized parts, never the exact rings
        store.append(*_kv(1, B, H, D, Dv, seed=i, dtype=torch.bfloat16))
    assert store.nbytes()["exact"] == exact and store.nbytes()["codes"] == B * H * 640 * (D + Dv)


def test_appended_tensors_are_copied_not_aliased():
    k, v = _kv(50)
    store = _store(residual=8, group=16)
    store.append(k, v)
    before = [t.clone() for t in store.materialize()]
    k.add_(1.0)
    v.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, store.materialize()))


@pytest.mark.parametrize("shape", [(3, 2, 1, 16), (2, 4, 1, 16), (2, 2, 1, 32)])
def test_a_new_batch_or_head_shape_is_an_error(shape):
    store = _store(residual=8, group=16)
    store.append(*_kv(20))
    with pytest.raises(ValueError, match="do not fit the stored"):
        store.append(torch.zeros(shape), torch.zeros(shape[:3] + (8,)))


def test_an_empty_store_has_nothing_to_materialize():
    with pytest.raises(RuntimeError, match="empty"):
        _store(residual=8, group=16).materialize()


# -- captured decode (the decode engine's contract, kvpass.methods.base) ----------------------------------------------
def _buffers(store):
    return [t.data_ptr() for t in store._keys + store._values + (store._ring_k, store._ring_v)]


def _decode_steps(captured, uncaptured, q, k, v, prefill, real, spec):
    """Prefill both stores, then decode the remaining tokens: `captured` as the runtime drives a decode step (reserve,
    the device slot and validity, decode, advance), `uncaptured` by append + attend with the same validity as a
    causal bool mask. Yields each step's two outputs; the materialized views are checked equal at every step."""
    for store in (captured, uncaptured):
        store.append(k[:, :, :prefill], v[:, :, :prefill])
    valid = torch.zeros(k.shape[0], captured.capacity, dtype=torch.bool)
    valid[:, :prefill] = real[:, :prefill]
    slot = torch.zeros(1, dtype=torch.int64)
    for n in range(prefill, k.shape[2]):
        if captured.reserve(n + 1):
            valid = torch.cat([valid, valid.new_zeros(valid.shape[0], captured.capacity - valid.shape[1])], dim=1)
        valid[:, n] = True
        slot.fill_(n)
        got = captured.decode(q[:, :, n : n + 1], k[:, :, n : n + 1], v[:, :, n : n + 1], spec, slot, valid)
        captured.advance(1)
        uncaptured.append(k[:, :, n : n + 1], v[:, :, n : n + 1])
        want = uncaptured.attend(q[:, :, n : n + 1], real[:, None, None, : n + 1], True, spec)
        assert captured.length == uncaptured.length == n + 1
        for a, b in zip(captured.materialize(), uncaptured.materialize()):
            assert torch.equal(a, b)
        yield got, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("residual, group", [(5, 4), (0, 3), (8, 8)])
def test_captured_decode_equals_append_and_attend(dtype, head_dim, residual, group):
    """Batch 2 (row 1 left-padded by 3), GQA (4 query heads over 2), 4 bits: a prefill of 11 then 21 decode steps,
    twice (a reset between): the same outputs (to fp32 rounding over the capacity's masked slots) and the same
    materialized keys and values as the uncaptured path, and the buffers never move."""
    method = KIVI(bits=4, group=group, residual=residual)
    spec = AttentionSpec(scale=head_dim ** -0.5)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}  # bf16: a rounding of the output
    captured = make_store(method, layer=0)
    pointers = None
    for seed in (0, 1):  # a second sequence in the same buffers sees nothing of the first
        k, v = _kv(32, B=2, H=2, D=head_dim, Dv=head_dim, seed=seed, dtype=dtype)
        q = _gaussian((2, 4, 32, head_dim), seed=seed + 5, dtype=dtype)
        real = torch.arange(32)[None] >= torch.tensor([[0], [3]])  # (B, tokens): row 1's first 3 are padding
        assert captured.reset()
        steps = _decode_steps(captured, make_store(method, layer=0), q, k, v, 11, real, spec)
        for got, want in steps:
            assert got.dtype == dtype
            torch.testing.assert_close(got, want, **tolerance)
            pointers = pointers or _buffers(captured)
            assert _buffers(captured) == pointers


def test_captured_decode_grows_past_its_capacity():
    """reserve() past the capacity reallocates (True, the runtime then drops its recordings) and keeps the tokens."""
    method = KIVI(bits=2, group=32, residual=32)
    k, v = _kv(270, D=16, Dv=16)
    q = _gaussian((2, 4, 270, 16), seed=5)
    captured = make_store(method, layer=0)
    before = None
    for got, want in _decode_steps(captured, make_store(method, layer=0), q, k, v, 250, torch.ones(2, 270, dtype=torch.bool),
                                   AttentionSpec(scale=0.25)):
        before = before or _buffers(captured)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert captured.capacity == 512 and all(a != b for a, b in zip(_buffers(captured)[:6], before[:6]))
    assert _buffers(captured)[6:] == before[6:]  # the rings never grow


@pytest.mark.parametrize("residual, group", [(0, 1), (5, 4), (4, 4), (3, 8)])
@pytest.mark.parametrize("pieces", [[1] * 30, [17, 1, 1, 11], [2, 28], [30]])
def test_write_tokens_in_tensor_operations_equals_append(residual, group, pieces):
    """kivi.write_tokens (the stateless form an ONNX program traces: buffers in, buffers out, the first slot a
    tensor) gives, after each piece, the store's materialized view and its quantized parts (codes, scales, zeros)."""
    from kvpass.methods import kivi

    method = KIVI(bits=2, group=group, residual=residual)
    k, v = _kv(30, dtype=torch.bfloat16)
    store = KIVIStore(method, layer=0)
    keys, values = kivi.quantized_buffers(2, 2, kivi.capacity_for(method, 30), k.shape[3], v.shape[3], k.dtype,
                                          "cpu", group)
    buffers = (*keys, *values, *kivi.exact_rings(method, 2, 2, k.shape[3], v.shape[3], k.dtype, "cpu"))
    start = 0
    for piece in pieces:
        new_k, new_v = k[:, :, start : start + piece], v[:, :, start : start + piece]
        store.append(new_k, new_v)
        buffers = kivi.write_tokens(method, buffers, new_k, new_v, torch.tensor(start))
        start += piece
        view = kivi.dequantized_view(method, buffers, store.quantized_keys, store.quantized_values, start)
        for got, want in zip(view, store.materialize()):
            assert torch.equal(got[:, :, :start], want)
        for got, want in zip(buffers[:6], store._keys + store._values):   # zeros past the quantized tokens too
            assert torch.equal(got, want[:, :, : got.shape[2]])
