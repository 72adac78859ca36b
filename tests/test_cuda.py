"""On a CUDA device (run through the device tool; skipped elsewhere): the Triton kernels inside compiled
models, the decode engine's recorded steps against unrecorded ones, CUDA-graph partitioning around the stateful
op, and a model-dtype (bf16) cache."""
import pytest
import torch

import kvpass
from kvpass.attach import backend_of

from families import FAMILIES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _prompt(seed, length, batch=1):
    return torch.randint(3, 120, (batch, length), generator=torch.Generator().manual_seed(seed)).cuda()


def _hf_greedy_on_a_padded_pair(name, new_tokens):
    """A fresh CUDA copy of family `name` (to be rewritten), a 2-row batch whose second row is left-padded by 3,
    its mask, and HF's own greedy tokens for it from another copy."""
    reference, model = FAMILIES[name].build().cuda(), FAMILIES[name].build().cuda()
    ids = _prompt(0, 11, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        expected = reference.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    return model, ids, mask, expected


@pytest.mark.parametrize("name", ["llama", "gemma2", "gemma3", "gpt2"])
def test_compiled_generate_on_cuda_matches_hf(name):
    model, ids, mask, expected = _hf_greedy_on_a_padded_pair(name, new_tokens=24)
    with torch.no_grad():
        kvpass.compile(model, kvpass.Config(ffn=kvpass.DenseFFN()), strict=True)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False), expected)
    engine = kvpass.report(model)["decode_engine"]
    assert engine["records"] == 1 and engine["eager_steps"] == 2 and engine["replays"] == 21, engine


def _padded_batch(batch=4, length=14):
    ids = _prompt(5, length, batch=batch)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        ids[row, : 3 * row], mask[row, : 3 * row] = 0, 0
    return ids, mask


def _recorded_and_unrecorded(config, dtype, new_tokens=20):
    """Two tiny Llamas compiled with `config`, one with the decode engine recording its steps and one without,
    greedy-generate `new_tokens` tokens for a left-padded batch of 4; asserts every step's logits are equal, exactly.
    Returns the two models (for their reports)."""
    captured, uncaptured = (FAMILIES["llama"].build(dtype=dtype).cuda() for _ in range(2))
    kvpass.compile(captured, config, strict=True)
    kvpass.compile(uncaptured, config, strict=True, capture=False)
    ids, mask = _padded_batch()
    with torch.no_grad():
        runs = [model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                               return_dict_in_generate=True) for model in (captured, uncaptured)]
    differing = {step: (a - b).abs().max().item() for step, (a, b) in enumerate(zip(runs[0].logits, runs[1].logits))
                 if not torch.equal(a, b)}
    assert not differing, f"steps whose recorded logits differ from the unrecorded ones (step: max |diff|): {differing}"
    return captured, uncaptured


def test_recorded_decode_steps_equal_unrecorded_ones_bit_for_bit():
    """bf16, a left-padded batch of 4: the replayed steps' logits are the eager steps' logits, exactly."""
    captured, uncaptured = _recorded_and_unrecorded(kvpass.Config(), torch.bfloat16)
    assert kvpass.report(captured)["decode_engine"]["replays"] == 17
    assert kvpass.report(uncaptured)["decode_engine"]["records"] == 0


def test_kivi_recorded_decode_steps_equal_unrecorded_ones():
    """KIVI's captured step (ring writes, on-device quantization of the leaving value and completed key groups,
    the dequantized capacity) replayed from a CUDA graph gives the eager steps' logits for a padded batch."""
    config = kvpass.Config(attention=kvpass.KIVI(bits=4, group=4, residual=3))
    captured, _ = _recorded_and_unrecorded(config, torch.bfloat16)
    engine = kvpass.report(captured)["decode_engine"]
    assert engine["records"] == 1 and engine["replays"] == 17, engine


