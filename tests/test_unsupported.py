"""A model with nothing to match warns, says what did not match, and runs unrewritten and correct."""
import warnings

import pytest
import torch
from torch import nn

import kvpass


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv1d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(-1))


class OddAttention(nn.Module):
    """Attention with dropout on: a candidate the matcher must refuse, with a reason."""

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.5, is_causal=True)


def test_nothing_to_match_warns_and_runs():
    model, x = ConvNet().eval(), torch.randn(2, 8, 5)
    compiled = torch.compile(model, backend=kvpass.backend(kvpass.Config(), inner="eager"))
    with pytest.warns(UserWarning, match="no attention site was rewritten"):
        out = compiled(x)
    torch.testing.assert_close(out, model(x))


def test_unmatched_candidate_is_named_with_its_reason():
    q = k = v = torch.randn(1, 2, 4, 8)
    compiled = torch.compile(OddAttention(), backend=kvpass.backend(kvpass.Config(), inner="eager"))
    with pytest.warns(UserWarning, match=r"scaled_dot_product_attention.*dropout_p=0.5"):
        compiled(q, k, v)


def test_strict_raises():
    compiled = torch.compile(ConvNet(), backend=kvpass.backend(kvpass.Config(), inner="eager", strict=True))
    with pytest.raises(Exception, match="no attention site was rewritten"):
        compiled(torch.randn(2, 8, 5))


def test_explain_names_the_reason(monkeypatch, caplog):
    monkeypatch.setenv("KVPASS_EXPLAIN", "scaled_dot_product_attention")
    q = k = v = torch.randn(1, 2, 4, 8)
    compiled = torch.compile(OddAttention(), backend=kvpass.backend(kvpass.Config(), inner="eager"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with caplog.at_level("WARNING", logger="kvpass"):
            compiled(q, k, v)
    assert "not matched: dropout_p=0.5" in caplog.text
