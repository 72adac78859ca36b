"""AnTKV end to end on tiny models: calibration artefacts, the store's anchor rule, compiled semantics."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from families import FAMILIES
from kernel_paths import assert_kernel_paths_agree

import kvpass
from kvpass import calibration
from kvpass.attach import backend_of
from kvpass.methods.rope import stored_rotation
from kvpass.calibration.artefact import Calibration
from kvpass.config import AnTKV
from kvpass.kernels.coded_attention import rope_rotate
from kvpass.methods import pq
from kvpass.methods.antkv import AnTKVStore
from kvpass.methods.base import AttentionSpec


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path / "cache"))


def _calibrate(model, bits=1.0, **method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return calibration.calibrate(model, AnTKV(bits=bits, **method), tokens=1024, seqlen=128, progress=False)


@pytest.fixture(scope="module")
def llama():
    model = FAMILIES["llama"].build()
    return model, _calibrate(model, 1.0)


# -- calibration artefacts -----------------------------------------------------------------------------------
def test_artefact_round_trip_and_metadata(llama, tmp_path):
    model, cal = llama
    path = cal.save(tmp_path / "a.safetensors")
    loaded = Calibration.load(path)
    assert loaded.meta == cal.meta == json.loads(path.with_suffix(".json").read_text())
    assert loaded.tensors.keys() == cal.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], cal.tensors[k]) for k in cal.tensors)
    book = loaded.section("antkv-1bit-query-metric")["layers.0.keys"]   # the default key metric is "query"
    cfg = model.config
    assert tuple(book.shape) == (cfg.num_key_value_heads, 16 // 8, 256, 8)  # head dim 16, 8-d sub-vectors
    assert loaded.meta["text"]["name"] == "random-token-ids" and loaded.meta["text"]["tokens"] == 1024
    loaded.check(model, "antkv-1bit-query-metric", calibration.antkv.section_params(AnTKV(bits=1)))


def test_unequal_key_and_value_rates_calibrate_their_own_codebooks_and_decode(tmp_path):
    """value_bits: keys at 1.5 bit (4-d sub-vectors, 64 centroids), values at 0.5 bit (16-d, 256): one section with
    each side's codebook shape, read by the store, whose codes hold 4 key and 1 value byte per token and head."""
    model = FAMILIES["llama"].build()
    method = AnTKV(bits=1.5, value_bits=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = calibration.calibrate(model, method, tokens=1024, seqlen=128, progress=False)
    section = cal.section("antkv-1.5bit-values-0.5bit-query-metric")
    heads = model.config.num_key_value_heads
    assert tuple(section["layers.0.keys"].shape) == (heads, 4, 64, 4)
    assert tuple(section["layers.0.values"].shape) == (heads, 1, 256, 16)
    path = cal.save(tmp_path / "a.safetensors")
    kvpass.compile(model, kvpass.Config(attention=method, calibration=str(path)), inner="eager")
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)
    store = backend_of(model).runtime.store(0)
    assert store._codes_k.shape[-1] == 4 and store._codes_v.shape[-1] == 1


def test_query_metric_key_codebooks_cut_the_score_error_they_are_learned_for(llama, tmp_path):
    """key_metric="query" (the default): k-means in the space whitened by the calibration queries' moment, whose
    Cholesky factors the section stores; encoding in that metric gives keys a lower expected squared score error
    e^T E[q q^T] e than the Euclidean codebooks do on the same keys (the objective each minimizes), and a compiled
    model decodes."""
    model, query = llama
    method = AnTKV(bits=1)
    euclidean = _calibrate(model, 1.0, key_metric="euclidean")
    section = query.section("antkv-1bit-query-metric")
    white = section["layers.0.key_whitening"]                    # (Hkv, M, 8, 8) lower-triangular factors
    assert white.shape == (model.config.num_key_value_heads, 2, 8, 8) and torch.equal(white, white.tril())
    keys = torch.randn(1, model.config.num_key_value_heads, 256, 16, generator=torch.Generator().manual_seed(3))

    def score_error(book, whitening):
        error = pq.split(keys - pq.decode(pq.encode(keys, book, whitening), book), 8)   # (1, H, n, M, 8)
        return (torch.einsum("bhnms,hmst->bhnmt", error, white) ** 2).sum().item()

    plain = euclidean.section("antkv-1bit")["layers.0.keys"]
    assert score_error(section["layers.0.keys"], white) < score_error(plain, None)
    path = query.save(tmp_path / "query.safetensors")
    kvpass.compile(model, kvpass.Config(attention=method, calibration=str(path)), inner="eager")
    try:
        with torch.no_grad():
            model.generate(torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(0)),
                           max_new_tokens=4, do_sample=False)
        assert backend_of(model).runtime.store(0)._books[2] is not None   # (key book, value book, whitening)
    finally:
        kvpass.detach(model)