def test_wave_recorded_decode_steps_equal_unrecorded_ones_across_index_runs():
    """The wave index's captured step (steady zone up to the device slot, cluster scoring, selection, retrieval,
    estimation, merge) replayed from CUDA graphs gives the eager steps' logits, exactly, through the index's build
    and its runs, each of which makes the engine drop its recording and record the step anew."""
    method = kvpass.WaveIndex(sinks=2, recent=4, segment=64, cluster_size=2, iterations=4, update_every=8,
                              min_context=16)
    captured, _ = _recorded_and_unrecorded(kvpass.Config(attention=method), torch.bfloat16, new_tokens=40)
    engine = kvpass.report(captured)["decode_engine"]
    stats = kvpass.report(captured)["layer_stats"][0]
    assert engine["captured"] and engine["records"] >= 3 and engine["stale_recordings_dropped"] >= 2, engine
    assert stats["clusters"] > 0 and stats["decode_steps"] > 20, stats


def test_antkv_recorded_decode_steps_equal_unrecorded_ones(tmp_path, monkeypatch):
    """AnTKV's captured step (the window ring written at the device slot, the leaving token encoded or anchored
    there, coded attention below the device-held finalized count merged with the ring's) replayed from a CUDA
    graph gives the eager steps' logits, exactly, for a padded batch: one recording serves every step."""
    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path))   # the codebooks calibrate on the GPU, into a private cache
    config = kvpass.Config(attention=kvpass.AnTKV(bits=2, anchor_ratio=0.2, window=4))
    captured, _ = _recorded_and_unrecorded(config, torch.bfloat16)
    engine = kvpass.report(captured)["decode_engine"]
    assert engine["captured"] and engine["records"] == 1 and engine["replays"] == 17, engine
    ids, mask = _padded_batch()
    with torch.no_grad():   # a second sequence: the stores are emptied in place, the recording serves it too
        captured.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    engine = kvpass.report(captured)["decode_engine"]
    assert engine["records"] == 1 and engine["stale_recordings_dropped"] == 0 and engine["replays"] == 36, engine


def test_left_padded_batch_under_capture_equals_each_row_alone():
    model = FAMILIES["llama"].build().cuda()
    kvpass.compile(model, kvpass.Config(), strict=True)
    ids, mask = _padded_batch()
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
        for row in range(ids.shape[0]):
            alone = model.generate(ids[row : row + 1, 3 * row :], max_new_tokens=16, do_sample=False)
            assert torch.equal(alone[0, -16:], batch[row, -16:]), row


def test_256_steps_replay_one_recording_without_compiling_or_recording_again():
    model = FAMILIES["llama"].build().cuda()
    kvpass.compile(model, kvpass.Config(), strict=True)
    backend = backend_of(model)
    ids = _prompt(6, 12)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=256, do_sample=False)
        graphs, before = len(backend.records), kvpass.report(model)["decode_engine"]
        model.generate(ids, max_new_tokens=256, do_sample=False, min_new_tokens=256)
    after = kvpass.report(model)["decode_engine"]
    assert len(backend.records) == graphs
    assert after["records"] == before["records"] == 1 and after["replays"] - before["replays"] == 255
    assert after["stale_recordings_dropped"] == 0


def test_cudagraph_partitions_around_kvpass_ops():
    from torch._dynamo.utils import counters

    reference, model = FAMILIES["llama"].build().cuda(), FAMILIES["llama"].build().cuda()
    ids = _prompt(1, 9)
    counters.clear()
    with torch.no_grad():
        expected = reference.generate(ids, max_new_tokens=24, do_sample=False)
        kvpass.compile(model, kvpass.Config(), cudagraphs=True, strict=True)
        for _ in range(2):  # the second generation replays the captured graphs
            assert torch.equal(model.generate(ids, max_new_tokens=24, do_sample=False), expected)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert len(backend_of(model).records) <= 3


def test_chess_inside_cudagraph_partitions(tmp_path):
    """CHESS+ with piecewise CUDA graphs generates what it does without them: the sparse kernels, traced into
    Inductor's code, are captured with the pieces between the attention ops, reading the thresholds and weight
    copies in place (static graph inputs, tests/test_graph_inputs.py)."""
    from torch._dynamo.utils import counters

    from test_chess import _artefact

    model = FAMILIES["llama"].build()
    config = kvpass.Config(ffn=kvpass.Chess(sparsity=0.5, selective=True),
                           calibration=_artefact(model, tmp_path / "c.safetensors"))
    model = model.cuda()
    ids = _prompt(4, 9)
    outputs = []
    with torch.no_grad():
        for cudagraphs in (False, True):
            counters.clear()
            kvpass.compile(model, config, cudagraphs=cudagraphs, strict=True)
            try:
                for _ in range(1 + cudagraphs):  # with graphs, the second generation replays them
                    outputs.append(model.generate(ids, max_new_tokens=12, do_sample=False))
            finally:
                kvpass.detach(model)
                torch._dynamo.reset()
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert all(torch.equal(out, outputs[0]) for out in outputs[1:])


