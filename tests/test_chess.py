"""CHESS end to end on tiny models: calibration against NumPy, the rewrite's op counts, compiled vs an eager
model thresholded by hand, measured sparsity on held-out tokens, and composition with the attention methods."""
from __future__ import annotations

import collections
import math
import warnings

import numpy as np
import pytest
import torch
from families import FAMILIES
from kernel_paths import assert_kernel_paths_agree

import kvpass
from kvpass import calibration
from kvpass.attach import backend_of
from kvpass.calibration import chess as chess_calibration
from kvpass.config import Chess


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path / "cache"))


def _windows(count=6, length=40, seed=0):
    return torch.randint(3, 120, (count, length), generator=torch.Generator().manual_seed(seed))


def _artefact(model, path, sparsities=(0.5,), windows=None):
    cal = calibration.Calibration.new(model, {"name": "random-token-ids", "sha256": None})
    chess_calibration.calibrate_chess(model, _windows() if windows is None else windows,
                                      [Chess(sparsity=s) for s in sparsities], cal, progress=False)
    return str(cal.save(path))


def _count(gm, target) -> int:
    return sum(1 for node in gm.graph.nodes if node.op == "call_function" and node.target == target)


def _hooks(model, family: str, observe):
    """Forward hooks on the projections a hand-written reference needs (tests may use module names; kvpass may
    not): observe(kind, layer, input, output) for kinds gate/up/down/q/o."""
    names = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "q": "self_attn.q_proj", "o": "self_attn.o_proj"}
    if family == "gpt_neox":
        names = {"up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"}
    handles = []
    for layer, block in enumerate(model.base_model.layers):
        for kind, name in names.items():
            module = block.get_submodule(name)
            handles.append(module.register_forward_hook(
                lambda mod, args, out, kind=kind, layer=layer: observe(kind, layer, args[0], out)))
    return handles


