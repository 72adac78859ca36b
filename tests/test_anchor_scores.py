"""Triton AnTKV anchor-score kernel vs the fp32 PyTorch reference.

Runs on a GPU, or on CPU through Triton's interpreter:

    TRITON_INTERPRET=1 python -m pytest tests/test_anchor_scores.py -q

Inputs are fresh random tensors; ``lse`` is each row's true logsumexp over all its visible keys
(materialized scores) and ``o`` the attention reference's output, as a first attention pass would
give them. Errors are relative Frobenius errors per statistic, <= 1e-4 for fp32 inputs and <= 1e-3
for 16-bit ones (both compute in fp32); the pair counts must match exactly. Invalid and unused
store slots hold NaN, so a hidden key leaking into a sum shows up as NaN.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not torch.cuda.is_available() and not _INTERPRET:
    pytest.skip(
        "Triton anchor-score kernel needs a CUDA GPU; on CPU run with TRITON_INTERPRET=1 in the environment",
        allow_module_level=True,
    )
pytest.importorskip("triton")

from kvpass.kernels.anchor_scores import anchor_scores, anchor_scores_reference
from kvpass.kernels.anchor_scores.reference import attention_scores
from kvpass.kernels.attention import attention_over_store_reference
from kvpass.kernels.attention.reference import visibility_mask

DEVICE = "cpu" if _INTERPRET else "cuda"
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
MASS, JACOBIAN, SENSITIVITY, PAIRS = range(4)     # the statistics, in output order


@dataclasses.dataclass(frozen=True)
class Case:
    seed: int
    D: int = 64
    Lq: int = 17
    kv_len: int = 40                # q_start = kv_len - Lq
    key_start: int = 0              # scored keys: store slots key_start .. key_stop - 1
    key_stop: int | None = None     # None: kv_len
    Hkv: int = 2
    group: int = 1                  # query heads per kv head
    pads: tuple = (0, 3, 10)        # left padding (invalid leading slots) per batch row
    window: int = 0
    span: int = 0                   # > 0: each key scored by the span queries from its slot on
    softcap: float = 0.0
    scale: float | None = None      # None: D ** -0.5
    causal: bool = True
    mask: bool = False              # HF-style causal + left-padding mask (B, 1, Lq, kv_len)
    pass_valid: bool = True         # False: valid=None (padding, if any, only in the mask)
    with_o: bool = True
    dtype: torch.dtype = F32        # q dtype (and o's)
    store_dtype: torch.dtype | None = None  # None: same as q

    @property
    def B(self):
        return len(self.pads)

    @property
    def q_start(self):
        return self.kv_len - self.Lq

    @property
    def keys(self):
        return slice(self.key_start, self.key_stop if self.key_stop is not None else self.kv_len)


def full_row_lse(q, k_store, valid, q_start, *, scale, causal, window, softcap, mask):
    """(B, Hq, Lq) float32: each row's logsumexp over ALL its visible store keys (-inf: none)."""
    B, Hq, Lq, _ = q.shape
    if valid is None:
        valid = torch.ones(B, q_start + Lq, dtype=torch.bool, device=q.device)
    vis = visibility_mask(valid, q_start, Lq, Hq, causal=causal, window=window, mask=mask)
    s = attention_scores(q, k_store[:, :, :q_start + Lq], scale=scale, softcap=softcap)
    return torch.logsumexp(s.masked_fill(~vis, float("-inf")), dim=-1)