def test_chess_decode_steps_recorded_by_the_engine_equal_unrecorded_ones(tmp_path):
    """CHESS+ (sparse FFN and projection kernels, traced triton_ops) inside the decode engine's recorded step: the
    replayed steps' logits equal the eager steps' for a padded batch, and every step after the warm-up replays."""
    from test_chess import _artefact

    reference = FAMILIES["llama"].build()
    config = kvpass.Config(ffn=kvpass.Chess(sparsity=0.5, selective=True),
                           calibration=_artefact(reference, tmp_path / "c.safetensors"))
    captured, _ = _recorded_and_unrecorded(config, torch.float32)
    engine = kvpass.report(captured)["decode_engine"]
    assert engine["captured"] and engine["records"] == 1 and engine["replays"] == 17, engine


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_prefill_close_to_hf(dtype):
    reference, model = (FAMILIES["qwen2"].build(dtype=dtype).cuda() for _ in range(2))
    ids = _prompt(2, 200)
    with torch.no_grad():
        expected = reference(ids).logits.float()
        kvpass.compile(model, kvpass.Config(), strict=True)
        got = model(ids).logits.float()
    assert (got - expected).norm() / expected.norm() < 2e-2


def test_fp16_store_under_fp32_model():
    """Dense(dtype=float16) under an fp32 model: keys/values are rounded to fp16 (a small, nonzero change)."""
    reference, model = FAMILIES["mistral"].build().cuda(), FAMILIES["mistral"].build().cuda()
    ids = _prompt(3, 40)
    with torch.no_grad():
        expected = reference(ids).logits
        kvpass.compile(model, kvpass.Config(attention=kvpass.Dense(dtype="float16")), strict=True)
        got = model(ids).logits
        model.generate(ids, max_new_tokens=4, do_sample=False)
    error = ((got - expected).norm() / expected.norm()).item()
    assert 0 < error < 1e-2
    report = kvpass.report(model)
    assert report["kv_bytes_by_part"]["keys"] == 2 * 1 * report["tokens_held"] * 16 * 2  # layers, kv heads, dim, fp16


@pytest.mark.parametrize("options", [dict(search="graph"), dict(scoring="pre-rope", rope_window=24)])
def test_query_aware_wave_options_on_cuda_match_the_cpu(options, monkeypatch):
    """The graph search and the pre-RoPE codes run on CUDA tensors (Triton kernels) and decode like the same
    store on the CPU (fp32 references) for a padded GQA batch."""
    from test_wave import SMALL, _decode, _padding_mask, _tokens
    from test_wave_codes import _codes, _rotation, _Section

    from kvpass.methods.wave import WaveStore

    k, v = _tokens(3, 2, 90, seed=5)
    mask = _padding_mask(3, 90, (0, 5, 11))
    section = _Section(_codes(2, rotation=_rotation(), offsets=(0, 5, 11)))
    method = kvpass.WaveIndex(**SMALL, retrieval=0.2, estimation=0.3, **options)
    outs = {}
    for device, kernels in (("cpu", "reference"), ("cuda", "triton")):
        monkeypatch.setenv("KVPASS_KERNELS", kernels)
        store = WaveStore(method, layer=0, calibration=section)
        outs[device] = _decode([store], k.to(device), v.to(device), 50, mask.to(device), Hq=4)[0]
        assert store.stats()["decode_steps"] == 40
    for a, b in zip(outs["cpu"], outs["cuda"]):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-4, atol=1e-4)


def test_float_mask_with_biases_is_refused_on_cuda_in_prefill():
    from kvpass.ops import MODE_ONESHOT

    backend = kvpass.backend(kvpass.Config())
    q, k, v = (torch.randn(1, 2, 5, 16, device="cuda") for _ in range(3))
    bias = torch.arange(5.0, device="cuda").expand(1, 1, 5, 5).contiguous()  # ALiBi-like: no 0/-inf values
    with pytest.raises(NotImplementedError, match="biases other than 0 and -inf"):
        torch.ops.kvpass.attention(q, k, v, bias, True, 0.25, 0.0, 0, MODE_ONESHOT, backend.runtime.id, 0, 0)


