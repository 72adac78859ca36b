"""Triton attention over a product-quantized KV store vs its fp32 PyTorch reference.

Runs on a GPU, or on CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
when there is no GPU). Errors are relative Frobenius errors ||out - ref|| / ||ref|| (<= 1e-4 for
fp32 queries, 1e-2 fp16, 2e-2 bf16); lse is compared in absolute terms, and its -inf entries (rows
with no visible key, whose output must be exactly 0) must match exactly.

Every store is poisoned where the kernel must not read: codes of anchor / exact / unused slots are
255 (out of a 64-entry codebook), their anchor_slot entries point past the anchors, unused anchor
rows, exact rows past P and everything past the store's length are NaN, and so are the invalid
(left-padding) slots when ``valid`` is passed. A leak shows up as NaN or as a mismatch.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not torch.cuda.is_available() and not _INTERPRET:
    pytest.skip("Triton kernels need a CUDA GPU; on CPU run with TRITON_INTERPRET=1 in the environment",
                allow_module_level=True)
pytest.importorskip("triton")

from kvpass.kernels.attention import attention_over_store
from kvpass.kernels.coded_attention import (
    CodedKV,
    KeyRotation,
    attention_over_codes,
    attention_over_codes_reference,
    dequantize,
    rope_rotate,
)

DEVICE = "cpu" if _INTERPRET else "cuda"
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
TOLERANCE = {F32: 1e-4, F16: 1e-2, BF16: 2e-2}
LSE_TOLERANCE = {F32: 1e-4, F16: 2e-3, BF16: 2e-3}   # scores use exact 16-bit q, k: fp32 sums
GARBAGE_CODE = 255      # >= C for 64-entry codebooks: an out-of-range index if it were ever used
NAN = float("nan")


@dataclasses.dataclass(frozen=True)
class Case:
    seed: int
    D: int = 64
    Dv: int | None = None       # None: same as D
    sub: int = 8                # sub-vector length of keys
    sub_v: int | None = None    # None: same as sub
    centroids: int = 64         # codebook size (keys and values)
    Lq: int = 1
    length: int = 33            # tokens in the store
    exact: int = 8              # P: exact tail tokens; exact_start = length - exact
    anchors: float = 0.15       # fraction of coded slots that are anchors
    q_back: int = 0             # kv_len = length - q_back (queries need not be the last slots)
    Hkv: int = 2
    group: int = 1
    pads: tuple = (0, 3, 10)    # left padding (invalid leading slots) per batch row
    extra: int = 5              # capacity S = length + extra
    window: int = 0
    softcap: float = 0.0
    scale: float | None = None  # None: D ** -0.5
    causal: bool = True
    mask: str | None = None     # None | "random" (query 0 sees nothing) | "padding" (causal + pads)
    pass_valid: bool = True     # False: valid=None (pad slots then hold finite tokens)
    pass_q_start: bool = True   # False: q_start=None (needs q_back = 0)
    dtype: torch.dtype = F32    # q dtype
    store_dtype: torch.dtype | None = None  # None: same as q
    layout: str = "bhsd"        # "bshd": codes and exact tokens are transposed (B, S, Hkv, .) views
    rope: int = 0               # > 0: coded keys are pre-RoPE, this many dims rotated (positions after pads)
    rope_scaling: float = 1.0

    @property
    def B(self):
        return len(self.pads)


def _tokens(g, shape, rows, dtype, layout):
    """NaN buffer of shape (B, Hkv, rows + 4, d), random in its first `rows` rows, cut to
    `shape` (B, Hkv, n, d); a (B, n, Hkv, d) buffer transposed for the "bshd" layout."""
    B, Hkv, n, d = shape
    if layout == "bshd":
        buf = torch.full((B, rows + 4, Hkv, d), NAN)
        buf[:, :rows] = torch.randn(B, rows, Hkv, d, generator=g)
        return buf.to(dtype).transpose(1, 2)[:, :, :n]
    buf = torch.full((B, Hkv, rows + 4, d), NAN)
    buf[:, :, :rows] = torch.randn(B, Hkv, rows, d, generator=g)
    return buf.to(dtype)[:, :, :n]


def make_store(c: Case, g) -> tuple[CodedKV, torch.Tensor]:
    """A random, poisoned CodedKV for case c (on the CPU), and the (B, S) valid mask."""
    B, Hkv, S, E = c.B, c.Hkv, c.length + c.extra, c.length - c.exact
    dtype = c.store_dtype or c.dtype
    valid = torch.ones(B, S + 3, dtype=torch.bool)[:, :S]      # non-trivial batch stride
    for b, pad in enumerate(c.pads):
        valid[b, :pad] = False
    valid[1:, c.length:] = False    # row 0 keeps its NaN tail "valid": must not be read past kv_len

    # Anchors: a random subset of the coded slots, each with its own row; the last row stays NaN
    # (pad slots point there) and anchor_slot of slots >= exact_start points past the rows.
    is_anchor = torch.rand(B, Hkv, E, generator=g) < c.anchors
    n_rows = int(is_anchor.sum(-1).max()) + 1
    rows = is_anchor.int().cumsum(-1) - 1
    anchor_slot = torch.full((B, Hkv, S), n_rows + 2, dtype=torch.int32)
    anchor_slot[..., :E] = torch.where(is_anchor, rows, -1).int()
    if c.pass_valid:
        for b, pad in enumerate(c.pads):
            anchor_slot[b, :, :min(pad, E)] = n_rows - 1

    def side(d, sub):
        M = d // sub
        codes = torch.randint(0, c.centroids, (B, S, Hkv, M), generator=g, dtype=torch.uint8)
        codes = codes.transpose(1, 2) if c.layout == "bshd" else codes.transpose(1, 2).contiguous()
        codes[..., E:, :] = GARBAGE_CODE
        codes.masked_fill_((anchor_slot >= 0)[..., None], GARBAGE_CODE)
        codebook = torch.randn(Hkv, M, c.centroids, sub, generator=g).to(dtype)
        anchors = _tokens(g, (B, Hkv, n_rows, d), n_rows - 1, dtype, "bhsd")
        exact = _tokens(g, (B, Hkv, c.exact, d), c.exact, dtype, c.layout)
        if c.pass_valid:
            for b, pad in enumerate(c.pads):
                exact[b, :, :max(pad - E, 0)] = NAN
        return codes, codebook, anchors, exact

    (ck, bk, ak, ek), (cv, bv, av, ev) = side(c.D, c.sub), side(c.Dv or c.D, c.sub_v or c.sub)
    rotation = None
    if c.rope:
        inv_freq = 10000.0 ** (-torch.arange(0, c.rope, 2, dtype=F32) / c.rope)
        rotation = KeyRotation(inv_freq, c.rope_scaling, torch.tensor(c.pads, dtype=torch.int32))
    return CodedKV(ck, cv, bk, bv, anchor_slot, ak, av, ek, ev, E, rotation), valid


def make_mask(c: Case, g, kv_len, not_pad):
    """(B, 1, Lq, kv_len) bool mask, a slice of a wider buffer; not_pad: (B, kv_len) bool."""
    mask = torch.zeros(c.B, 1, c.Lq, kv_len + 3, dtype=torch.bool)[..., :kv_len]
    p = kv_len - c.Lq + torch.arange(c.Lq)[:, None]
    j = torch.arange(kv_len)[None, :]
    if c.mask == "random":
        mask[:] = torch.rand(c.B, 1, c.Lq, kv_len, generator=g) < 0.6
        mask[..., 0, :] = False                     # a row that sees nothing
        mask[..., 1:, :] |= (j == p)[1:]            # the others see at least their own slot
    else:
        mask[:] = (j <= p) & not_pad[:, None, None, :]
    return mask


def _to_device(kv: CodedKV) -> CodedKV:
    rotation = kv.rotation and dataclasses.replace(kv.rotation, inv_freq=kv.rotation.inv_freq.to(DEVICE),
                                                   position_offset=kv.rotation.position_offset.to(DEVICE))
    return dataclasses.replace(kv, **{n: t.to(DEVICE) for n, t in kv.tensors().items()}, rotation=rotation)


def make_inputs(c: Case):
    """((q, kv, valid, q_start), kwargs) for case c, on DEVICE."""
    g = torch.Generator().manual_seed(c.seed)
    kv, valid = make_store(c, g)
    kv_len = c.length - c.q_back
    # q in the (B, L, H, D) layout projections produce, viewed as (B, H, L, D): non-contiguous.
    q = torch.randn(c.B, c.Lq, c.Hkv * c.group, c.D, generator=g).transpose(1, 2).to(c.dtype)
    mask = make_mask(c, g, kv_len, valid[:, :kv_len]).to(DEVICE) if c.mask else None
    kw = {"scale": c.scale if c.scale is not None else c.D ** -0.5, "causal": c.causal, "window": c.window,
              "softcap": c.softcap, "mask": mask}
    q_start = kv_len - c.Lq if c.pass_q_start else None
    return (q.to(DEVICE), _to_device(kv), valid.to(DEVICE) if c.pass_valid else None, q_start), kw


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def check_case(c: Case, num_splits=None):
    """Kernel vs reference (output and lse); returns the kernel's output."""
    args, kw = make_inputs(c)
    out, lse = attention_over_codes(*args, **kw, num_splits=num_splits, return_lse=True)
    ref, ref_lse = attention_over_codes_reference(*args, **kw, return_lse=True)
    assert out.shape == ref.shape and out.dtype == ref.dtype and lse.dtype == F32
    assert torch.isfinite(out).all()
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    assert (out[empty] == 0).all()
    assert rel_err(out, ref) <= TOLERANCE[c.dtype]
    if (~empty).any():
        assert (lse[~empty] - ref_lse[~empty]).abs().max().item() <= LSE_TOLERANCE[c.dtype]
    return out