def test_artefact_for_another_model_or_setting_is_refused(llama, tmp_path):
    _, cal = llama
    path = cal.save(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="another model.*kv_heads: artefact 2, model 4"):
        kvpass.compile(FAMILIES["gpt2"].build(), kvpass.Config(attention=AnTKV(bits=1), calibration=str(path)))
    with pytest.raises(ValueError, match="no section 'antkv-2bit-query-metric'"):
        kvpass.compile(FAMILIES["llama"].build(), kvpass.Config(attention=AnTKV(bits=2), calibration=str(path)))
    other = FAMILIES["llama"].build(seed=1)  # same architecture, other weights: allowed, with a warning
    with pytest.warns(UserWarning, match="other weights"):
        kvpass.compile(other, kvpass.Config(attention=AnTKV(bits=1), calibration=str(path)), inner="eager")
    with pytest.raises(ValueError, match="does not exist"):
        Calibration.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a kvpass calibration"):
        Calibration.load(tmp_path / "plain.safetensors")


def test_codebooks_beat_random_codebooks(llama):
    """The learned (Euclidean) codebooks reconstruct the model's own keys better than codebooks of random
    calibration points, and the reconstruction SQNR grows with the rate."""
    model, _ = llama
    calls = []
    windows = torch.randint(3, 120, (2, 64), generator=torch.Generator().manual_seed(5))
    calibration.collect.run_windows(model, windows, calls.append, progress=False)
    sqnr = {}
    for bits in (0.375, 1.0, 4.0):
        section = _calibrate(model, bits, key_metric="euclidean").section(f"antkv-{bits:g}bit")
        # Layer 1: layer 0's pre-RoPE keys depend on the token alone, and the test vocabulary fits a codebook.
        book, (inv_freq, scaling) = section["layers.1.keys"], stored_rotation(section, 1)
        positions = torch.arange(64)[None]      # the codebooks hold keys before RoPE: rotate them back
        keys = torch.cat([rope_rotate(c.k, positions, inv_freq, scaling, inverse=True) for c in calls
                          if c.layer == 1], dim=2)                         # (1, Hkv, 128, D) held out
        sqnr[bits] = pq.sqnr_db(keys, pq.decode(pq.encode(keys, book), book))
        noise = torch.randn_like(book) * book.std()
        assert sqnr[bits] > pq.sqnr_db(keys, pq.decode(pq.encode(keys, noise), noise)) + 1.0
    assert sqnr[0.375] < sqnr[1.0] < sqnr[4.0]
    assert sqnr[4.0] > 15.0


# -- the store --------------------------------------------------------------------------------------------------
def _store(cal, ratio=0.1, window=4, score="bound", prompt_scoring="all"):
    method = AnTKV(bits=1, anchor_ratio=ratio, window=window, score=score, prompt_scoring=prompt_scoring)
    return AnTKVStore(method, layer=0, calibration=cal)


def _kv(B=2, H=2, L=37, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H * 2, L, D, generator=g), torch.randn(B, H, L, D, generator=g),
            torch.randn(B, H, L, D, generator=g))


@pytest.mark.parametrize("score", ["attention", "attention_variance", "bound"])
def test_prefill_keeps_window_and_anchor_budget(llama, score):
    _, cal = llama
    q, k, v = _kv()
    store = _store(cal, ratio=0.1, window=4, score=score)
    store.append(k, v)
    out = store.attend(q, None, True, AttentionSpec(scale=0.25))
    assert out.shape == (2, 4, 37, 16) and torch.isfinite(out).all()
    assert store._finalized == 37 - 4 + 1                       # the newest window - 1 stay exact
    assert (store._anchor_count == math.ceil(0.1 * 34)).all()   # the budget, per row and kv head
    keys, values = store.materialize()
    anchors = store._anchor_slot[:, :, :34] >= 0
    assert torch.equal(keys[:, :, :34][anchors], k[:, :, :34][anchors])        # anchors are exact
    assert torch.equal(keys[:, :, 34:], k[:, :, 34:]) and torch.equal(values[:, :, 34:], v[:, :, 34:])
    coded = ~anchors
    assert not torch.equal(keys[:, :, :34][coded], k[:, :, :34][coded])


