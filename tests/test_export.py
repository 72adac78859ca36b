"""kvpass.export (kvpass/portable.py): a portable program that carries its KV cache, loaded back with
torch.export.load, generates the tokens of the kvpass-compiled model; bad input is refused."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import kvpass
from kvpass import portable

from families import FAMILIES


def _padded(batch=2, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def _compiled_tokens(name, ids, mask, new_tokens, config=None):
    model = FAMILIES[name].build()
    kvpass.compile(model, config or kvpass.Config(), inner="aot_eager", strict=True)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)


# gemma3: a sliding window (8) shorter than the sequence beside a global layer, its own score scale; gpt2: Conv1D
@pytest.mark.parametrize("name", ["llama", "gemma3", "gpt2"])
def test_saved_program_loaded_back_generates_the_compiled_models_tokens(name, tmp_path):
    ids, mask = _padded()
    program = kvpass.export(FAMILIES[name].build(), max_batch=2, max_cache_len=24)
    layers = FAMILIES[name].build().config.num_hidden_layers
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.kvpass.static_attention.default) == layers
    assert not any(str(t).startswith(("kvpass.attention", "kvpass.decode_attention")) for t in targets)
    path, _ = portable.save(program, tmp_path / f"{name}.pt2", model_name=name)
    got = portable.generate(torch.export.load(path), ids, mask, max_new_tokens=8)
    assert torch.equal(got, _compiled_tokens(name, ids, mask, 8))


def test_a_fresh_process_loads_the_file_and_a_second_sequence_reuses_the_cache(tmp_path):
    """No state of the exporting process is needed: only `import kvpass` (the op). A second generate starts a
    new sequence over the same buffers and gives that sequence's own tokens (HF's greedy tokens: the test above
    ties the program to the compiled model)."""
    ids, mask = _padded()
    path, meta = portable.save(kvpass.export(FAMILIES["llama"].build(), max_batch=2, max_cache_len=24),
                               tmp_path / "llama.pt2", config=kvpass.Config(), model_name="llama")
    torch.save({"ids": ids, "mask": mask}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import torch, kvpass
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        program = torch.export.load({str(path)!r})
        module = program.module()
        other = kvpass.portable.generate(module, inputs["ids"][:, 3:], max_new_tokens=5)
        tokens = kvpass.portable.generate(module, inputs["ids"], inputs["mask"], max_new_tokens=8)
        torch.save({{"tokens": tokens, "other": other}}, {str(tmp_path / "out.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    out = torch.load(tmp_path / "out.pt")
    reference = FAMILIES["llama"].build()
    with torch.no_grad():
        assert torch.equal(out["tokens"], reference.generate(ids, attention_mask=mask, max_new_tokens=8,
                                                             do_sample=False))
        assert torch.equal(out["other"], reference.generate(ids[:, 3:], max_new_tokens=5, do_sample=False))
    assert '"max_cache_len": 24' in meta.read_text()


def test_the_static_attention_op_passes_opcheck():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 3, 16, generator=g)
    k, v = torch.randn(2, 2, 3, 16, generator=g), torch.randn(2, 2, 3, 16, generator=g)
    stores = torch.zeros(3, 2, 8, 16), torch.zeros(3, 2, 8, 16)
    valid = torch.ones(3, 8, dtype=torch.bool)
    torch.library.opcheck(torch.ops.kvpass.static_attention.default,
                          (q, k, v, *stores, valid, torch.arange(2, 5), 0.25, 0.0, 0))


# Groups of 4 and 4 exact tokens: a 9-token prompt and 10 new tokens cross several key groups and value handovers
KIVI_SMALL = kvpass.Config(attention=kvpass.KIVI(bits=2, group=4, residual=4))


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_kivi_program_loaded_back_generates_the_compiled_kivi_tokens(name, tmp_path):
    """KIVI's codes, scales and exact rings are the program's buffers (kvpass::static_kivi_attention, one per
    layer): the loaded program generates the kvpass-compiled KIVI model's tokens, which 2-bit quantization moves
    away from the dense model's."""
    ids, mask = _padded()
    program = kvpass.export(FAMILIES[name].build(), KIVI_SMALL, max_batch=2, max_cache_len=24)
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.kvpass.static_kivi_attention.default) == FAMILIES[name].build().config.num_hidden_layers
    assert torch.ops.kvpass.static_attention.default not in targets
    assert {"key_codes_0", "ring_v_0"} <= {name for name, _ in program.named_buffers()}
    path, _ = portable.save(program, tmp_path / f"{name}.pt2", config=KIVI_SMALL, model_name=name)
    got = portable.generate(torch.export.load(path), ids, mask, max_new_tokens=10)
    assert torch.equal(got, _compiled_tokens(name, ids, mask, 10, KIVI_SMALL))
    assert not torch.equal(got, _compiled_tokens(name, ids, mask, 10))


