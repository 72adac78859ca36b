"""The decode engine (kvpass/engine.py) on the CPU: the captured-decode op path, its static stores and state.

CUDA graphs themselves need a GPU (tests/test_cuda.py); here every decode step runs the same compiled graph and
the same kvpass::decode_attention ops eagerly, which is what a recording replays."""
import warnings
import weakref

import pytest
import torch

import kvpass
from kvpass.attach import backend_of
from kvpass.cache import cache_argument
from kvpass.eval.peer import PeerDecoder

from families import FAMILIES

INNER = "aot_eager"


def _padded(batch=3, length=9, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        ids[row, : 2 * row], mask[row, : 2 * row] = 0, 0
    return ids, mask


@pytest.mark.parametrize("name", ["llama", "gemma3", "gpt2"])
def test_engine_decode_equals_hf_greedy_for_a_left_padded_batch(name):
    reference, model = FAMILIES[name].build(), FAMILIES[name].build()
    kvpass.compile(model, kvpass.Config(), inner=INNER, strict=True)
    ids, mask = _padded()
    with torch.no_grad():
        want = reference.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, want)
    report = kvpass.report(model)
    assert report["decode_engine"]["eager_steps"] == 9 and report["decode_engine"]["records"] == 0
    assert report["attention_calls"]["decode-engine/decode"] == 9 * report["layers"]
    assert "CUDA" in report["decode_engine"]["not_captured"]


def test_one_decode_graph_serves_every_step_of_two_generations_and_stores_keep_their_addresses():
    model = FAMILIES["llama"].build()
    kvpass.compile(model, kvpass.Config(), inner=INNER)
    backend = backend_of(model)
    ids, _ = _padded(batch=1, length=7)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=40, do_sample=False)
        stores = {layer: store._k.data_ptr() for layer, store in backend.runtime._stores.items()}
        model.generate(ids[:, :5], max_new_tokens=30, do_sample=False)
    # one decode graph for all 68 steps; prefill graphs: one per prompt length until Dynamo makes it dynamic
    assert sum(record.captured_decode_sites > 0 for record in backend.records) == 1
    assert sum(record.captured_decode_sites == 0 for record in backend.records) <= 2
    assert {layer: store._k.data_ptr() for layer, store in backend.runtime._stores.items()} == stores
    assert backend.runtime.tokens_held() == 5 + 29  # the second sequence only: nothing carried over


def test_decode_graph_uses_the_decode_op_and_no_mask():
    model = FAMILIES["llama"].build()
    kvpass.compile(model, kvpass.Config(), inner="eager")
    ids, _ = _padded(batch=1, length=6)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False)
    prefill, decode = backend_of(model).records
    assert prefill.captured_decode_sites == 0 and decode.captured_decode_sites == decode.attention_sites == 2


def test_capture_false_and_model_compile_directly_run_the_engine_too():
    ids, _ = _padded(batch=1, length=6)
    reference = FAMILIES["llama"].build()
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=6, do_sample=False)
    off, direct = FAMILIES["llama"].build(), FAMILIES["llama"].build()
    kvpass.compile(off, kvpass.Config(), inner=INNER, capture=False)
    direct.compile(backend=kvpass.backend(kvpass.Config(), inner=INNER))
    with torch.no_grad(), pytest.warns(UserWarning, match="met its LlamaForCausalLM at its first compile"):
        assert torch.equal(direct.generate(ids, max_new_tokens=6, do_sample=False), want)  # HF's cache this time
    with torch.no_grad():
        assert torch.equal(off.generate(ids, max_new_tokens=6, do_sample=False), want)
        assert torch.equal(direct.generate(ids, max_new_tokens=6, do_sample=False), want)  # the engine now
    assert "capture is off" in kvpass.report(off)["decode_engine"]["not_captured"]
    assert kvpass.report(direct)["decode_engine"]["eager_steps"] == 5
    # detach undoes kvpass.compile whole (plain HF again) and leaves the user's own model.compile in place
    compiled_by_user = direct.__dict__["_compiled_call_impl"].compiled_call
    kvpass.detach(off)
    kvpass.detach(direct)
    assert "_compiled_call_impl" not in off.__dict__
    assert direct.__dict__["_compiled_call_impl"] is compiled_by_user