def make_inputs(c: Case):
    """(args, kw) of a fresh random case; NaN in the invalid and unused store slots."""
    g = torch.Generator().manual_seed(c.seed)
    B, Hkv, Hq, Lq, D = c.B, c.Hkv, c.Hkv * c.group, c.Lq, c.D
    S = c.kv_len + 5
    sdt = c.store_dtype or c.dtype
    # q in the (B, L, H, D) layout projections produce, viewed as (B, H, L, D): non-contiguous.
    q = torch.randn(B, Lq, Hq, D, generator=g).transpose(1, 2).to(c.dtype)
    k_store, v_store = (torch.randn(B, Hkv, S, D, generator=g).to(sdt) for _ in range(2))
    valid = torch.ones(B, S, dtype=torch.bool)
    for b, pad in enumerate(c.pads):
        valid[b, :pad] = False
    valid[:, c.kv_len:] = False
    mask = None
    if c.mask:
        p = c.q_start + torch.arange(Lq)[:, None]
        mask = (torch.arange(c.kv_len) <= p) & valid[:, None, None, :c.kv_len]
    if c.pass_valid:
        for t in (k_store, v_store):
            t.masked_fill_(~valid[:, None, :, None], float("nan"))
    else:
        valid = None
    kw = {"q_start": c.q_start, "scale": c.scale if c.scale is not None else D ** -0.5,
          "causal": c.causal, "window": c.window, "softcap": c.softcap, "mask": mask}
    lse = full_row_lse(q, k_store, valid, **kw)
    o = attention_over_store_reference(q, k_store, v_store, valid, **kw) if c.with_o else None
    kw["key_start"] = c.keys.start
    kw["mask"] = _to_device(mask)
    kw["span"] = c.span
    # The scored keys are a view of the store (as a caller would pass them).
    args = (q, k_store[:, :, c.keys], v_store[:, :, c.keys], lse, o, valid)
    return tuple(_to_device(t) for t in args), kw


def _to_device(t):
    return t.to(DEVICE) if isinstance(t, torch.Tensor) else t


def rel_err(out, ref):
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_case(c: Case):
    args, kw = make_inputs(c)
    out = anchor_scores(*args, **kw)
    ref = anchor_scores_reference(*args, **kw)
    Lk = args[1].shape[2]
    assert out.shape == (4, c.B, c.Hkv, Lk) and out.dtype == F32 and out.is_contiguous()
    assert torch.isfinite(ref).all(), "reference leaked garbage"
    assert torch.isfinite(out).all(), "kernel output has NaN/inf (hidden garbage leaked?)"
    assert ref[MASS].sum() > 0, "degenerate case: no key is seen"
    tol = 1e-4 if c.dtype == (c.store_dtype or c.dtype) == F32 else 1e-3
    for stat in (MASS, JACOBIAN, SENSITIVITY):
        err = rel_err(out[stat], ref[stat])
        assert err <= tol, f"statistic {stat}: relative error {err:.2e} > {tol:.0e}"
    assert torch.equal(out[PAIRS], ref[PAIRS])
    if not c.with_o:
        assert (out[SENSITIVITY] == 0).all()
    valid = args[5]
    if valid is not None:
        invalid = ~valid[:, c.keys]                                  # (B, Lk)
        assert (out.permute(1, 3, 0, 2)[invalid] == 0).all(), "invalid keys must get zeros"
    return out, args, kw