def test_the_static_kivi_attention_op_passes_opcheck_and_refuses_to_outgrow_its_buffers():
    from kvpass.methods import kivi

    method = KIVI_SMALL.attention
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 3, 16, generator=g)
    k, v = torch.randn(2, 2, 3, 16, generator=g), torch.randn(2, 2, 3, 8, generator=g)
    keys, values = kivi.quantized_buffers(3, 2, kivi.capacity_for(method, 8), 16, 8, torch.float32, "cpu", 4)
    rings = kivi.exact_rings(method, 3, 2, 16, 8, torch.float32, "cpu")
    valid = torch.ones(3, 8, dtype=torch.bool)
    args = (method.bits, method.group, method.residual, 0.25, 0.0, 0)
    torch.library.opcheck(torch.ops.kvpass.static_kivi_attention.default,
                          (q, k, v, *keys, *values, *rings, valid, torch.arange(2, 5), *args))
    with pytest.raises(ValueError, match="larger max_cache_len"):
        torch.ops.kvpass.static_kivi_attention(q, k, v, *keys, *values, *rings, valid, torch.arange(6, 9), *args)


ANTKV_SMALL = kvpass.Config(attention=kvpass.AnTKV(bits=2, anchor_ratio=0.2, window=4))


def test_antkv_program_loaded_back_generates_the_compiled_antkv_tokens(tmp_path, monkeypatch):
    """AnTKV's codes, anchors, window ring and anchor counts are the program's buffers and its codebooks are
    constants (kvpass::static_antkv_attention, one per layer): the loaded program, with no calibration artefact
    anywhere, generates the kvpass-compiled AnTKV model's tokens for a padded batch (the prompt finalized in one
    call, then one token per call), twice (a new sequence resets the counts), and its metadata names the codebooks'
    digest."""
    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path / "cache"))   # the automatic calibration, private
    ids, mask = _padded()
    program = kvpass.export(FAMILIES["llama"].build(), ANTKV_SMALL, max_batch=2, max_cache_len=24)
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    layers = FAMILIES["llama"].build().config.num_hidden_layers
    assert targets.count(torch.ops.kvpass.static_antkv_attention.default) == layers
    path, meta = portable.save(program, tmp_path / "antkv.pt2", config=ANTKV_SMALL, model_name="llama")
    assert json.loads(meta.read_text())["calibration_digest"]
    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path / "elsewhere"))   # no calibration where the program loads
    loaded = torch.export.load(path)
    got = portable.generate(loaded, ids, mask, max_new_tokens=10)
    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path / "cache"))
    assert torch.equal(got, _compiled_tokens("llama", ids, mask, 10, ANTKV_SMALL))
    assert torch.equal(portable.generate(loaded, ids, mask, max_new_tokens=10), got)


def test_an_antkv_program_without_its_calibration_is_refused():
    with pytest.raises(ValueError, match=r"kvpass.export\(model, config\), which resolves the calibration"):
        portable.export(FAMILIES["llama"].build(), ANTKV_SMALL)


