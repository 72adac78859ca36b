"""The kvpass ops: schemas and fake implementations (opcheck), and their run-time semantics."""
import pytest
import torch

import kvpass
import kvpass.ffn_ops  # noqa: F401  (registers the FFN ops)
from kvpass.ops import MODE_CACHED, MODE_ONESHOT
from kvpass.kernels.attention import attention_over_store_reference


@pytest.fixture
def backend():
    return kvpass.backend(kvpass.Config())


def _qkv(B=2, Hq=4, Hkv=2, L=5, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g),
            torch.randn(B, Hkv, L, D, generator=g))


def test_attention_opcheck_one_shot(backend):
    q, k, v = _qkv()
    args = (q, k, v, None, True, 0.25, 0.0, 0, MODE_ONESHOT, backend.runtime.id, 0, 0)
    torch.library.opcheck(torch.ops.kvpass.attention.default, args)


def test_cache_update_schema_and_fake(backend):
    """cache_update is stateful (each call appends), so opcheck's repeated calls only check its schema;
    its fake implementation is compared with one real call."""
    backend.runtime.begin_sequence(kind="cache")
    _, k, v = _qkv()
    torch.library.opcheck(torch.ops.kvpass.cache_update.default, (k, v, backend.runtime.id, 0, 0),
                          test_utils=("test_schema",))
    backend.runtime.begin_sequence(kind="cache")
    real = torch.ops.kvpass.cache_update(k, v, backend.runtime.id, 0, 0)
    real = torch.ops.kvpass.cache_update(k, v, backend.runtime.id, 0, 5)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = torch.ops.kvpass.cache_update(mode.from_tensor(k), mode.from_tensor(v), backend.runtime.id, 0, 5)
    for r, f in zip(real, fake):
        assert r.shape == f.shape == (2, 2, 10, 16) and r.stride() == f.stride() and r.dtype == f.dtype


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_ffn_and_sparse_linear_opcheck(kernels, monkeypatch):
    """Both stateless ops, exact and thresholded, decode-sized and prompt-sized. Under KVPASS_KERNELS=triton on the
    CPU the eager call runs the interpreted kernels while a traced graph takes the dense path
    (kvpass.kernels_dispatch.decode_sized): those two agree to fp32 summation order (up to 5e-5 absolute over 40
    seeds, measured), beyond opcheck's exact-path tolerance, so there the AOT comparison is left out. On a GPU both
    run the kernels."""
    monkeypatch.setenv("KVPASS_KERNELS", kernels)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checks = {}
    if kernels == "triton" and device == "cpu":
        checks = {"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor")}
    w_up, w_gate, w_down = (torch.randn(*shape, device=device) for shape in ((24, 16), (24, 16), (16, 24)))
    thresholds = torch.rand(24, device=device) * 0.5
    for tokens in (1, 7):
        x = torch.randn(1, tokens, 16, device=device)
        for args in ((None, None), (thresholds, None), (thresholds, w_down.t().contiguous())):
            torch.library.opcheck(torch.ops.kvpass.ffn.default, (x, w_up, None, w_down, None, w_gate, None, *args,
                                                                 "silu"), **checks)
        for w_t in (None, w_up.t().contiguous()):
            torch.library.opcheck(torch.ops.kvpass.sparse_linear.default,
                                  (x, w_up, torch.randn(24, device=device), 0.4, w_t), **checks)


def test_attention_op_is_cudagraph_unsafe():
    if hasattr(torch.Tag, "cudagraph_unsafe"):
        assert torch.Tag.cudagraph_unsafe in torch.ops.kvpass.attention.default.tags


def test_cached_mode_equals_attention_over_everything(backend):
    """Prefill 5 tokens then decode 1: the op over the store = reference attention over all 6 keys."""
    runtime = backend.runtime
    runtime.begin_sequence(kind="cache")
    q, k, v = _qkv(L=6, seed=1)
    common = dict(is_causal=True, scale=0.25, softcap=0.0, window=0, mode=MODE_CACHED, runtime=runtime.id, layer=3)
    first = torch.ops.kvpass.attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], None, past=0, **common)
    last = torch.ops.kvpass.attention(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], None, past=5, **common)
    expected = attention_over_store_reference(q, k, v, scale=0.25, causal=True)
    torch.testing.assert_close(torch.cat([first, last], dim=2), expected)
    assert runtime.tokens_held() == 6


