"""The tensors the CHESS rewrite adds (thresholds, input-major weight copies) reach AOTAutograd as static graph
inputs, and AOTAutograd traces through the stateless kvpass::ffn / kvpass::sparse_linear ops (kvpass/graph_inputs.py).
"""
from __future__ import annotations

import torch
from families import FAMILIES
from test_chess import _artefact

import kvpass
from kvpass import graph_inputs
from kvpass.attach import backend_of
from kvpass.config import Chess

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _aten_graphs(monkeypatch):
    """Replace the aot_eager inner compiler by AOTAutograd with a forward compiler that keeps each ATen graph and
    the static input indices AOTAutograd handed to it."""
    from torch._dynamo.backends.common import aot_autograd

    seen = []

    def forward_compiler(gm, example_inputs):
        metadata = torch._guards.TracingContext.get().fw_metadata
        seen.append((gm, len(example_inputs), list(metadata.static_input_indices)))
        return gm

    real_lookup = torch._dynamo.lookup_backend
    monkeypatch.setattr(torch._dynamo, "lookup_backend", lambda name: aot_autograd(fw_compiler=forward_compiler)
                        if name == "aot_eager" else real_lookup(name))
    return seen


def _targets(gm) -> set[str]:
    return {str(node.target) for node in gm.graph.nodes if node.op == "call_function"}


def test_chess_tensors_are_static_inputs_and_the_ops_are_traced_through(tmp_path, monkeypatch):
    model = FAMILIES["llama"].build().to(DEVICE)
    layers = len(model.base_model.layers)
    path = _artefact(model, tmp_path / "c.safetensors")
    config = kvpass.Config(ffn=Chess(sparsity=0.5, selective=True), calibration=path)
    ids = torch.randint(3, 120, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    outputs, records = {}, []
    for inner in ("eager", "aot_eager"):   # eager: the rewritten graph as it is, reading its get_attr buffers
        seen = _aten_graphs(monkeypatch)
        kvpass.compile(model, config, inner=inner, strict=True)
        records = backend_of(model).records
        try:   # a prompt and decode steps: both graphs
            outputs[inner] = model.generate(ids, max_new_tokens=3, do_sample=False, output_logits=True,
                                            return_dict_in_generate=True).logits
        finally:
            kvpass.detach(model)
            torch._dynamo.reset()
    # per layer: FFN thresholds (+ the down weight's copy on the kernel path), + q and o weight copies there
    added = layers * (4 if DEVICE == "cuda" else 1)
    assert len(records) >= 2 and all(r.sparse_ffn_sites == layers for r in records)
    assert seen, "AOTAutograd compiled nothing"
    for gm, inputs, static in seen:
        assert set(range(inputs - added, inputs)) <= set(static)   # CUDA graphs will read them in place
        assert not {"kvpass.ffn.default", "kvpass.sparse_linear.default"} & _targets(gm)
        assert all(t.startswith(("kvpass.attention", "kvpass.decode_attention")) or not t.startswith("kvpass")
                   for t in _targets(gm))
    for eager, traced in zip(outputs["eager"], outputs["aot_eager"]):
        torch.testing.assert_close(traced, eager, rtol=1e-4, atol=1e-4)


def test_lift_keeps_the_graph_it_was_given_and_orders_the_tensors():
    """lift copies: the graph Dynamo handed over keeps its placeholders (Dynamo reads them after the backend)."""
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 3))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    a, b = torch.ones(3), torch.full((3,), 2.0)
    with gm.graph.inserting_before(output):
        total = gm.graph.call_function(torch.add, (output.args[0], graph_inputs.add_tensor(gm, a)))
        total = gm.graph.call_function(torch.mul, (total, graph_inputs.add_tensor(gm, b)))
    output.args = (total,)
    gm.recompile()
    x = torch.randn(2, 4)
    before = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    lifted, tensors = graph_inputs.lift(gm, [x])
    assert [n.name for n in gm.graph.find_nodes(op="placeholder")] == before
    assert len(tensors) == 2 and tensors[0] is a and tensors[1] is b
    assert len(lifted.graph.find_nodes(op="placeholder")) == len(before) + 2
    assert not [n for n in lifted.graph.nodes if n.op == "get_attr" and n.target.startswith(graph_inputs.PREFIX)]
    torch.testing.assert_close(graph_inputs.passing(lifted, tensors)(x), gm(x))
    torch.testing.assert_close(gm(x), (torch.nn.functional.linear(x, gm.weight, gm.bias) + a) * b)