def test_sink_is_an_anchor_by_the_same_rule(llama):
    """A token every query attends to (an attention sink) is kept exact, with no special case for position 0
    (prompt_scoring "all": the later queries that reveal the sink score it)."""
    _, cal = llama
    q, k, v = _kv(B=1, L=64, seed=3)
    u = torch.randn(16, generator=torch.Generator().manual_seed(9))
    q += u                                       # a direction every query shares ...
    k[:, :, 5] = 2 * u                           # ... makes token 5 draw most of the attention of later queries
    # Not "attention_variance": A(1 - A) vanishes as A -> 1, so it misses a sink that takes nearly all the
    # attention (docs/antkv.md); the value-error term of "bound" is what keeps such a token.
    for score in ("attention", "bound"):
        store = _store(cal, ratio=0.02, window=4, score=score)
        store.append(k, v)
        store.attend(q, None, True, AttentionSpec(scale=0.25))
        assert (store._anchor_slot[:, :, 5] >= 0).all(), score


@pytest.mark.parametrize("prompt_scoring", ["all", "window"])
def test_prompt_tokens_are_scored_by_the_queries_prompt_scoring_names(llama, monkeypatch, prompt_scoring):
    """A prompt token's statistics, when it is finalized, sum over every later query of the prompt ("all") or over
    the `window` queries from its own slot on ("window", as a generated token's), each with its GQA group."""
    from kvpass.methods import antkv as store_module

    seen = []
    finalize = store_module.finalize_tokens
    monkeypatch.setattr(store_module, "finalize_tokens", lambda k, v, stats, *rest: seen.append(stats) or finalize(
        k, v, stats, *rest))
    _, cal = llama
    q, k, v = _kv(B=1, L=40, seed=4)
    store = _store(cal, window=4, prompt_scoring=prompt_scoring)
    store.append(k, v)
    store.attend(q, None, True, AttentionSpec(scale=0.25))
    pairs = torch.cat(seen, dim=-1)[3]                            # (B, H, finalized tokens)
    slots = torch.arange(pairs.shape[-1])
    queries = torch.full_like(slots, 4) if prompt_scoring == "window" else 40 - slots
    assert pairs.shape[-1] == 40 - 4 + 1 and torch.equal(pairs, (2 * queries).float().expand_as(pairs))


def test_decode_finalizes_one_token_per_step_within_budget(llama):
    _, cal = llama
    q, k, v = _kv(B=1, L=300, seed=4)
    store = _store(cal, ratio=0.05, window=8)
    store.append(k[:, :, :100], v[:, :, :100])
    store.attend(q[:, :, :100], None, True, AttentionSpec(scale=0.25))
    for t in range(100, 300):
        store.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        out = store.attend(q[:, :, t : t + 1], None, True, AttentionSpec(scale=0.25))
        assert torch.isfinite(out).all()
        assert store.length - store._finalized == 8       # exactly the window is exact during decode
    assert (store._anchor_count <= math.ceil(0.05 * store._finalized)).all()
    assert (store._anchor_count >= math.ceil(0.05 * 93)).all()   # at least the prefill's anchors
    parts = store.nbytes()
    assert set(parts) == {"codes", "anchor_map", "anchors", "codebooks", "window"} and all(parts.values())
    # Held bytes, not capacity: 1 bit is one one-byte code per 8 dims of keys and of values, the map an int16 per
    # slot (its rows fit), anchor rows 16 + 16 fp32 values each; spare capacity is in allocated_nbytes.
    heads = store._ring_k.shape[1]
    assert store._anchor_slot.dtype == torch.int16
    assert parts["codes"] == 300 * heads * (16 // 8) * 2 and parts["anchor_map"] == 300 * heads * 2
    assert parts["anchors"] == int(store._anchor_count.sum()) * (16 + 16) * 4
    assert store.allocated_nbytes() > sum(parts.values()) - parts["window"]


def test_a_bulk_load_is_encoded_chunk_by_chunk_and_its_decode_steps_equal_the_host_path(llama):
    """A benchmark's fill (tokens stored without attention, settled after each chunk) keeps only window - 1 tokens
    exact in a ring of window + 1 rows, encodes the rest (no Anchor Score: no anchors), and the captured-form
    decode step (reserve, decode at a device slot, advance) then gives the host path's steps (append, attend)."""
    _, cal = llama
    q, k, v = _kv(B=2, L=330, seed=5)
    stores = [_store(cal, ratio=0.05, window=4) for _ in range(2)]
    for store in stores:
        for start, stop in ((0, 64), (64, 128), (128, 250), (250, 300)):
            store.append(k[:, :, start:stop], v[:, :, start:stop])
            store.settle()
            assert store.length - store._finalized == 3 and store._ring_k.shape[2] == 5
        assert (store._anchor_count == 0).all() and store.nbytes()["window"] == stores[0].nbytes()["window"]
    captured, host = stores
    spec = AttentionSpec(scale=0.25)
    slot = torch.zeros(1, dtype=torch.int64)
    valid = torch.ones(2, 1024, dtype=torch.bool)
    for t in range(300, 330):
        captured.reserve(t + 1)
        slot.fill_(t)
        got = captured.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], spec, slot, valid)
        captured.advance(1)
        host.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        want = host.attend(q[:, :, t : t + 1], None, True, spec)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (captured.length, captured._finalized) == (host.length, host._finalized) == (t + 1, t + 1 - 4)
    assert torch.equal(captured._anchor_slot, host._anchor_slot) and (host._anchor_count > 0).all()