def test_the_static_antkv_attention_op_passes_opcheck(tmp_path, monkeypatch):
    import dataclasses

    from kvpass.calibration import resolve
    from kvpass.methods.antkv import AnTKVStore

    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path))
    model, method = FAMILIES["llama"].build(), ANTKV_SMALL.attention
    heads, dim = model.config.num_key_value_heads, model.config.head_dim
    state, constants = AnTKVStore.program_state(method, resolve(model, method, None), 0, 3, 8, dim, dim, heads,
                                                torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, model.config.num_attention_heads, 5, dim, generator=g)
    k, v = (torch.randn(2, heads, 5, dim, generator=g) for _ in range(2))
    torch.library.opcheck(torch.ops.kvpass.static_antkv_attention.default,
                          (q, k, v, *state.values(), *constants, torch.ones(3, 8, dtype=torch.bool),
                           torch.arange(5), json.dumps(dataclasses.asdict(method)), 0.25, 0.0, 0))


@pytest.mark.parametrize("config, match", [
    (kvpass.Config(attention=kvpass.WaveIndex()), "attention=Dense"),
    (kvpass.Config(ffn=kvpass.Chess(sparsity=0.5)), "ffn=None or DenseFFN"),
])
def test_methods_a_program_cannot_carry_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        kvpass.export(FAMILIES["llama"].build(), config)


@pytest.mark.parametrize("limits", [{"max_batch": 0}, {"max_cache_len": 1}, {"max_batch": 1.5}])
def test_bad_limits_are_refused(limits):
    with pytest.raises(ValueError, match=next(iter(limits))):
        kvpass.export(FAMILIES["llama"].build(), **limits)