def test_a_longer_generation_re_records_after_its_stores_grow():
    """The second generate needs more room than the first: the stores reallocate, the stale recording is dropped and
    a new one is made (in a new graph pool: recording into the dropped one's pool tripped an allocator assert)."""
    reference, model = FAMILIES["llama"].build().cuda(), FAMILIES["llama"].build().cuda()
    kvpass.compile(model, kvpass.Config(), strict=True)
    ids = _prompt(9, 10)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, do_sample=False)
        longer = _prompt(10, 300)
        assert torch.equal(model.generate(longer, max_new_tokens=12, do_sample=False),
                           reference.generate(longer, max_new_tokens=12, do_sample=False))
    engine = kvpass.report(model)["decode_engine"]
    assert engine["captured"] and engine["records"] == 2 and engine["stale_recordings_dropped"] == 1, engine


def test_antkv_calibrates_on_cuda_and_decodes_with_its_artefact():
    """Calibration on the model's device: k-means runs there with seeds drawn on the CPU generator (a CPU generator
    for CUDA tensors failed in torch.multinomial), the artefact has the CPU's sections and shapes, and a compiled
    model decodes with it."""
    from kvpass.calibration import calibrate

    method = kvpass.AnTKV(bits=2)
    on_cpu = calibrate(FAMILIES["llama"].build(), method, tokens=512, seqlen=128, progress=False)
    model = FAMILIES["llama"].build().cuda()
    on_cuda = calibrate(model, method, tokens=512, seqlen=128, progress=False)
    assert on_cuda.meta["sections"] == on_cpu.meta["sections"]
    assert {k: v.shape for k, v in on_cuda.tensors.items()} == {k: v.shape for k, v in on_cpu.tensors.items()}
    assert all(torch.isfinite(v).all() for v in on_cuda.tensors.values())


def test_dense_prefill_drops_only_an_exactly_causal_mask():
    """HF materializes the causal mask under torch.compile (transformers < 5.25); dense prefill then runs SDPA
    without it (flash). A mask that also hides padding is kept: the output matches the reference with that mask."""
    from kvpass.kernels.attention import attention_over_store_reference
    from kvpass.methods.base import AttentionSpec
    from kvpass.methods.dense import DenseStore

    g = torch.Generator(device="cuda").manual_seed(0)
    B, Hq, Hkv, L, D = 2, 8, 2, 300, 64
    q = torch.randn(B, Hq, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    causal = torch.ones(L, L, dtype=torch.bool, device="cuda").tril()[None, None].expand(B, 1, L, L)
    padded = causal.clone()
    padded[1, :, :, :5] = False
    padded[1, :, :5, :5] = torch.eye(5, dtype=torch.bool, device="cuda")  # a padding query sees itself only
    spec = AttentionSpec(scale=D ** -0.5)
    for mask in (causal, padded):
        store = DenseStore(kvpass.Dense(), 0)
        store.append(k, v)
        got = store.attend(q, mask, True, spec)
        want = attention_over_store_reference(q, k, v, scale=spec.scale, mask=mask)
        assert ((got.float() - want.float()).norm() / want.float().norm()) < 1e-2
    store = DenseStore(kvpass.Dense(), 0)
    store.append(k, v)
    assert torch.equal(store.attend(q, causal, True, spec), store.attend(q, None, True, spec))


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_exported_program_on_cuda_generates_hf_greedy(name, tmp_path):
    """kvpass.export on CUDA: the program's kvpass::static_attention runs the Triton kernel (device slot, validity),
    saved and loaded back."""
    from kvpass import portable

    model, ids, mask, expected = _hf_greedy_on_a_padded_pair(name, new_tokens=12)
    path, _ = portable.save(kvpass.export(model, max_batch=2, max_cache_len=32), tmp_path / "p.pt2")
    assert torch.equal(portable.generate(torch.export.load(path), ids, mask, max_new_tokens=12), expected)
