"""Each catalogue entry's example traces to exactly its variant, and the rewritten example computes the
same as the original."""
import pytest
import torch

import kvpass
from kvpass.patterns.matchers import CATALOGUE, find_attention, find_ffn

from families import FAMILIES


def _graph_of(module, inputs):
    torch._dynamo.reset()  # a model of an already-compiled class would otherwise reuse that graph
    graphs = []

    def grab(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(module, backend=grab)(*inputs)
    return graphs[0]


@pytest.mark.parametrize("entry", CATALOGUE, ids=[e.name for e in CATALOGUE])
def test_example_matches_its_variant_only(entry):
    module, inputs = entry.example()
    gm = _graph_of(module, inputs)
    sites, misses = (find_attention if entry.kind == "attention" else find_ffn)(gm.graph)
    assert [site.variant for site in sites] == [entry.name] and misses == []
    assert sites[0].layer == 0


@pytest.mark.parametrize("entry", CATALOGUE, ids=[e.name for e in CATALOGUE])
def test_rewritten_example_equals_eager(entry):
    module, inputs = entry.example()
    with torch.no_grad():
        expected = module(*inputs)
        compiled = torch.compile(module, backend=kvpass.backend(kvpass.Config(ffn=kvpass.DenseFFN()), inner="eager"))
        got = compiled(*inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_every_variant_seen_in_the_family_matrix_is_catalogued():
    """The report of each family's compile only names catalogued variants."""
    known = {entry.name for entry in CATALOGUE}
    for name, family in FAMILIES.items():
        model = family.build()
        gm = _graph_of(model, (torch.randint(3, 100, (1, 6)),))
        variants = {s.variant for s in find_attention(gm.graph)[0]} | {s.variant for s in find_ffn(gm.graph)[0]}
        assert variants and variants <= known, (name, variants - known)