CASES = {
    # head dims 64 / 80 / 96 / 128, decode / chunk / prefill, GQA 1:1, 4:1, 8:1, sub-vectors and codebooks
    "d64-decode-kv1-exact-only": Case(1, Lq=1, length=1, exact=1, pads=(0, 1)),
    "d64-decode-kv1-coded-only": Case(2, Lq=1, length=1, exact=0, pads=(0, 1)),
    "d80-decode-kv17-gqa4-sub16": Case(3, D=80, sub=16, Lq=1, length=17, exact=4, group=4),
    "d96-prefill17-gqa8-sub2-c256": Case(4, D=96, sub=2, centroids=256, Lq=17, length=17, exact=0,
                                         group=8, pads=(0, 4, 9)),
    "d128-chunk-kv100-gqa4-sub8": Case(5, D=128, Lq=17, length=100, exact=20, group=4, pads=(0, 30, 90)),
    "d64-prefill-kv1000-fp16": Case(6, Lq=128, length=1000, exact=40, Hkv=1, group=2, pads=(600,),
                                    dtype=F16, layout="bshd"),
    "d128-decode-kv1000-gqa8": Case(7, D=128, sub=16, Lq=1, length=1000, exact=30, Hkv=1, group=8,
                                    pads=(5, 990)),
    "dv80-d64-sub-v16": Case(8, D=64, Dv=80, sub=4, sub_v=16, Lq=17, length=40, exact=10, group=2),
    "bshd-no-exact": Case(9, Lq=17, length=50, exact=0, group=2, layout="bshd"),
    "all-exact": Case(10, Lq=5, length=30, exact=30, group=2, pads=(0, 3, 29)),
    "queries-not-last": Case(11, Lq=5, length=60, exact=20, q_back=15, group=2),
    # window, softcap, masks, causal flag, valid=None / q_start=None
    "window20-chunk-gqa2": Case(12, Lq=17, length=100, exact=10, group=2, window=20, pads=(0, 70, 95)),
    "softcap-window-bf16": Case(13, D=128, Lq=17, length=100, exact=16, group=2, window=32, softcap=30.0,
                                scale=0.5, dtype=BF16),
    "mask-random-gqa4": Case(14, Lq=17, length=60, exact=12, group=4, mask="random"),
    "mask-left-padding-fp16": Case(15, D=96, sub=4, Lq=17, length=60, exact=5, group=2, mask="padding",
                                   pass_valid=False, dtype=F16),
    "noncausal": Case(16, Lq=17, length=50, exact=20, group=2, causal=False),
    "no-valid-no-qstart": Case(17, Lq=3, length=40, exact=7, group=4, pass_valid=False,
                               pass_q_start=False),
    # dtypes: fp32 queries over a 16-bit store (fp32 dots), 16-bit everywhere
    "fp32q-over-fp16-store": Case(18, Lq=17, length=100, exact=9, group=4, store_dtype=F16),
    "bf16q-over-fp32-store": Case(19, D=80, sub=2, centroids=256, Lq=1, length=33, group=3, dtype=BF16,
                                  store_dtype=F32),
    "fp16-decode-gqa8": Case(20, D=128, sub=16, Lq=1, length=100, exact=3, group=8, dtype=F16),
    "bf16-chunk-sub8-c256": Case(21, D=96, centroids=256, Lq=17, length=100, exact=25, group=3, dtype=BF16),
    # pre-RoPE key codes rotated in the kernel: full and partial rotary, YaRN-like scaling, padded rows
    "rope-d64-chunk-gqa3": Case(22, Lq=17, length=100, exact=10, group=3, rope=64),
    "rope-d80-partial32-decode-fp16": Case(23, D=80, sub=16, Lq=1, length=300, exact=20, group=4, rope=32,
                                           pads=(0, 40, 250), dtype=F16),
    "rope-d128-prefill-scaled-bf16": Case(24, D=128, sub=16, Lq=60, length=60, exact=0, group=2, rope=128,
                                          rope_scaling=1.2, dtype=BF16),
    "rope-d96-sub2-long": Case(25, D=96, sub=2, centroids=256, Lq=1, length=1000, exact=32, Hkv=1, group=8,
                               rope=96, pads=(7,)),
    # rotation pairs 20 apart, sub-vectors of 16: the element-wise centroid gather (whole_sub_vectors is False)
    "rope-d64-partial40-sub16-elementwise": Case(26, D=64, sub=16, Lq=3, length=90, exact=9, group=2, rope=40,
                                                 dtype=F16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_dense_grid_matches_reference(name):
    check_case(CASES[name], num_splits=1)


SPLIT_CASES = {
    "decode-gqa8-s3": (Case(31, Lq=1, length=300, exact=20, group=8, pads=(0, 50, 299)), 3),
    "decode-window-softcap-s3": (Case(32, D=80, sub=16, Lq=1, length=300, exact=40, group=4, window=100,
                                      softcap=20.0, pads=(0, 250, 10)), 3),
    "lq3-mask-random-fp16-s3": (Case(33, D=96, Lq=3, length=200, exact=15, group=3, mask="random",
                                     dtype=F16), 3),
    "more-splits-than-tiles-bf16": (Case(34, D=128, Lq=1, length=33, group=2, dtype=BF16), 16),
    "kv1-s2": (Case(35, Lq=1, length=1, exact=0, pads=(0, 1)), 2),
}


@pytest.mark.parametrize("name", list(SPLIT_CASES))
def test_split_kv_matches_reference(name):
    case, splits = SPLIT_CASES[name]
    check_case(case, num_splits=splits)


def test_auto_split_on_long_decode():
    # 2048 keys, one (batch, kv head) program: the automatic rule picks split-KV.
    c = Case(41, Lq=1, length=2048, exact=48, Hkv=1, group=4, pads=(100,), dtype=F16)
    auto = check_case(c, num_splits=None)
    assert rel_err(auto, check_case(c, num_splits=1)) <= 1e-2


@pytest.mark.parametrize("num_splits", [1, 3])
def test_lse_is_optional(num_splits):
    args, kw = make_inputs(Case(42, Lq=2, length=70, exact=10, group=2))
    out, _ = attention_over_codes(*args, **kw, num_splits=num_splits, return_lse=True)
    assert torch.equal(attention_over_codes(*args, **kw, num_splits=num_splits), out)
    assert torch.equal(attention_over_codes_reference(*args, **kw),
                       attention_over_codes_reference(*args, **kw, return_lse=True)[0])


@pytest.mark.parametrize("num_splits", [1, 3])
def test_garbage_cannot_leak(num_splits):
    """Storage that must not be read holds NaN / huge values / zeros, codes and anchor_slot entries
    that must not be read vary: the output must be bit-identical."""
    c = Case(51, Lq=9, length=120, exact=30, group=2, pads=(0, 20, 100), window=80)
    (q, kv, valid, q_start), kw = make_inputs(c)
    E, pad_row = kv.exact_start, kv.anchor_k.shape[2] - 1     # make_store: pads use the last row
    after_exact = torch.arange(kv.anchor_slot.shape[2], device=DEVICE) >= E
    unread_codes = ((kv.anchor_slot >= 0) | after_exact)[..., None]
    outs = []
    for fill, code, slot in ((NAN, GARBAGE_CODE, pad_row + 3), (1e30, 0, -1), (0.0, 63, 0)):
        fields = {n: t.clone() for n, t in kv.tensors().items()}
        for side in ("k", "v"):
            fields[f"anchor_{side}"][:, :, pad_row] = fill
            fields[f"exact_{side}"].masked_fill_(~valid[:, None, E:kv.length, None], fill)
            fields[f"codes_{side}"].masked_fill_(unread_codes, code)
        fields["anchor_slot"].masked_fill_(after_exact, slot)
        outs.append(attention_over_codes(q, CodedKV(**fields, exact_start=E), valid, q_start, **kw,
                                         num_splits=num_splits))
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("num_splits", [1, 2])
@pytest.mark.parametrize("dtype", [F32, F16])
def test_rows_without_visible_key_are_zero_with_lse_neg_inf(num_splits, dtype):
    c = Case(61, Lq=4, length=70, exact=6, group=2, pads=(70, 67, 0), dtype=dtype)   # q_start = 66
    (q, kv, valid, q_start), kw = make_inputs(c)
    mask = torch.arange(70, device=DEVICE) <= q_start + torch.arange(4, device=DEVICE)[:, None]
    mask[-1] = False                                   # the last query sees nothing
    for extra in ({}, {"window": 3}, {"mask": mask[None, None]}):
        out, lse = attention_over_codes(q, kv, valid, q_start, **{**kw, **extra}, num_splits=num_splits,
                                        return_lse=True)
        none = torch.zeros_like(lse, dtype=torch.bool)
        none[0] = True                                 # batch row 0: every slot is padding
        none[1, :, :1] = True                          # row 1: query 0 (slot 66) sees only pads
        if "mask" in extra:
            none[:, :, -1] = True
        assert torch.isfinite(out).all()
        assert torch.equal(torch.isneginf(lse), none)
        assert (out[none] == 0).all() and (out[~none].float().abs().sum(-1) > 0).all()


@pytest.mark.parametrize("num_splits", [1, 3])
def test_a_query_slot_held_on_the_device_gives_the_host_slots_result(num_splits):
    """A captured decode step passes q_start as a (1,) int64 device tensor (the launch is planned for the whole
    store): kernel and reference give what the same slot as a python int gives, lse too; the query need not be
    the store's last slot (q_back)."""
    c = Case(91, D=80, sub=16, Lq=1, length=70, exact=12, group=4, pads=(0, 9, 40), window=30, softcap=15.0,
             q_back=5)
    (q, kv, valid, q_start), kw = make_inputs(c)
    on_device = torch.tensor([q_start], device=DEVICE)
    for fn in (attention_over_codes, attention_over_codes_reference):
        extra = {"num_splits": num_splits}
        want, want_lse = fn(q, kv, valid, q_start, **kw, **extra, return_lse=True)
        got, got_lse = fn(q, kv, valid, on_device, **kw, **extra, return_lse=True)
        assert rel_err(got, want) <= 1e-6 and (got_lse - want_lse).abs().max().item() <= 1e-5


@pytest.mark.parametrize("num_splits", [1, 3])
def test_an_int16_anchor_map_gives_the_int32_maps_result(num_splits):
    """The store keeps its anchor map as int16 while the anchor rows fit: kernel and reference read it as int32."""
    (q, kv, valid, q_start), kw = make_inputs(Case(93, Lq=2, length=150, exact=9, group=2, anchors=0.3, rope=64))
    small = dataclasses.replace(kv, anchor_slot=kv.anchor_slot.to(torch.int16))
    for fn in (attention_over_codes, attention_over_codes_reference):
        extra = {"num_splits": num_splits}
        assert torch.equal(fn(q, small, valid, q_start, **kw, **extra), fn(q, kv, valid, q_start, **kw, **extra))


def test_centroids_are_read_a_sub_vector_at_a_time_where_rope_pairs_allow():
    from kvpass.kernels.coded_attention.kernel import whole_sub_vectors

    assert whole_sub_vectors(8, 0) and whole_sub_vectors(16, 64) and whole_sub_vectors(16, 16)
    assert not whole_sub_vectors(16, 20) and not whole_sub_vectors(8, 20) and whole_sub_vectors(4, 20)


def test_all_exact_store_matches_dense_kernel():
    """exact_start = 0: the coded kernel is the dense kernel over exact_k / exact_v (lse too), up to
    the summation order (the two kernels' launch parameters differ)."""
    (q, kv, valid, q_start), kw = make_inputs(Case(71, Lq=5, length=80, exact=80, group=2, pads=(0, 9, 40)))
    for num_splits in (1, 3):
        out, lse = attention_over_codes(q, kv, valid, q_start, **kw, num_splits=num_splits, return_lse=True)
        dense, dense_lse = attention_over_store(q, kv.exact_k, kv.exact_v, valid[:, :80], q_start, **kw,
                                                num_splits=num_splits, return_lse=True)
        assert rel_err(out, dense) <= 1e-6
        assert torch.equal(torch.isneginf(lse), torch.isneginf(dense_lse))
        assert (lse - dense_lse).nan_to_num(0.0).abs().max().item() <= 1e-5


def test_dequantize_matches_explicit_loop():
    c = Case(81, D=16, sub=4, length=9, exact=3, Hkv=2, pads=(0, 0), extra=2, anchors=0.4)
    kv, _ = make_store(c, torch.Generator().manual_seed(81))
    k, v = dequantize(kv)
    assert k.shape == (2, 2, 9, 16) and k.dtype == F32 and v.shape == (2, 2, 9, 16)
    for b in range(2):
        for h in range(2):
            for j in range(9):
                for got, codes, codebook, anchors, exact in (
                        (k, kv.codes_k, kv.codebook_k, kv.anchor_k, kv.exact_k),
                        (v, kv.codes_v, kv.codebook_v, kv.anchor_v, kv.exact_v)):
                    if j >= kv.exact_start:
                        want = exact[b, h, j - kv.exact_start]
                    elif kv.anchor_slot[b, h, j] >= 0:
                        want = anchors[b, h, kv.anchor_slot[b, h, j]]
                    else:
                        want = torch.cat([codebook[h, m, codes[b, h, j, m].long()] for m in range(4)])
                    assert torch.equal(got[b, h, j], want.float()), (b, h, j)


def test_rope_rotate_matches_transformers_and_inverts():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(91)
    x = torch.randn(2, 3, 7, 64, generator=g)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [-3, -2, -1, 0, 1, 2, 3]])
    inv_freq = 1e4 ** (-torch.arange(0, 64, 2, dtype=F32) / 64)
    angle = positions[..., None].float() * inv_freq
    emb = torch.cat([angle, angle], -1)
    _, want = apply_rotary_pos_emb(x, x, emb.cos(), emb.sin())
    assert torch.allclose(rope_rotate(x, positions, inv_freq, 1.0), want, atol=1e-5)
    assert torch.allclose(rope_rotate(rope_rotate(x, positions, inv_freq, 1.3), positions, inv_freq, 1.3,
                                      inverse=True), x, atol=1e-5)
    partial = rope_rotate(x, positions, inv_freq[:8], 1.0)           # partial rotary: 16 of 64 dims
    assert torch.equal(partial[..., 16:], x[..., 16:])