def test_methods_without_the_contract_keep_the_uncaptured_op():
    from test_wave import SMALL

    model = FAMILIES["llama"].build()
    kvpass.compile(model, kvpass.Config(attention=kvpass.WaveIndex(**SMALL, search="graph")), inner="eager")
    ids, _ = _padded(batch=1, length=6)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False)
    engine = kvpass.report(model)["decode_engine"]
    assert not engine["captured"] and "search='graph'" in engine["not_captured"]
    assert "does not meet the captured-decode contract" in engine["not_captured"]
    assert all(record.captured_decode_sites == 0 for record in backend_of(model).records)


def _engine_and_uncaptured(monkeypatch, store_class, config, ids, mask, new_tokens: int) -> dict:
    """Two tiny Llamas compiled with `config`: {True: one whose stores the decode engine drives
    (kvpass::decode_attention), False: one whose `store_class` claims no captured-decode contract, so the uncaptured
    op drives it (append, attend)}. Both generate greedily from the padded batch; asserts equal tokens and logits
    (1e-5)."""
    models = {}
    for captured in (False, True):
        with monkeypatch.context() as patch:
            if not captured:
                patch.setattr(store_class, "supports_captured_decode", classmethod(lambda cls, method: False))
            models[captured] = kvpass.compile(FAMILIES["llama"].build(), config, inner=INNER, strict=True)
    with torch.no_grad():
        runs = {captured: model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                         output_logits=True, return_dict_in_generate=True)
                for captured, model in models.items()}
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    for got, want in zip(runs[True].logits, runs[False].logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return models


def test_wave_engine_decode_equals_its_uncaptured_steps_across_index_runs(tmp_path, monkeypatch):
    """The wave index in device mode meets the contract: the engine's steps (kvpass::decode_attention: the steady
    zone up to the device slot, then the clusters) give the tokens and logits of the same store's uncaptured steps
    (kvpass::attention: append, attend) for a left-padded batch, through the index's build and three index runs,
    each of which makes the next reserve report the recordings stale; the keys-read counters agree. Pre-RoPE
    scoring runs the default (centroid) step too, whose logits weigh the estimation, plus the codes chosen by the
    query at the device slot's position."""
    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path))   # pre-RoPE codes calibrate once, into a private cache
    method = kvpass.WaveIndex(sinks=2, recent=4, segment=64, cluster_size=4, iterations=4, update_every=8,
                              min_context=24, scoring="pre-rope", rope_window=24)
    from kvpass.methods.wave import WaveStore

    models = _engine_and_uncaptured(monkeypatch, WaveStore, kvpass.Config(attention=method), *_padded(3, 20), 32)
    reports = {captured: kvpass.report(model) for captured, model in models.items()}
    engine = reports[True]["decode_engine"]
    assert reports[False]["decode_engine"]["captured"] is False
    assert reports[True]["attention_calls"]["decode-engine/decode"] == 31 * reports[True]["layers"]
    stats = [{key: row[key] for key in ("decode_steps", "indexed_tokens", "clusters", "keys_exact", "keys_estimated")}
             for row in reports[True]["layer_stats"]]
    assert stats == [{key: row[key] for key in stats[0]} for row in reports[False]["layer_stats"]]
    # Built when the sequence reached 24 tokens: 24 - (4 padding + 2 sinks) - 4 recent = 14 tokens, then 3 runs of
    # 8; every step from the 25th token on read the index (the 32nd token is generated, not stored: 51 held).
    assert stats[0]["indexed_tokens"] == 14 + 3 * 8 and stats[0]["decode_steps"] == 51 - 24, stats
    assert engine["eager_steps"] == 31, engine