# -- calibration ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_calibration_equals_numpy_quantiles(family):
    """Every statistic of the section, recomputed from the projections' own inputs/outputs with NumPy."""
    model = FAMILIES[family].build()
    windows = _windows()
    seen = {}

    def observe(kind, layer, x, out):
        seen.setdefault((kind, layer), []).append((x.detach().reshape(-1, x.shape[-1]).double().numpy(),
                                                   out.detach().reshape(-1, out.shape[-1]).double().numpy()))

    recorder = chess_calibration.record(model, windows, max_values=1 << 30, progress=False)
    handles = _hooks(model, family, observe)
    try:
        with torch.no_grad():
            for window in windows:
                model(window[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    act = {"llama": lambda g: g / (1 + np.exp(-g)),
           "gpt_neox": lambda u: 0.5 * u * (1 + np.vectorize(math.erf)(u / np.sqrt(2)))}[family]
    for s in (0.3, 0.5):
        tensors = chess_calibration.thresholds(recorder, s)
        for layer in range(2):
            if family == "llama":
                a = np.abs(act(np.concatenate([o for _, o in seen[("gate", layer)]])))
                factor = np.abs(np.concatenate([o for _, o in seen[("up", layer)]])).mean(0)
            else:
                a = np.abs(act(np.concatenate([o for _, o in seen[("up", layer)]])))
                down = model.base_model.layers[layer].mlp.dense_4h_to_h.weight.detach().double().numpy()
                factor = np.linalg.norm(down, axis=0)
            tau = np.quantile(a * factor, s)
            np.testing.assert_allclose(tensors[f"layers.{layer}.channel_factor"], factor, rtol=2e-5)
            np.testing.assert_allclose(tensors[f"layers.{layer}.thresholds"], tau / factor, rtol=2e-5)
            np.testing.assert_allclose(tensors[f"layers.{layer}.cats"], [np.quantile(a, s)], rtol=2e-5)
            if family == "llama":
                for kind in ("q", "o"):
                    x = np.abs(np.concatenate([i for i, _ in seen[(kind, layer)]]))
                    np.testing.assert_allclose(tensors[f"layers.{layer}.{kind}_input"], [np.quantile(x, s)],
                                               rtol=2e-5)
            else:  # GPT-NeoX's fused qkv: no query input threshold; its output projection has one
                assert f"layers.{layer}.q_input" not in tensors and f"layers.{layer}.o_input" in tensors


def test_sampling_bounds_the_values_kept():
    model = FAMILIES["llama"].build()
    recorder = chess_calibration.record(model, _windows(count=4, length=40), max_values=96 * 4 * 10, progress=False)
    assert all(sum(len(a) for a in acts) == 40 for acts in recorder.activations.values())


def test_config_is_validated():
    for bad, match in (({"sparsity": 1.0}, "sparsity=1.0"), ({"sparsity": 0}, "sparsity=0"),
                       ({"rule": "teal"}, "rule='teal'"), ({"selective": 1}, "selective=1")):
        with pytest.raises(ValueError, match=match):
            Chess(**bad)
    assert kvpass.Config.from_dict(kvpass.Config(ffn=Chess(0.4, True, "cats")).to_dict()).ffn == Chess(0.4, True, "cats")


@pytest.mark.parametrize("made_for, sparsities, match", [("llama", (0.3,), "chess-0.5"),
                                                         ("mistral", (0.5,), "made for another model")])
def test_a_wrong_artefact_is_refused_by_compile_in_one_plain_error(tmp_path, made_for, sparsities, match):
    """Checked when kvpass.compile binds the model, not at the first call inside Dynamo (which would wrap it in a
    BackendCompilerFailed traceback)."""
    model = FAMILIES["llama"].build()
    path = _artefact(FAMILIES[made_for].build(), tmp_path / "c.safetensors", sparsities=sparsities)
    with pytest.raises(ValueError, match=match):
        kvpass.compile(model, kvpass.Config(ffn=Chess(sparsity=0.5), calibration=path), inner="eager")
    assert backend_of(model) is None  # left as it was, so a corrected config can be compiled


# -- the rewrite -----------------------------------------------------------------------------------------------
def _thresholded_reference(model, family, tensors, selective, rule="chess"):
    """Hooks that apply the thresholds by hand on the eager model: activation inputs of the down projection, and
    (selective) the query/output projection inputs."""
    handles = []
    for layer, block in enumerate(model.base_model.layers):
        t = tensors[f"layers.{layer}.thresholds"]
        if rule == "cats":
            t = torch.full_like(t, float(tensors[f"layers.{layer}.cats"]))
        if family == "gpt_neox":
            act = block.mlp.act

            def masked(x, act=act, t=t):
                a = act(x)
                return a.masked_fill(a.abs() < t, 0)

            block.mlp.act = _Function(masked)
            handles.append(("restore", block.mlp, "act", act))
        else:
            gate = block.mlp.gate_proj
            handles.append(gate.register_forward_hook(
                lambda mod, args, out, t=t, act=block.mlp.act_fn: _inverse_mask(out, act, t)))
        if selective:
            names = {"gpt_neox": {"o": "attention.dense"}}.get(family, {"q": "self_attn.q_proj", "o": "self_attn.o_proj"})
            for kind, name in names.items():
                key = f"layers.{layer}.{kind}_input"
                if key in tensors:
                    value = float(tensors[key])
                    handles.append(block.get_submodule(name).register_forward_pre_hook(
                        lambda mod, args, v=value: (args[0].masked_fill(args[0].abs() < v, 0),)))
    return handles


class _Function(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _inverse_mask(gate_out, act, t):
    """Zero the gate outputs whose activation is below its threshold: act(0) = 0 for SiLU and GELU."""
    return gate_out.masked_fill(act(gate_out).abs() < t, 0)


def _remove(handles):
    for handle in handles:
        if isinstance(handle, tuple):
            _, owner, name, value = handle
            setattr(owner, name, value)
        else:
            handle.remove()


@pytest.mark.parametrize("family,selective,rule", [("llama", False, "chess"), ("llama", True, "chess"),
                                                   ("llama", False, "cats"), ("gemma", True, "chess"),
                                                   ("gpt_neox", True, "chess")])
def test_compiled_equals_thresholded_eager_model(family, selective, rule, tmp_path):
    model = FAMILIES[family].build()
    path = _artefact(model, tmp_path / "c.safetensors")
    tensors = calibration.Calibration.load(path).section("chess-0.5")
    ids = _windows(2, 11, seed=5)
    handles = _thresholded_reference(model, family, tensors, selective, rule)
    try:
        with torch.no_grad():
            expected = model(ids, use_cache=False).logits
    finally:
        _remove(handles)
    with torch.no_grad():
        plain = model(ids, use_cache=False).logits
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    backend = kvpass.backend(kvpass.Config(ffn=Chess(sparsity=0.5, selective=selective, rule=rule),
                                           calibration=path), inner="eager")
    backend._inner = keep
    kvpass.attach(model, backend)
    try:
        model.compile(backend=backend)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                out = model(ids, use_cache=False).logits
    finally:
        kvpass.detach(model)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert (out - plain).abs().max() > 1e-3          # the thresholds did something
    gm = graphs[-1]
    layers = len(model.base_model.layers)
    assert _count(gm, torch.ops.kvpass.ffn.default) == layers
    projections = {"gpt_neox": layers} if selective else {}        # NeoX: output projections only (fused qkv)
    assert _count(gm, torch.ops.kvpass.sparse_linear.default) == projections.get(family, 2 * layers * selective)
    assert backend.records[-1].sparse_ffn_sites == layers
    if family == "gpt_neox" and selective:
        assert any("fused qkv" in str(w.message) for w in caught)


def test_key_and_value_projections_stay_dense(tmp_path):
    model = FAMILIES["llama"].build()
    path = _artefact(model, tmp_path / "c.safetensors")
    graphs = []
    backend = kvpass.backend(kvpass.Config(ffn=Chess(selective=True), calibration=path), inner="eager")
    backend._inner = lambda gm, example_inputs: graphs.append(gm) or gm.forward
    kvpass.attach(model, backend)
    try:
        model.compile(backend=backend)
        with torch.no_grad():
            model(_windows(1, 9)[0][None], use_cache=False)
    finally:
        kvpass.detach(model)
    gm = graphs[-1]
    attn = model.base_model.layers[0].self_attn
    dense_weights = {tuple(n.args[1].meta["example_value"].shape) for n in gm.graph.nodes
                     if n.op == "call_function" and n.target is torch._C._nn.linear}
    assert tuple(attn.k_proj.weight.shape) in dense_weights and tuple(attn.v_proj.weight.shape) in dense_weights
    sparse = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.kvpass.sparse_linear.default]
    shapes = sorted(tuple(n.args[1].meta["example_value"].shape) for n in sparse[:2])
    assert shapes == sorted([tuple(attn.q_proj.weight.shape), tuple(attn.o_proj.weight.shape)])


# -- accuracy of the calibration on held-out tokens ----------------------------------------------------------------
def test_measured_sparsity_on_held_out_tokens_is_the_target():
    model = FAMILIES["llama"].build()
    recorder = chess_calibration.record(model, _windows(count=48, length=64, seed=0), progress=False)
    held_out = chess_calibration.record(model, _windows(count=48, length=64, seed=1), progress=False)
    for s in (0.3, 0.5, 0.6):
        tensors = chess_calibration.thresholds(recorder, s)
        for rule in ("chess", "cats"):
            measured = chess_calibration.measured_sparsity(held_out, tensors, rule)
            assert abs(measured["ffn"] - s) <= 0.02, (s, rule, measured)
            assert abs(measured["q"] - s) <= 0.02 and abs(measured["o"] - s) <= 0.02, measured


# -- composition and automatic calibration -----------------------------------------------------------------------
@pytest.mark.parametrize("attention", [kvpass.WaveIndex(min_context=96, sinks=2, recent=16, segment=64),
                                       kvpass.Dense()], ids=["wave", "dense"])
def test_composes_with_attention_methods_in_generate(attention, tmp_path):
    model = FAMILIES["llama"].build()
    path = _artefact(model, tmp_path / "c.safetensors")
    ids = _windows(1, 120, seed=3)
    kvpass.compile(model, kvpass.Config(attention=attention, ffn=Chess(selective=True), calibration=path),
                   inner="aot_eager", strict=True)
    try:
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
        rep = kvpass.report(model)
    finally:
        kvpass.detach(model)
    assert out.shape == (1, 125)
    assert rep["chess"]["sparse_ffn_sites"] == 2 and rep["chess"]["sparse_projections"] == 4
    # dense decodes through the decode engine's op; the other methods keep kvpass::attention (kvpass/engine.py)
    assert rep["attention_calls"].get("decode-engine/decode", rep["attention_calls"].get("kvpass-cache/decode")) > 0


def test_automatic_calibration_is_cached_per_sparsity(tmp_path):
    model = FAMILIES["llama"].build(seed=3)
    with pytest.warns(UserWarning, match="random token ids"):
        first = calibration.resolve(model, Chess(sparsity=0.4), None)
    again = calibration.resolve(model, Chess(sparsity=0.4, selective=True), None)   # same section
    assert again.meta == first.meta
    calibration.resolve(model, Chess(sparsity=0.6), None)
    assert len(list((tmp_path / "cache" / "calibration").glob("*chess*.safetensors"))) == 2


def test_decode_kernels_match_the_dense_path(tmp_path, monkeypatch):
    """Generate with the sparse Triton kernels (the interpreter on CPU) = with the dense thresholded path: decode
    steps (one token) take the kernels, the prompt the dense path, and both zero the same activations. On CPU the
    rewritten graph runs eagerly (inner="eager"): a traced CPU graph takes the dense path (test_ops)."""
    model = FAMILIES["llama"].build()
    path = _artefact(model, tmp_path / "c.safetensors")
    inner = "inductor" if torch.cuda.is_available() else "eager"

    from kvpass.kernels.sparse_ffn import kernel

    calls = collections.Counter()   # the kernels were taken (run on CPU, traced into the graph on a GPU)
    for name in ("sparse_ffn", "sparse_linear"):
        monkeypatch.setattr(kernel, name, lambda *a, _f=getattr(kernel, name), _n=name: calls.update([_n]) or _f(*a))

    def compile_for(model, kernels):
        kvpass.compile(model, kvpass.Config(ffn=Chess(sparsity=0.5, selective=True), calibration=path),
                       inner=inner, strict=True)

    assert_kernel_paths_agree(model, compile_for, _windows(1, 20, seed=4), monkeypatch)
    assert calls["sparse_ffn"] > 0 and calls["sparse_linear"] > 0


def test_kernel_weights_are_laid_out_in_place_before_the_first_trace_and_restored_by_detach(tmp_path, monkeypatch):
    """Where the sparse kernels run (KVPASS_KERNELS=triton: the interpreter on CPU), kvpass.compile stores the down,
    query and output projections input-major in place (strides (1, out)) before Dynamo first traces the model, so
    the rewrite copies no weight and no guard on their strides fails later; detach gives the model its row-major
    weights back, unchanged."""
    monkeypatch.setenv("KVPASS_KERNELS", "triton")
    model = FAMILIES["llama"].build()
    path = _artefact(model, tmp_path / "c.safetensors")
    relaid = {name: p.detach().clone() for name, p in model.named_parameters()
              if name.endswith(("down_proj.weight", "q_proj.weight", "o_proj.weight"))}
    kept = {name: p.stride() for name, p in model.named_parameters() if name not in relaid}
    kvpass.compile(model, kvpass.Config(ffn=Chess(sparsity=0.5, selective=True), calibration=path),
                   inner="eager", strict=True)
    parameters = dict(model.named_parameters())
    assert all(parameters[name].stride() == (1, value.shape[0]) for name, value in relaid.items())
    assert all(parameters[name].stride() == stride for name, stride in kept.items())
    with torch.no_grad():
        model.generate(_windows(2, 9, seed=3), max_new_tokens=3, do_sample=False)
    report = kvpass.report(model)["chess"]
    assert report["weight_copy_bytes"] == 0 and report["weights_relaid_out"] == len(relaid) == 3 * 2, report
    assert len(backend_of(model).records) <= 3   # prefill and decode graphs: no recompile for a changed stride
    kvpass.detach(model)
    parameters = dict(model.named_parameters())
    assert all(parameters[name].is_contiguous() and torch.equal(parameters[name], value)
               for name, value in relaid.items())