def test_dequantize_rotates_only_coded_keys():
    c = Case(92, D=16, sub=4, length=12, exact=3, Hkv=2, pads=(0, 2), anchors=0.3, rope=8)
    kv, _ = make_store(c, torch.Generator().manual_seed(92))
    k, v = dequantize(kv)
    k0, v0 = dequantize(dataclasses.replace(kv, rotation=None))
    E = kv.exact_start
    coded = (kv.anchor_slot[..., :E] < 0)[..., None]
    positions = torch.arange(E)[None] - torch.tensor(c.pads)[:, None]
    rotated = rope_rotate(k0[:, :, :E], positions, kv.rotation.inv_freq, 1.0)
    exact = dict(rtol=0, atol=0, equal_nan=True)       # pad slots are NaN anchors
    torch.testing.assert_close(k[:, :, :E], torch.where(coded, rotated, k0[:, :, :E]), **exact)
    torch.testing.assert_close(k[:, :, E:], k0[:, :, E:], **exact)
    torch.testing.assert_close(v, v0, **exact)


def _valid_kv(**change):
    """A small valid CodedKV (B 1, Hkv 2, S 6, D 8, 2 sub-vectors, 4 centroids, A 2, P 2, length 5)."""
    B, H, S, D, M, C, A, P = 1, 2, 6, 8, 2, 4, 2, 2
    codes, tokens = torch.zeros(B, H, S, M, dtype=torch.uint8), torch.zeros(B, H, P, D)
    fields = {"codes_k": codes, "codes_v": codes, "codebook_k": torch.zeros(H, M, C, D // M),
              "codebook_v": torch.zeros(H, M, C, D // M), "anchor_slot": torch.full((B, H, S), -1, dtype=torch.int32),
              "anchor_k": torch.zeros(B, H, A, D), "anchor_v": torch.zeros(B, H, A, D), "exact_k": tokens,
              "exact_v": tokens, "exact_start": 3}
    return CodedKV(**{**fields, **change})


BAD_STORES = {
    "codes-dtype": ({"codes_k": torch.zeros(1, 2, 6, 2, dtype=torch.int32)}, r"codes_k must be torch.uint8"),
    "anchor_slot-dtype": ({"anchor_slot": torch.full((1, 2, 6), -1)}, r"anchor_slot must be torch.int16 / torch.int32"),
    "codebook-int": ({"codebook_v": torch.zeros(2, 2, 4, 4, dtype=torch.int8)}, r"codebook_v must be"),
    "codes-3d": ({"codes_v": torch.zeros(1, 2, 6, dtype=torch.uint8)}, r"codes_v must be a 4-D tensor"),
    "d-not-multiple-of-m": ({"codes_k": torch.zeros(1, 2, 6, 3, dtype=torch.uint8)},
                            r"head dim 8 \(anchor_k\) is not a multiple of the number of sub-vectors 3"),
    "too-many-centroids": ({"codebook_k": torch.zeros(2, 2, 257, 4)}, r"codebook_k .* has 257 centroids"),
    "codebook-sub-length": ({"codebook_k": torch.zeros(2, 2, 4, 2)}, r"codebook_k must have shape \(2, 2, 4, 4\)"),
    "codes-capacity": ({"codes_v": torch.zeros(1, 2, 5, 2, dtype=torch.uint8)}, r"codes_v must have shape"),
    "anchor-v-rows": ({"anchor_v": torch.zeros(1, 2, 3, 8)}, r"anchor_v must have shape \(1, 2, 2, 8\)"),
    "no-anchor-rows": ({"anchor_k": torch.zeros(1, 2, 0, 8), "anchor_v": torch.zeros(1, 2, 0, 8)}, r"A >= 1"),
    "exact-v-count": ({"exact_v": torch.zeros(1, 2, 1, 8)}, r"exact_v must have shape \(1, 2, 2, 8\)"),
    "exact-past-capacity": ({"exact_start": 5}, r"exact_start = 5 must be .*P = 2 .*S = 6"),
    "exact_start-float": ({"exact_start": 3.0}, r"exact_start = 3.0"),
}


@pytest.mark.parametrize("name", list(BAD_STORES))
def test_validate_names_the_problem(name):
    change, pattern = BAD_STORES[name]
    with pytest.raises(ValueError, match=pattern):
        _valid_kv(**change).validate()


BAD_CALLS = {
    "not-a-store": ({"kv": (torch.zeros(1, 2, 5, 8),) * 2}, TypeError, r"kv must be a CodedKV"),
    "valid-length-not-capacity": ({"valid": torch.ones(1, 5, dtype=torch.bool)}, ValueError,
                                  r"valid must be None or a bool tensor of shape \(B, S\) = \(1, 6\)"),
    # check_attention_inputs calls the store's length (5) its capacity
    "kv_len-past-length": ({"q_start": 5}, ValueError, r"q_start \+ Lq = 5 \+ 1 = 6 exceeds .* S = 5"),
    "head-dim": ({"q": torch.zeros(1, 4, 1, 16)}, ValueError, r"same head dim"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
@pytest.mark.parametrize("fn", [attention_over_codes, attention_over_codes_reference], ids=["kernel", "reference"])
def test_bad_inputs_raise(fn, name):
    change, error, pattern = BAD_CALLS[name]
    call = {"q": torch.zeros(1, 4, 1, 8), "kv": _to_device(_valid_kv()), "valid": None, "q_start": None, **change}
    call = {n: a.to(DEVICE) if isinstance(a, torch.Tensor) else a for n, a in call.items()}
    with pytest.raises(error, match=pattern):
        fn(call.pop("q"), call.pop("kv"), **call, scale=0.125)


@pytest.mark.skipif(not _INTERPRET, reason="on a GPU the kernels are compiled by running them")
def test_kernels_compile_for_hopper():
    """The interpreter runs kernels as numpy: also compile what two small cases (one pass, split-KV) launches for sm_90, as a GPU would
    (tests/hopper_compile.py)."""
    from hopper_compile import assert_what_runs_compiles_for_hopper

    assert_what_runs_compiles_for_hopper(lambda: test_dense_grid_matches_reference(next(iter(CASES))),
                                         lambda: test_split_kv_matches_reference(next(iter(SPLIT_CASES))))