@pytest.mark.parametrize("keys,ffn", [("pre-rope", None), ("post-rope", None),
                                      ("pre-rope", kvpass.Chess(sparsity=0.5, selective=True))],
                         ids=["pre-rope", "post-rope", "with-chess"])
def test_antkv_engine_decode_equals_its_uncaptured_steps(tmp_path, monkeypatch, keys, ffn):
    """AnTKV meets the contract: the engine's steps (the new token into the window ring at the device slot, the
    token `window` slots back finalized there: encoded, or kept as an anchor by its score; then attention over
    codes + anchors merged with the ring's) give the tokens and logits of the same store's uncaptured steps
    (append, attend) for a left-padded batch whose prompt is shorter than the window (so decode steps finalize
    every token and choose every anchor); the stores end with the same codes, anchors and scores. With CHESS+ in the
    same compile (sparse FFNs and projections around the captured attention) too."""
    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path))   # the codebooks calibrate once, into a private cache
    from kvpass.methods.antkv import AnTKVStore

    config = kvpass.Config(attention=kvpass.AnTKV(bits=2, anchor_ratio=0.3, window=6, keys=keys), ffn=ffn)
    models = _engine_and_uncaptured(monkeypatch, AnTKVStore, config, *_padded(3, 5), 28)
    report = kvpass.report(models[True])
    assert report["decode_engine"]["eager_steps"] == 27
    assert report["attention_calls"]["decode-engine/decode"] == 27 * report["layers"]
    assert kvpass.report(models[False])["decode_engine"]["captured"] is False
    if ffn is not None:
        assert report["chess"]["sparse_ffn_sites"] > 0 and report["chess"]["sparse_projections"] > 0
    stores = {captured: backend_of(model).runtime._stores for captured, model in models.items()}
    for layer, store in stores[True].items():
        other = stores[False][layer]
        assert (store.length, store._finalized) == (other.length, other._finalized) == (32, 32 - 6)
        assert int(store._exact_start) == store._finalized
        assert torch.equal(store._anchor_slot[..., :32], other._anchor_slot[..., :32])
        assert torch.equal(store._anchor_count, other._anchor_count)
        torch.testing.assert_close(store._weakest, other._weakest)
        held = store._anchor_slot[..., :32] < 0
        assert torch.equal(store._codes_k[..., :32, :][held], other._codes_k[..., :32, :][held])
        assert torch.equal(store._codes_v[..., :32, :][held], other._codes_v[..., :32, :][held])
        (k, v, rows), (other_k, other_v, other_rows) = store._window(), other._window()
        torch.testing.assert_close((k, v), (other_k, other_v))
        torch.testing.assert_close(store._ring_stats.index_select(3, rows),
                                   other._ring_stats.index_select(3, other_rows), rtol=1e-5, atol=1e-6)
    # The prompt (5 slots) is shorter than the window: decode steps finalized every token, anchors included.
    assert all(int(store._anchor_count.sum()) > 0 for store in stores[True].values())


def test_antkv_stores_keep_their_buffers_across_sequences_and_nothing_carries_over(tmp_path, monkeypatch):
    """A new sequence empties the AnTKV stores in place (the addresses a recorded step reads stay): a second
    generation, padded differently, gives what a fresh model gives, and a new batch size reallocates."""
    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path))
    method = kvpass.AnTKV(bits=2, anchor_ratio=0.2, window=4)
    used, fresh = FAMILIES["llama"].build(), FAMILIES["llama"].build()
    for model in (used, fresh):
        kvpass.compile(model, kvpass.Config(attention=method), inner=INNER, strict=True)
    backend = backend_of(used)
    first, _ = _padded(batch=2, length=9, seed=1)
    ids, mask = _padded(batch=2, length=7, seed=2)

    def addresses():
        return {layer: (store._ring_k.data_ptr(), store._codes_k.data_ptr(), store._rotation.position_offset.data_ptr())
                for layer, store in backend.runtime._stores.items()}

    with torch.no_grad():
        used.generate(first, max_new_tokens=12, do_sample=False)
        before = addresses()
        got = used.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        assert addresses() == before
        assert torch.equal(got, fresh.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False))
        used.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert all(store.batch == 1 for store in backend.runtime._stores.values())


