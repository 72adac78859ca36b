"""Triton attention-over-store kernel vs the fp32 PyTorch reference.

Runs on a GPU, or on CPU through Triton's interpreter:

    TRITON_INTERPRET=1 python -m pytest tests/test_attention_kernel.py -q

Errors are relative Frobenius errors ||out - ref|| / ||ref||: <= 1e-3 for fp32 queries (the
kernel then computes in fp32, also over an fp16 store), <= 1e-2 for fp16/bf16 queries (16-bit
tl.dot operands with fp32 accumulation, and a 16-bit output). Every case also checks that the output is finite and that
rows with no visible key are exactly zero. Unused store slots (past kv_len) and invalid slots
hold NaN, so a masked slot leaking into a product shows up as NaN. (Without ``valid``, slots below
kv_len must be finite, so there padding slots hold finite values and only a mask may hide them.)
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not torch.cuda.is_available() and not _INTERPRET:
    pytest.skip(
        "Triton attention kernel needs a CUDA GPU; on CPU run with TRITON_INTERPRET=1 in the environment",
        allow_module_level=True,
    )
pytest.importorskip("triton")

from kvpass.kernels.attention import attention_over_store, attention_over_store_reference  # noqa: E402
from kvpass.kernels.attention.dense import choose_num_splits  # noqa: E402
from kvpass.kernels.attention.reference import visibility_mask  # noqa: E402

DEVICE = "cpu" if _INTERPRET else "cuda"
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@dataclasses.dataclass(frozen=True)
class Case:
    seed: int
    D: int = 64
    Dv: int | None = None           # None: same as D
    Lq: int = 1
    kv_len: int = 33                # q_start = kv_len - Lq
    Hkv: int = 2
    group: int = 1                  # query heads per kv head
    pads: tuple = (0, 3, 10)        # left padding (invalid leading slots) per batch row
    extra: int = 7                  # store capacity S = kv_len + extra; the tail is NaN
    window: int = 0
    softcap: float = 0.0
    scale: float | None = None      # None: D ** -0.5
    causal: bool = True
    # Full mask over all kv_len keys. None | "random" (query 0 sees nothing) | "causal" (HF-style:
    # causal, padding when the mask has a batch dim, and a sliding window when mask_window > 0).
    mask: str | None = None
    # "batch" (B,1,Lq,kv_len) | "all" (1,1,Lq,kv_len) | "head" (B,Hq,Lq,kv_len) | "expanded" (a
    # (B,1,Lq,kv_len) mask expanded to (B,Hq,Lq,kv_len), head stride 0)
    mask_shape: str = "batch"
    mask_window: int = 0
    pass_valid: bool = True         # False: valid=None (every slot valid)
    pass_q_start: bool = True       # False: q_start=None, over the store sliced to S = kv_len
    dtype: torch.dtype = F32        # q dtype
    store_dtype: torch.dtype | None = None  # None: same as q
    layout: str = "bhsd"            # store layout: "bhsd", or "bshd" (HF-style, a transposed view)

    @property
    def B(self):
        return len(self.pads)


def make_inputs(c: Case):
    """Fresh random inputs for a case; garbage (NaN) in unused and invalid store slots."""
    g = torch.Generator().manual_seed(c.seed)
    B, Hkv, Hq, Lq, D = c.B, c.Hkv, c.Hkv * c.group, c.Lq, c.D
    Dv = c.Dv or D
    S = c.kv_len + c.extra
    q_start = c.kv_len - Lq
    sdt = c.store_dtype or c.dtype
    # q in the (B, L, H, D) layout projections produce, viewed as (B, H, L, D): non-contiguous.
    q = torch.randn(B, Lq, Hq, D, generator=g).transpose(1, 2).to(c.dtype)

    def store(d):
        if c.layout == "bshd":
            return torch.randn(B, S, Hkv, d, generator=g).to(sdt).transpose(1, 2)
        return torch.randn(B, Hkv, S, d, generator=g).to(sdt)

    k, v = store(D), store(Dv)
    # valid as a slice of a wider buffer (non-trivial batch stride).
    valid = torch.ones(B, S + 5, dtype=torch.bool)[:, :S]
    nan = float("nan")
    for b, pad in enumerate(c.pads):
        valid[b, :pad] = False
        if c.pass_valid:
            k[b, :, :pad] = nan
            v[b, :, :pad] = nan
    k[:, :, c.kv_len:] = nan
    v[:, :, c.kv_len:] = nan
    valid[1:, c.kv_len:] = False    # row 0 keeps its NaN tail "valid": must not be read past kv_len
    mask = make_mask(c, g, valid[:, :c.kv_len]) if c.mask is not None else None
    kw = dict(scale=c.scale if c.scale is not None else D ** -0.5, causal=c.causal,
              window=c.window, softcap=c.softcap, mask=mask)
    if not c.pass_q_start:
        k, v, valid, q_start = k[:, :, :c.kv_len], v[:, :, :c.kv_len], valid[:, :c.kv_len], None
    if not c.pass_valid:
        valid = None
    to = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    kw["mask"] = to(mask)
    return (to(q), to(k), to(v), to(valid), q_start), kw


def make_mask(c: Case, g, not_pad):
    """A (Bm, Hm, Lq, kv_len) bool mask as c.mask / c.mask_shape say; not_pad: (B, kv_len) bool.

    Built as a slice of a wider buffer, like a mask cut from a static cache's: non-trivial strides.
    """
    B, Hq, Lq, kv_len = c.B, c.Hkv * c.group, c.Lq, c.kv_len
    Bm, Hm = {"batch": (B, 1), "all": (1, 1), "head": (B, Hq), "expanded": (B, 1)}[c.mask_shape]
    mask = torch.zeros(Bm, Hm, Lq, kv_len + 3, dtype=torch.bool)[..., :kv_len]
    p = kv_len - Lq + torch.arange(Lq)[:, None]     # query slots
    j = torch.arange(kv_len)[None, :]
    if c.mask == "random":
        mask[:] = torch.rand(Bm, Hm, Lq, kv_len, generator=g) < 0.6
        mask[..., 0, :] = False                     # a row that sees nothing
        mask[..., 1:, :] |= (j == p)[1:]            # the others see at least their own slot
    else:
        mask[:] = j <= p
        if c.mask_window > 0:
            mask &= j > p - c.mask_window
        if Bm == B:
            mask &= not_pad[:, None, None, :]
    if c.mask_shape == "expanded":
        mask = mask.expand(B, Hq, Lq, kv_len)
    return mask


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def tolerance(c: Case):
    # fp32 queries: the kernel computes and returns fp32. 16-bit queries: 16-bit dot operands
    # and/or a 16-bit output (bf16 rounding of the output alone is ~4e-3 relative).
    return 1e-3 if c.dtype == F32 else 1e-2


def check_case(c: Case, num_splits=None):
    args, kw = make_inputs(c)
    q = args[0]
    out = attention_over_store(*args, **kw, num_splits=num_splits)
    ref = attention_over_store_reference(*args, **kw)
    Dv = c.Dv or c.D
    assert out.shape == (c.B, c.Hkv * c.group, c.Lq, Dv)
    assert out.dtype == q.dtype and out.is_contiguous()
    assert torch.isfinite(ref).all(), "reference leaked garbage"
    assert torch.isfinite(out).all(), "kernel output has NaN/inf (masked garbage leaked?)"
    valid = args[3] if args[3] is not None else torch.ones(c.B, c.kv_len, dtype=torch.bool, device=DEVICE)
    mask = visibility_mask(valid, c.kv_len - c.Lq, c.Lq, c.Hkv * c.group, causal=c.causal,
                           window=c.window, mask=kw["mask"])
    empty = ~mask.any(dim=-1)
    assert (out[empty] == 0).all(), "rows with no visible key must be exactly 0"
    assert ref.norm() > 0, "degenerate case: every row is empty"
    err = rel_err(out, ref)
    assert err <= tolerance(c), f"relative error {err:.2e} > {tolerance(c):.0e}"
    return out


DENSE_CASES = {
    # head dims, decode/prefill, kv_len 1 / 33 / 100, GQA 1:1 3:1 4:1 8:1, padding
    "d64-decode-kv1-mha": Case(1, D=64, Lq=1, kv_len=1, pads=(0, 1, 0)),
    "d80-decode-kv33-gqa3": Case(2, D=80, Lq=1, kv_len=33, group=3, pads=(0, 5, 32)),
    "d96-prefill-kv17-gqa4": Case(3, D=96, Lq=17, kv_len=17, group=4, pads=(0, 4, 9)),
    "d128-chunk-kv100-gqa8": Case(4, D=128, Lq=17, kv_len=100, group=8, pads=(0, 30, 90)),
    "d64-chunk-kv33-bshd": Case(5, D=64, Lq=17, kv_len=33, layout="bshd", pads=(2, 0, 20)),
    # sliding window (shorter than the sequence); decode with a row that sees nothing
    "window20-chunk-gqa2": Case(6, Lq=17, kv_len=100, group=2, window=20, pads=(0, 70, 95)),
    "window16-decode-gqa4": Case(7, D=80, Lq=1, kv_len=100, group=4, window=16, pads=(0, 100, 90)),
    # soft-capping (large scale so the cap matters), with and without window (Gemma-2 style)
    "softcap-gqa3": Case(8, Lq=17, kv_len=33, group=3, softcap=5.0, scale=0.5),
    "softcap-window-bf16": Case(9, D=128, Lq=17, kv_len=100, group=2, window=32, softcap=30.0,
                                dtype=BF16, layout="bshd"),
    # full mask over all keys, broadcast over heads / batch+heads, per head, expanded (stride 0);
    # q_start 0 and > 0. causal / window arguments are ignored: a random mask shows future keys.
    "mask-random-batch-gqa4": Case(10, Lq=17, kv_len=33, group=4, mask="random"),
    "mask-random-all-window-ignored": Case(11, Lq=17, kv_len=100, group=2, window=40, mask="random",
                                           mask_shape="all"),
    "mask-random-head-qstart0": Case(12, D=96, Lq=17, kv_len=17, group=3, mask="random",
                                     mask_shape="head", pads=(0, 2, 5)),
    # HF-style causal + padding masks; the window argument (4) is ignored, the mask's (20) rules
    "mask-sliding-window-arg-ignored": Case(22, Lq=40, kv_len=100, group=4, window=4, mask="causal",
                                            mask_window=20),
    "mask-causal-all-noncausal-arg": Case(23, Lq=17, kv_len=60, group=2, causal=False, mask="causal",
                                          mask_shape="all"),
    "mask-sliding-head-bf16-bshd": Case(24, D=128, Lq=17, kv_len=100, group=2, mask="causal",
                                        mask_window=24, mask_shape="head", dtype=BF16, layout="bshd"),
    "mask-causal-expanded-decode": Case(25, D=80, Lq=1, kv_len=100, group=4, mask="causal",
                                        mask_shape="expanded", pads=(0, 100, 90)),
    # valid=None (padding, if any, only in the mask) and q_start=None (queries are the last slots)
    "no-valid-decode": Case(26, Lq=1, kv_len=50, group=4, pass_valid=False),
    "no-valid-mask-causal-padding": Case(27, Lq=17, kv_len=60, group=2, pass_valid=False, mask="causal"),
    "no-qstart-chunk-window": Case(28, Lq=17, kv_len=60, group=2, window=20, pass_q_start=False),
    "no-valid-no-qstart-mask-head": Case(29, Lq=5, kv_len=40, pass_valid=False, pass_q_start=False,
                                         mask="random", mask_shape="head"),
    "noncausal": Case(13, Lq=17, kv_len=50, group=2, causal=False),
    "noncausal-window": Case(14, D=80, Lq=17, kv_len=60, causal=False, window=10, pads=(0, 1, 30)),
    # 16-bit and mixed dtypes
    "fp16-decode-gqa8": Case(15, D=128, Lq=1, kv_len=100, group=8, dtype=F16),
    "bf16-chunk-gqa3-window": Case(16, D=96, Lq=17, kv_len=100, group=3, window=30, dtype=BF16),
    "fp16-prefill-mask-causal": Case(17, D=64, Lq=17, kv_len=17, group=4, mask="causal", dtype=F16),
    "fp32q-over-fp16-store": Case(18, Lq=17, kv_len=100, group=4, dtype=F32, store_dtype=F16),
    "bf16q-over-fp32-store": Case(19, D=80, Lq=1, kv_len=33, group=3, dtype=BF16, store_dtype=F32),
    # Dv != D, and head dim 256
    "dv80-d64": Case(20, D=64, Dv=80, Lq=17, kv_len=40, group=2),
    "d256-decode-fp16": Case(21, D=256, Lq=1, kv_len=33, group=2, dtype=F16),
}


@pytest.mark.parametrize("name", list(DENSE_CASES))
def test_dense_matches_reference(name):
    check_case(DENSE_CASES[name], num_splits=1)


SPLIT_CASES = {
    "decode-gqa8-s4": (Case(31, Lq=1, kv_len=300, group=8, pads=(0, 50, 299)), 4),
    "decode-window-softcap-s3": (Case(32, D=80, Lq=1, kv_len=300, group=4, window=100,
                                      softcap=20.0, pads=(0, 250, 10)), 3),
    "lq3-mask-random-fp16-s5": (Case(33, D=96, Lq=3, kv_len=200, group=3, mask="random",
                                     dtype=F16), 5),
    "decode-mask-sliding-s4": (Case(38, Lq=1, kv_len=300, group=4, mask="causal", mask_window=100,
                                    pads=(0, 250, 10)), 4),
    "no-valid-no-qstart-s3": (Case(39, Lq=1, kv_len=200, group=8, pass_valid=False,
                                   pass_q_start=False), 3),
    "more-splits-than-tiles-bf16": (Case(34, D=128, Lq=1, kv_len=33, group=2, dtype=BF16), 16),
    "kv1-s2": (Case(35, Lq=1, kv_len=1, pads=(0, 1, 0)), 2),
    "chunk17-causal-s3": (Case(36, Lq=17, kv_len=150, group=4, pads=(0, 10, 140)), 3),
    "mixed-fp32q-fp16-store-s2": (Case(37, Lq=1, kv_len=130, group=4, store_dtype=F16), 2),
}


@pytest.mark.parametrize("name", list(SPLIT_CASES))
def test_split_kv_matches_reference(name):
    case, splits = SPLIT_CASES[name]
    check_case(case, num_splits=splits)


def test_split_and_dense_agree():
    c = Case(41, Lq=1, kv_len=200, group=4)
    dense = check_case(c, num_splits=1)
    split = check_case(c, num_splits=3)
    assert rel_err(split, dense) <= 1e-5


def test_auto_split_on_long_decode():
    # 2048 keys, one (batch, kv head) program: the automatic rule must pick split-KV.
    c = Case(42, Lq=1, kv_len=2048, Hkv=1, group=4, pads=(100,), extra=3)
    assert choose_num_splits(programs=1, keys=2048) > 1
    check_case(c, num_splits=None)


def test_choose_num_splits_rule():
    # decode at 128K, batch 1, 8 kv heads: split; prefill-sized grids or short contexts: dense.
    assert choose_num_splits(programs=8, keys=128 * 1024, sm_count=132) > 1
    assert choose_num_splits(programs=8, keys=128 * 1024, sm_count=132) <= 64
    assert choose_num_splits(programs=4096, keys=128 * 1024, sm_count=132) == 1
    assert choose_num_splits(programs=8, keys=512, sm_count=132) == 1
    # never fewer than 512 keys per split
    assert choose_num_splits(programs=1, keys=2048, sm_count=132) == 4


@pytest.mark.parametrize("num_splits", [1, 3])
def test_masked_garbage_cannot_leak(num_splits):
    """Invalid and unused slots hold NaN / huge values / zeros: the output must be bit-identical."""
    c = Case(51, Lq=17, kv_len=100, group=4, pads=(0, 20, 60), window=50)
    (q, k, v, valid, q_start), kw = make_inputs(c)
    outs = []
    for fill in (float("nan"), 1e30, 0.0):
        k2, v2 = k.clone(), v.clone()
        for t in (k2, v2):
            t.masked_fill_(~valid[:, None, :, None], fill)   # invalid slots (incl. the tail of rows 1, 2)
            t[:, :, c.kv_len:] = fill                        # the whole tail (row 0's is marked valid)
        outs.append(attention_over_store(q, k2, v2, valid, q_start, **kw, num_splits=num_splits))
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("num_splits", [1, 2])
@pytest.mark.parametrize("dtype", [F32, F16])
def test_fully_masked_rows_are_exact_zeros(num_splits, dtype):
    B, Hkv, group, Lq, S, D = 3, 2, 2, 4, 70, 64
    g = torch.Generator().manual_seed(61 + num_splits)
    q = torch.randn(B, Hkv * group, Lq, D, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype).to(DEVICE)
    valid = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    q_start = 60
    valid[0] = False                 # batch row 0: nothing valid at all
    valid[1, :62] = False            # batch row 1: queries 0, 1 see no valid key (causal)
    k.masked_fill_(~valid[:, None, :, None], float("nan"))
    v.masked_fill_(~valid[:, None, :, None], float("nan"))
    # causal mask over all keys, except that the last query sees nothing
    mask = torch.arange(q_start + Lq) <= q_start + torch.arange(Lq)[:, None]
    mask[-1] = False
    mask = mask[None, None].to(DEVICE)
    for kw in (dict(), dict(window=5), dict(mask=mask)):
        out = attention_over_store(q, k, v, valid, q_start, scale=D ** -0.5, num_splits=num_splits, **kw)
        ref = attention_over_store_reference(q, k, v, valid, q_start, scale=D ** -0.5, **kw)
        assert torch.isfinite(out).all()
        assert (out[0] == 0).all()
        assert (out[1, :, :2] == 0).all()
        seen = Lq - 1 if "mask" in kw else Lq
        assert (out[:, :, seen:] == 0).all()
        assert (out[2, :, :seen].float().abs().sum(-1) > 0).all()    # row 2 sees keys everywhere
        assert rel_err(out, ref) <= (1e-3 if dtype == F32 else 1e-2)


def _tensors(B=2, Hq=4, Hkv=2, Lq=3, S=10, D=64, Dv=64):
    return (torch.randn(B, Hq, Lq, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, Dv),
            torch.ones(B, S, dtype=torch.bool))


BAD_INPUTS = {
    "kv_len>S": (lambda: (*_tensors(S=10), 8), {}, r"exceeds the store capacity S = 10"),
    "gqa-not-divisible": (lambda: (*_tensors(Hq=3), 0), {}, r"multiple of kv heads"),
    "head-dim-mismatch": (lambda: (torch.randn(2, 4, 3, 32), *_tensors()[1:], 0), {}, r"same head dim"),
    "k-v-capacity-mismatch": (lambda: (*_tensors()[:2], torch.randn(2, 2, 9, 64), _tensors()[3], 0), {},
                              r"k and v must agree"),
    "batch-mismatch": (lambda: (torch.randn(3, 4, 3, 64), *_tensors()[1:], 0), {}, r"same batch size"),
    "q-3d": (lambda: (torch.randn(4, 3, 64), *_tensors()[1:], 0), {}, r"q must be a 4-D tensor"),
    "valid-shape": (lambda: (*_tensors()[:3], torch.ones(2, 9, dtype=torch.bool), 0), {},
                    r"valid must be None or a bool tensor of shape \(B, S\)"),
    "valid-dtype": (lambda: (*_tensors()[:3], torch.ones(2, 10), 0), {}, r"valid must be None or a bool"),
    # q_start = 0, Lq = 3: kv_len = 3, not S = 10
    "mask-last-dim-is-S": (lambda: (*_tensors(), 0), {"mask": torch.ones(1, 1, 3, 10, dtype=torch.bool)},
                           r"mask shape \(1, 1, 3, 10\) must be .*kv_len = q_start \+ Lq = 3\)"),
    "mask-new-keys-only": (lambda: (*_tensors(), 5), {"mask": torch.ones(2, 1, 3, 3, dtype=torch.bool)},
                           r"mask shape \(2, 1, 3, 3\)"),
    "mask-lq": (lambda: (*_tensors(), 0), {"mask": torch.ones(1, 1, 2, 3, dtype=torch.bool)}, r"mask shape"),
    "mask-heads": (lambda: (*_tensors(), 0), {"mask": torch.ones(2, 2, 3, 3, dtype=torch.bool)},
                   r"mask shape"),
    "mask-batch": (lambda: (*_tensors(), 0), {"mask": torch.ones(3, 1, 3, 3, dtype=torch.bool)},
                   r"mask shape"),
    "mask-implicit-q_start": (lambda: (*_tensors(), None), {"mask": torch.ones(1, 1, 3, 3, dtype=torch.bool)},
                              r"kv_len = q_start \+ Lq = 10"),
    "mask-dtype": (lambda: (*_tensors(), 0), {"mask": torch.ones(1, 1, 3, 3)}, r"mask must be a 4-D bool"),
    "mask-3d": (lambda: (*_tensors(), 0), {"mask": torch.ones(1, 3, 3, dtype=torch.bool)},
                r"mask must be a 4-D bool"),
    "q_start-negative": (lambda: (*_tensors(), -1), {}, r"q_start must be"),
    "q_start-float": (lambda: (*_tensors(), 1.0), {}, r"q_start must be"),
    "lq>S-implicit-q_start": (lambda: (*_tensors(Lq=3, S=2), None), {},
                              r"Lq = 3 exceeds the store capacity S = 2"),
    "window-negative": (lambda: (*_tensors(), 0), {"window": -1}, r"window must be"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
@pytest.mark.parametrize("fn", [attention_over_store, attention_over_store_reference],
                         ids=["kernel", "reference"])
def test_bad_inputs_raise(fn, name):
    make, kw, pattern = BAD_INPUTS[name]
    args = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in make()]
    kw = {key: (val.to(DEVICE) if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    with pytest.raises(ValueError, match=pattern):
        fn(*args, scale=0.125, **kw)


def test_bad_num_splits_raise():
    args = [a.to(DEVICE) for a in _tensors()]
    with pytest.raises(ValueError, match="num_splits"):
        attention_over_store(*args, 0, scale=0.125, num_splits=0)


def test_visibility_mask_matches_rule():
    """The reference's vectorized mask against the rule written out element by element."""
    g = torch.Generator().manual_seed(71)
    B, Hq, Lq, q_start = 2, 2, 4, 5
    kv_len = q_start + Lq
    valid = torch.rand(B, kv_len + 2, generator=g) < 0.8
    full_mask = torch.rand(B, 1, Lq, kv_len, generator=g) < 0.5
    for causal in (True, False):
        for window in (0, 3):
            for mask in (None, full_mask):
                got = visibility_mask(valid, q_start, Lq, Hq, causal=causal, window=window, mask=mask)
                for b in range(B):
                    for h in range(Hq):
                        for i in range(Lq):
                            p = q_start + i
                            for j in range(kv_len):
                                if mask is not None:
                                    want = bool(mask[b, 0, i, j])
                                elif j < q_start:
                                    want = window == 0 or j > p - window
                                else:
                                    want = (not causal or j <= p) and (window == 0 or j > p - window)
                                want = want and bool(valid[b, j])
                                assert bool(got[b, h, i, j]) == want, (causal, window, mask is not None, b, h, i, j)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_mask_overrides_causal_and_window(num_splits):
    """With a mask, causal / window change nothing (no causal tile skipping: future keys count)."""
    c = Case(81, Lq=17, kv_len=150, group=2, mask="random", mask_shape="head")
    args, kw = make_inputs(c)
    outs = [attention_over_store(*args, **{**kw, "causal": causal, "window": window}, num_splits=num_splits)
            for causal, window in ((True, 5), (False, 0))]
    assert torch.equal(outs[0], outs[1])
    ref = attention_over_store_reference(*args, **{**kw, "causal": False, "window": 0})
    assert rel_err(outs[0], ref) <= 1e-3