def test_the_decode_steps_pure_parts_trace_as_whole_graphs(llama):
    """What a CUDA decode step compiles with Inductor (kvpass.methods.antkv_step.fused): finalizing the leaving
    token and attending the ring trace without a graph break (fullgraph) and give the plain functions' results."""
    from kvpass.methods import antkv_step

    _, cal = llama
    q, k, v = _kv(B=2, L=40, seed=6)
    store = _store(cal, ratio=0.1, window=4)
    store.append(k, v)
    store.attend(q, None, True, AttentionSpec(scale=0.25))
    calls = []
    for slot in (store._exact_start.clone(), store._exact_start - 1):   # a token leaving, and one finalized already
        at = slot % store._ring_k.shape[2]
        calls.append((antkv_step.finalize_tokens, (
            store._ring_k.index_select(2, at), store._ring_v.index_select(2, at), store._ring_stats.index_select(3, at),
            store._rotation.positions_of(slot), store._books, store._rope_args(), store.method, 0.25,
            store._counters(), slot >= store._exact_start)))
    valid = torch.ones(2, store.capacity, dtype=torch.bool)
    for window in (0, 3):
        calls.append((antkv_step.ring_attention, (q[:, :, -1:], store._ring_k, store._ring_v, slot + 4,
                                                  store._exact_start, valid, torch.zeros(2, 4, 1, 16),
                                                  torch.zeros(2, 4, 1), 0.25, 0.0, window, True)))
    for fn, inputs in calls:
        traced = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False)
        torch.testing.assert_close(traced(*inputs), fn(*inputs), rtol=0, atol=0)
    assert calls[0][1][-1].item() and not calls[1][1][-1].item()


def test_anchor_ratio_zero_and_full_window(llama):
    _, cal = llama
    q, k, v = _kv(B=1, L=10)
    store = _store(cal, ratio=0.0, window=16)                     # the whole prompt stays in the window
    store.append(k, v)
    out = store.attend(q, None, True, AttentionSpec(scale=0.25))
    exact = kvpass.kernels_dispatch.attention(q, k, v, mask=None, is_causal=True, scale=0.25, softcap=0.0, window=0)
    torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-5)
    store = _store(cal, ratio=0.0, window=1)
    store.append(k, v)
    store.attend(q, None, True, AttentionSpec(scale=0.25))
    assert (store._anchor_count == 0).all() and store._finalized == 10


# -- compiled models ----------------------------------------------------------------------------------------
def _compiled(model, cal_path, inner="eager", **method):
    return kvpass.compile(model, kvpass.Config(attention=AnTKV(**method), calibration=str(cal_path)), inner=inner)