def test_more_rows_or_tokens_than_the_program_holds_are_refused():
    program = kvpass.export(FAMILIES["llama"].build(), max_batch=2, max_cache_len=12)
    ids, _ = _padded(batch=3)
    with pytest.raises(ValueError, match="max_batch=2"):
        portable.generate(program, ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_cache_len=12"):
        portable.generate(program, ids[:2], max_new_tokens=5)
    with pytest.raises(Exception, match="<= 2"):   # the raw program's own guard on its dynamic batch
        program.module()(ids, torch.ones_like(ids), ids, torch.arange(ids.shape[1]))


def test_a_model_whose_attention_bypasses_the_interface_is_refused():
    model = FAMILIES["llama"].build()
    attention = model.model.layers[1].self_attn

    def own_attention(hidden_states, *args, **kwargs):   # a layer with its own code: nothing kvpass can hook
        return torch.zeros_like(hidden_states), None

    attention.forward = own_attention
    with pytest.raises(ValueError, match=r"1 of the model's 2 attention layers"):
        kvpass.export(model)
    assert model.config._attn_implementation != portable.ATTENTION   # the model is left as it was


# ---- ONNX (kvpass.portable_onnx): onnxruntime runs it without kvpass --------------------------------------------

def test_onnx_translation_of_the_attention_op_matches_the_op_in_onnxruntime(tmp_path):
    """Rows that see nothing (padding) come out 0 as from the kernels; the stores come back with the tokens."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from kvpass import portable_onnx

    class Attend(torch.nn.Module):
        def forward(self, q, k, v, k_store, v_store, valid, cache_position):
            return torch.ops.kvpass.static_attention_functional(q, k, v, k_store, v_store, valid, cache_position,
                                                                0.3, 0.0, 2)

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 6, 3, 80, generator=g), torch.randn(2, 2, 3, 80, generator=g), torch.randn(2, 2, 3, 80,
                                                                                                         generator=g)
    stores = torch.randn(3, 2, 9, 80, generator=g), torch.randn(3, 2, 9, 80, generator=g)   # a spare third row
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[1, :5] = False          # row 1's first new query (slot 4) sees nothing
    inputs = (q, k, v, *stores, valid, torch.arange(4, 7))
    want = Attend()(*inputs)
    assert want[0][1, :, 0].abs().max() == 0
    path = tmp_path / "attend.onnx"
    torch.onnx.export(Attend(), inputs, dynamo=True, opset_version=portable_onnx.OPSET, verbose=False,
                      custom_translation_table={torch.ops.kvpass.static_attention_functional.default:
                                                portable_onnx._attention_in_onnx}).save(path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {spec.name: t.numpy() for spec, t in zip(session.get_inputs(), inputs)})
    for g_, w in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(g_), w, atol=1e-5, rtol=1e-5)


# gemma3: a sliding window beside a global layer; KIVI on llama: quantization across several group and residual
# boundaries, in the prompt (9 tokens, groups of 4, 4 exact) and while decoding
@pytest.mark.parametrize("name, config", [("gemma3", None), ("llama", KIVI_SMALL)], ids=["dense", "kivi"])
def test_onnx_model_in_onnxruntime_generates_the_compiled_models_tokens(name, config, tmp_path):
    pytest.importorskip("onnxruntime")
    from kvpass import portable_onnx

    ids, mask = _padded()
    path = portable_onnx.export(FAMILIES[name].build(), tmp_path / f"{name}.onnx", config)
    import onnx

    graph = onnx.load(path).graph
    assert sum(node.op_type == "Attention" for node in graph.node) == FAMILIES[name].build().config.num_hidden_layers
    assert not any(node.domain not in ("", "ai.onnx") for node in graph.node)   # standard operators only
    got = portable_onnx.generate(path, ids, mask, max_new_tokens=10, cache_len=20)
    assert torch.equal(got, _compiled_tokens(name, ids, mask, 10, config))   # KIVI's differ from dense's (.pt2 test)


def test_antkv_onnx_model_runs_its_kvpass_nodes_and_generates_the_compiled_antkv_tokens(tmp_path, monkeypatch):
    """AnTKV becomes one kvpass-domain node per layer (everything else standard), its state the model's inputs and
    outputs and its codebooks initializers; onnx's reference evaluator with kvpass's op generates the kvpass-compiled
    AnTKV model's tokens for a padded batch, with no calibration artefact where it runs."""
    pytest.importorskip("onnxscript")
    import onnx

    from kvpass import portable_onnx

    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path / "cache"))
    ids, mask = _padded()
    path = kvpass.export_onnx(FAMILIES["llama"].build(), tmp_path / "antkv.onnx", ANTKV_SMALL, cache_len=24)
    nodes = onnx.load(path).graph.node
    layers = FAMILIES["llama"].build().config.num_hidden_layers
    assert [node.op_type for node in nodes if node.domain == "kvpass"] == ["StaticAnTKVAttention"] * layers
    assert all(node.domain in ("", "ai.onnx", "kvpass") for node in nodes)
    want = _compiled_tokens("llama", ids, mask, 10, ANTKV_SMALL)
    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path / "elsewhere"))
    assert torch.equal(portable_onnx.generate(path, ids, mask, max_new_tokens=10, cache_len=20), want)
    with pytest.raises(ValueError, match=r"cache_len=30 exceeds the 24 slots this AnTKV model was exported with"):
        portable_onnx.generate(path, ids, mask, max_new_tokens=10, cache_len=30)


def test_onnx_export_refuses_what_it_cannot_carry(tmp_path):
    from kvpass import portable_onnx

    with pytest.raises(ValueError, match=r"attention=Dense\(\) or KIVI\(\) or AnTKV\(\)"):
        portable_onnx.export(FAMILIES["llama"].build(), tmp_path / "x.onnx", kvpass.Config(attention=kvpass.WaveIndex()))
    with pytest.raises(ValueError, match=r"kvpass.export_onnx\(model, path, config\), which resolves the calibration"):
        portable_onnx.export(FAMILIES["llama"].build(), tmp_path / "x.onnx", ANTKV_SMALL)