@pytest.mark.parametrize("fn", [attention_over_store, attention_over_store_reference],
                         ids=["kernel", "reference"])
def test_defaults_are_all_valid_and_last_slots(fn):
    """valid=None is all-True and q_start=None is S - Lq: same output, bit for bit."""
    B, Hq, Hkv, Lq, S, D = 2, 4, 2, 5, 40, 64
    g = torch.Generator().manual_seed(91)
    q, k, v = (torch.randn(shape, generator=g).to(DEVICE)
               for shape in ((B, Hq, Lq, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    ones = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    want = fn(q, k, v, ones, S - Lq, scale=D ** -0.5, num_splits=1)
    assert torch.equal(fn(q, k, v, scale=D ** -0.5, num_splits=1), want)
    assert torch.equal(fn(q, k, v, None, S - Lq, scale=D ** -0.5, num_splits=1), want)
    assert torch.equal(fn(q, k, v, ones, None, scale=D ** -0.5, num_splits=1), want)


@pytest.mark.skipif(not _INTERPRET, reason="on a GPU the kernels are compiled by running them")
def test_kernels_compile_for_hopper():
    """The interpreter runs kernels as numpy: also compile what three small cases (one pass, split-KV, a decode step
    that writes its own token) launch for sm_90, as a GPU would
    (tests/hopper_compile.py)."""
    from hopper_compile import assert_what_runs_compiles_for_hopper

    assert_what_runs_compiles_for_hopper(
        lambda: test_dense_matches_reference(next(iter(DENSE_CASES))),
        lambda: test_split_kv_matches_reference(next(iter(SPLIT_CASES))),
        lambda: test_new_token_written_and_attended_in_one_launch("decode-gqa8-split4-bf16", None))


DEVICE_Q_START_CASES = {
    # q_start as a (1,) device tensor (the captured decode step): the launch is planned for the whole store (a
    # NaN tail of `extra` slots past kv_len) and the kernel reads where the queries are.
    "decode-gqa4-d80": (Case(41, D=80, Lq=1, kv_len=33, group=4, extra=90), None),
    "decode-gqa8-split4-bf16": (Case(42, D=128, Lq=1, kv_len=300, group=8, extra=200, dtype=BF16,
                                     pads=(0, 50, 299)), 4),
    "decode-window-softcap-split3": (Case(43, D=64, Lq=1, kv_len=250, group=2, window=40, softcap=20.0,
                                          extra=120, pads=(0, 230, 10)), 3),
    "decode-kv1-d96": (Case(44, D=96, Lq=1, kv_len=1, group=3, extra=64, pads=(0, 1, 0)), None),
}


@pytest.mark.parametrize("name", list(DEVICE_Q_START_CASES))
def test_q_start_read_on_the_device_matches_reference(name):
    c, num_splits = DEVICE_Q_START_CASES[name]
    (q, k, v, valid, q_start), kw = make_inputs(c)
    on_device = torch.tensor([q_start], dtype=torch.int64, device=DEVICE)
    out = attention_over_store(q, k, v, valid, on_device, **kw, num_splits=num_splits)
    ref = attention_over_store_reference(q, k, v, valid, q_start, **kw)
    assert torch.isfinite(out).all(), "a slot past the query (NaN) leaked into the output"
    err = rel_err(out, ref)
    assert err <= tolerance(c), f"relative error {err:.2e} > {tolerance(c):.0e}"


@pytest.mark.parametrize("name", list(DEVICE_Q_START_CASES))
@pytest.mark.parametrize("new_dtype", [None, F32], ids=["new-in-store-dtype", "new-fp32"])
def test_new_token_written_and_attended_in_one_launch(name, new_dtype):
    """new_k / new_v (the decode step's cache write fused into the attention launch): the slot holds NaN before
    the call, so a program reading it from the store instead of from new_k / new_v shows; after the call the slot
    holds the new token in the store's dtype, and nothing else in the store changed."""
    c, num_splits = DEVICE_Q_START_CASES[name]
    (q, k, v, valid, q_start), kw = make_inputs(c)
    g = torch.Generator().manual_seed(c.seed + 1000)
    B, Hkv, _, D = k.shape
    new_k = torch.randn(B, Hkv, 1, D, generator=g).to(new_dtype or k.dtype).to(DEVICE)
    new_v = torch.randn(B, Hkv, 1, v.shape[3], generator=g).to(new_dtype or v.dtype).to(DEVICE)
    k_ref, v_ref = k.clone(), v.clone()
    ref = attention_over_store_reference(q, k_ref, v_ref, valid, q_start, **kw, new_k=new_k, new_v=new_v)
    k[:, :, q_start], v[:, :, q_start] = float("nan"), float("nan")
    on_device = torch.tensor([q_start], dtype=torch.int64, device=DEVICE)
    out = attention_over_store(q, k, v, valid, on_device, **kw, num_splits=num_splits, new_k=new_k, new_v=new_v)
    assert torch.isfinite(out).all(), "the new token's slot was read from the store before it was written"
    err = rel_err(out, ref)
    assert err <= tolerance(c), f"relative error {err:.2e} > {tolerance(c):.0e}"
    if new_dtype is not None and _INTERPRET:
        # Triton's interpreter casts fp32 to bf16 by truncation, a GPU rounds to nearest: one bf16 step apart.
        assert torch.allclose(k[:, :, q_start].float(), new_k[:, :, 0].float(), rtol=2 ** -7, atol=0)
        assert torch.allclose(v[:, :, q_start].float(), new_v[:, :, 0].float(), rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(k[:, :, q_start], new_k[:, :, 0].to(k.dtype))
        assert torch.equal(v[:, :, q_start], new_v[:, :, 0].to(v.dtype))
    k[:, :, q_start], v[:, :, q_start] = k_ref[:, :, q_start], v_ref[:, :, q_start]
    assert torch.equal(k.nan_to_num(7.0), k_ref.nan_to_num(7.0)) and torch.equal(v.nan_to_num(7.0),
                                                                                  v_ref.nan_to_num(7.0))


def test_new_token_refused_half_misshapen_or_with_several_queries():
    (q, k, v, valid, q_start), kw = make_inputs(Case(46, Lq=1, kv_len=20))
    B, Hkv, _, D = k.shape
    new = torch.zeros(B, Hkv, 1, D, device=DEVICE, dtype=k.dtype)
    with pytest.raises(ValueError, match="both be given"):
        attention_over_store(q, k, v, valid, q_start, **kw, new_k=new)
    with pytest.raises(ValueError, match="both be given"):
        attention_over_store(q, k, v, valid, q_start, **kw, new_k=new, new_v=new[:, :1])
    (q, k, v, valid, q_start), kw = make_inputs(Case(47, Lq=2, kv_len=20))
    with pytest.raises(ValueError, match="Lq must be 1"):
        attention_over_store(q, k, v, valid, q_start, **kw, new_k=new, new_v=new)


def test_q_start_on_the_device_refuses_a_mask_and_a_wrong_tensor():
    (q, k, v, valid, q_start), kw = make_inputs(Case(45, Lq=1, kv_len=20, mask="causal"))
    with pytest.raises(ValueError, match="takes no mask"):
        attention_over_store(q, k, v, valid, torch.tensor([q_start], device=DEVICE), **kw)
    kw["mask"] = None
    with pytest.raises(ValueError, match=r"\(1,\) int64"):
        attention_over_store(q, k, v, valid, torch.tensor([q_start], dtype=torch.int32, device=DEVICE), **kw)