CASES = {
    # head dims 64/80/96/128; decode, chunk, prefill; all keys or a suffix; GQA 1:1 4:1 8:1
    "d64-prefill-all-keys-mha": Case(1, D=64, Lq=17, kv_len=17),
    "d80-chunk-new-keys-gqa4": Case(2, D=80, Lq=17, kv_len=60, key_start=43, group=4, pads=(0, 50, 7)),
    "d96-decode-gqa8": Case(3, D=96, Lq=1, kv_len=50, group=8, pads=(0, 50, 49)),
    "d128-prefill-gqa8": Case(4, D=128, Lq=300, kv_len=300, Hkv=1, group=8, pads=(37,)),
    "d128-prefill-past-new-keys-gqa4": Case(5, D=128, Lq=290, kv_len=333, key_start=43, Hkv=1,
                                            group=4, pads=(20,)),
    # a suffix not starting at the queries: past keys plus some new ones
    "d64-chunk-keys-30-to-end": Case(6, Lq=17, kv_len=60, key_start=30, group=2),
    # sliding window (shorter than the sequence), over all keys and over the new ones only
    "window20-gqa2": Case(7, Lq=40, kv_len=100, group=2, window=20, pads=(0, 70, 95)),
    "window16-new-keys-d80": Case(8, D=80, Lq=40, kv_len=100, key_start=60, group=4, window=16),
    # soft-capping (large scale so that the cap matters), with a window (Gemma-2 style)
    "softcap-gqa4": Case(9, Lq=17, kv_len=40, group=4, softcap=5.0, scale=0.5),
    "softcap-window-bf16": Case(10, D=128, Lq=40, kv_len=100, group=2, window=32, softcap=30.0,
                                dtype=BF16),
    # HF-style causal + left-padding mask; causal / window arguments ignored; valid=None
    "mask-leftpad-gqa4": Case(11, Lq=17, kv_len=40, group=4, mask=True, causal=False, window=3),
    "mask-leftpad-new-keys-no-valid": Case(12, D=96, Lq=17, kv_len=60, key_start=43, group=2,
                                           mask=True, pass_valid=False),
    # non-causal, with a key range in the middle of the store
    "noncausal-middle-keys": Case(13, D=80, Lq=17, kv_len=60, key_start=10, key_stop=35, causal=False),
    # no o: statistic 2 is 0, the others unchanged
    "no-o-gqa4": Case(14, Lq=17, kv_len=40, group=4, with_o=False),
    # 16-bit and mixed inputs (computed in fp32 all the same)
    "fp16-prefill-gqa8": Case(15, D=128, Lq=17, kv_len=17, group=8, dtype=F16),
    "bf16-chunk-new-keys-gqa4": Case(16, D=96, Lq=17, kv_len=60, key_start=43, group=4, dtype=BF16),
    "fp32q-over-fp16-store": Case(17, Lq=17, kv_len=60, group=2, store_dtype=F16),
    # AnTKV's prompts: each key scored by the span queries from its slot on (rows beyond them skipped)
    "span32-prefill-gqa4": Case(18, D=128, Lq=300, kv_len=300, Hkv=1, group=4, span=32, pads=(37,)),
    "span7-chunk-new-keys": Case(19, D=80, Lq=17, kv_len=60, key_start=30, group=2, span=7),
    "span-with-shorter-window": Case(20, Lq=40, kv_len=100, group=2, window=5, span=9, pads=(0, 70, 95)),
    "span-mask-leftpad-gqa4": Case(22, Lq=33, kv_len=40, group=4, mask=True, causal=False, span=5),
    "span-longer-than-prompt-bf16": Case(23, D=96, Lq=17, kv_len=17, span=64, dtype=BF16, pads=(0, 3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    check_case(CASES[name])


@pytest.mark.parametrize("window", [0, 7])
def test_mass_sums_to_rows_that_see_something(window):
    """All keys scored with the true lse: each row's probabilities sum to 1 (to 0 if it sees nothing)."""
    c = Case(21, Lq=17, kv_len=30, group=4, window=window, pads=(0, 20, 30))
    out, args, _ = check_case(c)
    lse = args[3]
    rows_seeing = (lse > float("-inf")).view(c.B, c.Hkv, c.group * c.Lq).sum(-1).float()
    assert rows_seeing[0].min() == c.group * c.Lq and rows_seeing[2].max() == 0   # both kinds occur
    assert torch.allclose(out[MASS].sum(-1), rows_seeing, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask", [False, True])
def test_span_counts_each_key_over_its_span_queries(mask):
    """With a span, a valid key at slot j is scored by the queries at slots j .. j + span - 1 of the prompt (each
    with its group of heads): the pair counts say so exactly, mask or not."""
    c = Case(24, Lq=50, kv_len=50, group=4, span=11, pads=(0, 6), mask=mask)
    out, args, _ = check_case(c)
    slots = torch.arange(c.kv_len)
    expected = (torch.clamp(c.kv_len - slots, max=c.span) * c.group).float().to(out.device)
    assert torch.equal(out[PAIRS][0, 0], expected)
    assert torch.equal(out[PAIRS][1, 0, 6:], expected[6:]) and (out[PAIRS][1, 0, :6] == 0).all()


def test_hidden_garbage_cannot_leak():
    """Invalid and unused slots hold NaN / huge values / zeros: the output must be bit-identical."""
    c = Case(31, Lq=17, kv_len=60, key_start=10, group=4, window=30, pads=(0, 20, 45))
    (q, k, v, lse, o, valid), kw = make_inputs(c)
    outs = []
    for fill in (float("nan"), 1e30, 0.0):
        hidden = ~valid[:, None, c.keys, None]
        outs.append(anchor_scores(q, k.masked_fill(hidden, fill), v.masked_fill(hidden, fill), lse, o,
                                  valid, **kw))
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_mask_overrides_causal_and_window():
    """With a mask, causal / window change nothing (and rows after the mask's causal limit count)."""
    c = Case(41, Lq=17, kv_len=40, group=2, mask=True)
    args, kw = make_inputs(c)
    outs = [anchor_scores(*args, **{**kw, "causal": causal, "window": window})
            for causal, window in ((True, 5), (False, 0))]
    assert torch.equal(outs[0], outs[1])


def _small(B=2, Hq=4, Hkv=2, Lq=3, q_start=5, key_start=4, D=64):
    """Valid inputs: the last 4 of kv_len = 8 keys scored."""
    Lk = q_start + Lq - key_start
    return {"q": torch.randn(B, Hq, Lq, D), "k": torch.randn(B, Hkv, Lk, D), "v": torch.randn(B, Hkv, Lk, D),
            "lse": torch.zeros(B, Hq, Lq), "o": torch.zeros(B, Hq, Lq, D), "q_start": q_start,
            "key_start": key_start}


BAD_INPUTS = {
    "keys-past-kv_len": ({"key_start": 5}, r"key_start \+ Lk <= kv_len = q_start \+ Lq = 8"),
    "key_start-negative": ({"key_start": -1}, r"key_start must be"),
    "q_start-none": ({"q_start": None}, r"q_start must be a non-negative python int"),
    "span-negative": ({"span": -1}, r"span must be a python int >= 0"),
    "lse-dtype": ({"lse": torch.zeros(2, 4, 3, dtype=F16)}, r"lse must be a float32 tensor"),
    "lse-shape": ({"lse": torch.zeros(2, 4, 4)}, r"lse must be .* \(B, Hq, Lq\) = \(2, 4, 3\)"),
    "o-shape": ({"o": torch.zeros(2, 4, 3, 32)}, r"o must be None or .* \(2, 4, 3, 64\)"),
    "kv-lengths": ({"v": torch.randn(2, 2, 3, 64)}, r"k and v must hold the same keys"),
    "gqa-not-divisible": ({"k": torch.randn(2, 3, 4, 64), "v": torch.randn(2, 3, 4, 64)},
                          r"multiple of kv heads"),
    "valid-narrower-than-kv_len": ({"valid": torch.ones(2, 7, dtype=torch.bool)},
                                   r"q_start \+ Lq = 5 \+ 3 = 8 exceeds the store capacity S = 7"),
    "mask-over-scored-keys-only": ({"mask": torch.ones(1, 1, 3, 4, dtype=torch.bool)},
                                   r"mask shape \(1, 1, 3, 4\)"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
@pytest.mark.parametrize("fn", [anchor_scores, anchor_scores_reference], ids=["kernel", "reference"])
def test_bad_inputs_raise(fn, name):
    change, pattern = BAD_INPUTS[name]
    inputs = {name: _to_device(t) for name, t in {**_small(), **change}.items()}
    with pytest.raises(ValueError, match=pattern):
        fn(**inputs, scale=0.125)


@pytest.mark.skipif(not _INTERPRET, reason="on a GPU the kernels are compiled by running them")
def test_kernels_compile_for_hopper():
    """The interpreter runs kernels as numpy: also compile what a small case launches for sm_90, as a GPU would
    (tests/hopper_compile.py)."""
    from hopper_compile import assert_what_runs_compiles_for_hopper

    assert_what_runs_compiles_for_hopper(lambda: test_matches_reference(next(iter(CASES))))