def test_kivi_engine_decode_equals_its_uncaptured_semantics_for_a_left_padded_batch():
    """KIVI meets the contract: the engine's decode steps (kvpass::decode_attention over the static KIVI store)
    give the tokens of the unfused kvpass cache path, where HF attends with its own mask over the same store's
    materialized (dequantized + exact) keys and values (kvpass.attach, uncompiled)."""
    method = kvpass.KIVI(bits=4, group=4, residual=3)
    reference, model = FAMILIES["llama"].build(), FAMILIES["llama"].build()
    kvpass.attach(reference, kvpass.Config(attention=method))
    kvpass.compile(model, kvpass.Config(attention=method), inner=INNER, strict=True)
    ids, mask = _padded()
    with torch.no_grad():
        want = reference.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, want)
    assert kvpass.report(reference)["attention_calls"]["materialized/decode"] == 9 * kvpass.report(model)["layers"]
    report = kvpass.report(model)
    assert report["decode_engine"]["eager_steps"] == 9
    assert report["attention_calls"]["decode-engine/decode"] == 9 * report["layers"]
    assert sum(record.captured_decode_sites > 0 for record in backend_of(model).records) == 1


@pytest.mark.parametrize("input_major", [False, True])
def test_peer_step_equals_the_model_when_its_cache_is_exactly_full(input_major):
    """Also over down projections stored input-major in place (as kvpass lays them out for CHESS): the peer then
    reads row-major copies, the layout a user's own model has."""
    model = FAMILIES["llama"].build()
    ids, _ = _padded(batch=2, length=8)
    with torch.no_grad():
        out = model(ids[:, :-1], use_cache=True)
        want = model(ids[:, -1:], use_cache=True, **{cache_argument(model): out.past_key_values}).logits[:, -1]
        for layer in model.model.layers if input_major else ():
            layer.mlp.down_proj.weight.data = layer.mlp.down_proj.weight.data.t().contiguous().t()
        peer = PeerDecoder(model, batch=2, capacity=8)
        assert len(peer._row_major) == (len(model.model.layers) if input_major else 0)
        for layer, (k, v) in enumerate(zip(peer.keys, peer.values)):
            k[:, :, :7] = out.past_key_values.layers[layer].keys[:, :, :7]  # the cache now holds 8
            v[:, :, :7] = out.past_key_values.layers[layer].values[:, :, :7]
        peer.slot.fill_(7)
        got = peer.step(ids[:, -1:])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # release() frees the cache at once, without waiting for the garbage collector (the peer sits in a cycle)
    held = weakref.ref(peer.keys[0])
    peer.release()
    assert held() is None


def test_a_new_batch_size_reallocates_and_bumps_the_pool_version():
    model = FAMILIES["llama"].build()
    kvpass.compile(model, kvpass.Config(), inner="eager")
    runtime = backend_of(model).runtime
    with torch.no_grad():
        model.generate(_padded(batch=1)[0], max_new_tokens=3, do_sample=False)
        version = runtime.pool_version
        model.generate(_padded(batch=1)[0], max_new_tokens=3, do_sample=False)
        assert runtime.pool_version == version
        ids, mask = _padded(batch=2)
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert runtime.pool_version > version