@pytest.mark.parametrize("mode", [MODE_ONESHOT, MODE_CACHED])
def test_a_mask_with_broadcast_query_and_key_dims_is_taken_as_sdpa_takes_it(backend, mode):
    """BERT-like decoders pass a (1, 1, 1, 1) mask when every key is visible: SDPA broadcasts it, so does the op."""
    backend.runtime.begin_sequence(kind="cache")
    q, k, v = _qkv(L=1, seed=2)
    args = (True, 0.25, 0.0, 0, mode, backend.runtime.id, 0)
    got = torch.ops.kvpass.attention(q, k, v, torch.ones(1, 1, 1, 1, dtype=torch.bool), *args, 0)
    backend.runtime.begin_sequence(kind="cache")
    torch.testing.assert_close(got, torch.ops.kvpass.attention(q, k, v, None, *args, 0))


def test_out_of_sync_cache_is_an_error_not_wrong_numbers(backend):
    runtime = backend.runtime
    runtime.begin_sequence(kind="cache")
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="out of sync"):
        torch.ops.kvpass.attention(q, k, v, None, True, 0.25, 0.0, 0, MODE_CACHED, runtime.id, 0, 7)


def test_new_sequence_drops_all_state(backend):
    runtime = backend.runtime
    runtime.begin_sequence(kind="cache")
    q, k, v = _qkv()
    torch.ops.kvpass.attention(q, k, v, None, True, 0.25, 0.0, 0, MODE_CACHED, runtime.id, 0, 0)
    allocated = runtime.allocated_nbytes()
    runtime.begin_sequence(kind="cache")
    # a dense store keeps its buffers for the next sequence (their addresses are what a recorded decode step
    # reads) but holds nothing of the last one
    assert runtime.tokens_held() == 0 and sum(runtime.nbytes().values()) == 0
    assert runtime.allocated_nbytes() == allocated > 0


def test_float_mask_with_biases_is_refused(backend):
    q, k, v = _qkv()
    bias = torch.full((1, 1, 5, 5), -1.0)
    with pytest.raises(NotImplementedError, match="biases"):
        torch.ops.kvpass.attention(q, k, v, bias, False, 0.25, 0.0, 0, MODE_ONESHOT, backend.runtime.id, 0, 0)


def test_storage_dtype_is_honoured():
    backend = kvpass.backend(kvpass.Config(attention=kvpass.Dense(dtype="bfloat16")))
    backend.runtime.begin_sequence(kind="cache")
    q, k, v = _qkv()
    out = torch.ops.kvpass.attention(q, k, v, None, True, 0.25, 0.0, 0, MODE_CACHED, backend.runtime.id, 0, 0)
    assert out.dtype == torch.float32
    assert backend.runtime.nbytes()["keys"] == 2 * 2 * k.shape[2] * 16 * 2  # bf16, the tokens held
    assert backend.runtime.allocated_nbytes() == 2 * (2 * 2 * 256 * 16 * 2)  # keys and values, capacity 256
    expected = attention_over_store_reference(q, k.bfloat16(), v.bfloat16(), scale=0.25, causal=True)
    torch.testing.assert_close(out, expected)


def test_a_prefill_mask_the_decode_step_would_not_reproduce_is_refused(backend):
    """Under the decode engine a decode step reads no HF mask, only valid slots + causal + the site's window: a
    prefill whose mask says more (here a 3-token window the site does not know) is refused, not decoded wrong."""
    runtime = backend.runtime
    runtime.static_decode = True
    q, k, v = _qkv(L=6)
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    windowed = ((j <= i) & (j > i - 3))[None, None]
    runtime.begin_sequence(kind="cache")
    torch.ops.kvpass.attention(q, k, v, windowed, False, 0.25, 0.0, 3, MODE_CACHED, runtime.id, 0, 0)  # window known
    runtime.begin_sequence(kind="cache")
    with pytest.raises(NotImplementedError, match="layer 0's attention mask"):
        torch.ops.kvpass.attention(q, k, v, windowed, False, 0.25, 0.0, 0, MODE_CACHED, runtime.id, 0, 0)