def test_compiled_generate_padding_and_4bit_accuracy(llama, tmp_path):
    model, _ = llama
    cal4 = _calibrate(model, 4.0).save(tmp_path / "c4.safetensors")
    ids = torch.randint(3, 120, (1, 40), generator=torch.Generator().manual_seed(0))
    dense = model(ids, use_cache=False).logits
    try:
        _compiled(model, cal4, bits=4, anchor_ratio=0.02, window=4)
        logits = model(ids, use_cache=False).logits
        rel = ((logits - dense).norm() / dense.norm()).item()
        assert rel < 0.05, rel
        # a left-padded batch gives each row what it gives alone
        short = ids[:, 8:]
        batch = torch.cat([ids, torch.cat([torch.zeros_like(ids[:, :8]), short], 1)])
        mask = torch.ones_like(batch)
        mask[1, :8] = 0
        out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
        alone = model.generate(short, max_new_tokens=6, do_sample=False)
        assert torch.equal(out[1, -6:], alone[0, -6:])
        rep = kvpass.report(model)
        assert rep["attention_calls"]["decode-engine/decode"] > 0 and rep["decode_engine"]["eager_steps"] == 10
        assert set(rep["kv_bytes_by_part"]) == {"codes", "anchor_map", "anchors", "codebooks", "window"}
    finally:
        kvpass.detach(model)


def test_unfused_cache_path_refuses(llama, tmp_path):
    model, cal = llama
    path = cal.save(tmp_path / "c.safetensors")
    kvpass.attach(model, kvpass.Config(attention=AnTKV(bits=1), calibration=str(path)))
    try:
        with pytest.raises(NotImplementedError, match="chooses what it keeps or reads from attention scores"):
            model.generate(torch.randint(3, 100, (1, 12)), max_new_tokens=2, do_sample=False)
    finally:
        kvpass.detach(model)


def test_triton_kernels_match_reference_semantics(llama, tmp_path, monkeypatch):
    """The compiled model with the Triton kernels (interpreter on CPU) = the rewritten graph run eagerly on the
    fp32 references: the same anchors, the same outputs."""
    model, cal = llama
    path = cal.save(tmp_path / "c.safetensors")
    ids = torch.randint(3, 120, (1, 24), generator=torch.Generator().manual_seed(1))

    def compile_for(model, kernels):
        _compiled(model, path, inner="eager" if kernels == "reference" else "aot_eager", bits=1, anchor_ratio=0.1,
                  window=4)

    assert_kernel_paths_agree(model, compile_for, ids, monkeypatch)


def test_automatic_calibration_is_cached(tmp_path):
    model = FAMILIES["llama"].build(seed=2)
    with pytest.warns(UserWarning, match="random token ids"):
        first = calibration.resolve(model, AnTKV(bits=0.375), None)
    files = list((tmp_path / "cache" / "calibration").glob("*.safetensors"))
    assert len(files) == 1
    with warnings.catch_warnings(record=True) as caught:     # loaded from the cache: no new calibration
        warnings.simplefilter("always")
        again = calibration.resolve(model, AnTKV(bits=0.375), None)
    assert not [w for w in caught if "random token ids" in str(w.message)]
    assert again.meta == first.meta and all(torch.equal(again.tensors[k], first.tensors[k]) for k in first.tensors)


# -- pre-RoPE keys ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", [name for name in FAMILIES if name != "llama-eager"])
def test_model_rotary_is_the_rotation_the_model_applies(family):
    """Attention depends on position differences only, so shifting every position by 7 leaves each layer's
    pre-RoPE keys unchanged: rotating the observed keys back with model_rotary's parameters must give the same
    keys under both numberings (and does not with slightly wrong frequencies)."""
    from kvpass.calibration.collect import observe_attention
    from kvpass.methods.rope import model_rotary

    model = FAMILIES[family].build()
    layers = range(model.config.get_text_config().num_hidden_layers)
    rotations = {layer: model_rotary(model, layer) for layer in layers}
    if family in ("gpt2", "opt"):
        assert all(r is None for r in rotations.values())
        return
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(12)[None]
    keys = {}
    for shift in (0, 7):
        calls = []
        with torch.no_grad(), observe_attention(model, calls.append):
            model._call_impl(ids, position_ids=positions + shift, use_cache=False)
        keys[shift] = {c.layer: c.k for c in calls}
    for layer, (inv_freq, scaling) in rotations.items():
        assert 2 * inv_freq.numel() <= keys[0][layer].shape[-1]

        def back(shift, freq=inv_freq):
            return rope_rotate(keys[shift][layer], positions + shift, freq, scaling, inverse=True)

        torch.testing.assert_close(back(0), back(7), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(back(0, inv_freq * 1.05), back(7, inv_freq * 1.05), rtol=1e-4, atol=1e-4)