def test_chunked_prefill_through_hf_prefill_chunk_size_equals_hf():
    """Long prompts prefill in chunks with HF's own `prefill_chunk_size`: each chunk after the first attends over
    the stored ones (kvpass::attention with a past), then the engine decodes."""
    reference, model = FAMILIES["llama"].build(), FAMILIES["llama"].build()
    kvpass.compile(model, kvpass.Config(), inner="eager")
    ids = torch.randint(3, 100, (1, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=8, do_sample=False)
        got = model.generate(ids, max_new_tokens=8, do_sample=False, prefill_chunk_size=8)
    assert torch.equal(got, want)
    calls = kvpass.report(model)["attention_calls"]
    assert calls["kvpass-cache/prefill"] == 3 * 2 and calls["decode-engine/decode"] == 7 * 2  # chunks 8, 8, 5


def test_report_prints_one_entry_per_line_and_separates_held_from_allocated_bytes():
    model = FAMILIES["llama"].build()
    kvpass.compile(model, kvpass.Config(), inner="eager")
    with torch.no_grad():
        model.generate(_padded(batch=1, length=6)[0], max_new_tokens=3, do_sample=False)
    report = kvpass.report(model)
    text = str(report)
    assert max(len(line) for line in text.splitlines()) < 200 and "\n  keys: " in text
    assert "decode_engine:\n  records: 0" in text
    assert 0 < report["kv_bytes"] < report["kv_bytes_allocated"]   # 8 tokens held, room for 256


def test_the_engine_stands_aside_when_an_attention_stays_as_the_model_wrote_it():
    """Falcon with ALiBi: its attention is refused (an additive bias), so HF's own attention runs in decode and needs
    HF's mask, which the engine does not pass: the engine passes every call through, and the tokens are HF's."""
    import copy
    import warnings

    from families import build_tiny

    reference = build_tiny("falcon", alibi=True)
    model = copy.deepcopy(reference)
    ids, mask = _padded(batch=2, length=9)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = reference.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        kvpass.compile(model, kvpass.Config(), inner="eager")
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    engine = kvpass.report(model)["decode_engine"]
    assert engine["eager_steps"] == 0 and "needs HF's mask" in engine["standing_aside"]


def test_engine_stands_aside_when_hf_attention_updates_the_cache_outside_any_graph():
    """JetMoE's attention is left as HF wrote it and, through model.compile after a first generate on HF's cache,
    its cache updates run outside the compiled graphs (Dynamo's recompile limit), so no graph shows the unfused
    update: the runtime counts it and the engine stands aside. Before, its steps ran without HF's mask and the
    logits of the second generate were off by 0.6."""
    import copy

    from families import build_tiny

    reference = build_tiny("jetmoe")
    model = copy.deepcopy(reference)
    ids = torch.randint(3, 50, (1, 9), generator=torch.Generator().manual_seed(0))
    options = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = reference.generate(ids, **options).logits
        model.compile(backend=kvpass.backend(kvpass.Config(), inner="eager"))
        for _ in range(2):  # the first binds on HF's cache, the second runs on the kvpass cache
            got = model.generate(ids, **options).logits
            assert max(float((a - b).abs().max()) for a, b in zip(got, want)) < 1e-4
    assert "unfused" in kvpass.report(model)["decode_engine"]["standing_aside"]


def test_a_plain_causal_prompt_mask_is_recognized_and_nothing_else_is(monkeypatch):
    """Dense prefill drops HF's materialized mask for torch's flash kernel only when the mask is exactly causal
    (checked in row blocks: the block size is made small so several blocks are compared)."""
    from kvpass.methods import dense

    monkeypatch.setattr(dense, "_CAUSAL_CHECK_ROWS", 3)
    L = 10
    causal = torch.ones(L, L, dtype=torch.bool).tril()[None, None]
    assert dense.is_plain_causal(causal) and dense.is_plain_causal(causal.expand(2, 4, L, L))
    windowed, late = causal.clone(), causal.clone()
    padded = causal.expand(2, 1, L, L).clone()
    padded[1, :, :, :2] = False                                   # row 1 left-padded by two tokens
    windowed[..., 9, :3] = False                                  # a sliding window cuts the last row
    late[..., 9, 9] = False                                       # the last query does not see itself
    for mask in (padded, windowed, late, torch.ones(1, 1, L, L, dtype=torch.bool),
                 causal.float(), causal[..., 1:, :]):
        assert not dense.is_plain_causal(mask)
