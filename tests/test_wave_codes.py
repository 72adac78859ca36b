"""Wave index with pre-RoPE codes (WaveIndex(scoring="pre-rope"), A2ATS): the rotations, the whitening, the
calibrated query moments, and the store and compiled model against the dense cache."""
from __future__ import annotations

import pytest
import torch
from families import FAMILIES
from kvpass.kernels.coded_attention import rope_rotate
from test_wave import SMALL, _decode, _padding_mask, _tokens

import kvpass
from kvpass import WaveIndex
from kvpass.calibration import calibrate
from kvpass.calibration.artefact import Calibration
from kvpass.methods.dense import DenseStore
from kvpass.methods.wave import WaveStore
from kvpass.methods.wave_codes import PreRopeCodes
from kvpass.methods.wave_index import whitening

PRE_ROPE = dict(SMALL, scoring="pre-rope", rope_window=24)


def _rotation(D=16, partial=12, scaling=1.3, seed=0):
    inv_freq = torch.rand(partial // 2, generator=torch.Generator().manual_seed(seed)) * 0.5 + 0.01
    return inv_freq, scaling


def _codes(H=2, D=16, window=24, rotation=None, offsets=(0, 3), seed=0):
    x = torch.randn(H, 200, D, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.2, 2.0, D)
    codes = PreRopeCodes(x.transpose(-1, -2) @ x / 200, rotation, window)
    codes.offsets = torch.tensor(offsets)
    return codes


@pytest.mark.parametrize("rotation", [None, _rotation()])
def test_scoring_query_gives_the_exact_score_of_a_key_at_the_window(rotation):
    """(rotated query) . (pre-RoPE key) = q . k for a key `window` positions before the query, with partial rotary,
    RoPE scaling and per-row left padding; keys at other distances get an approximation."""
    B, H, D, window, L = 2, 2, 16, 24, 40
    codes = _codes(H, D, window, rotation)
    positions = torch.arange(L)[None] - codes.offsets[:, None]               # slot s of row b: s - offset[b]
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, L, D, generator=g)   # pre-RoPE query, keys
    rotate = (lambda x, p: x) if rotation is None else (lambda x, p: rope_rotate(x, p, *rotation))
    k = rotate(b, positions)
    slot = L - 1
    q = rotate(a, positions[:, slot : slot + 1])
    scored = (codes.query(q, slot) * codes.keys(k, 0)).sum(-1)               # (B, H, L)
    exact = (q * k).sum(-1)
    at_window = slot - window
    torch.testing.assert_close(codes.keys(k, 0), b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scored[..., at_window], exact[..., at_window], rtol=1e-5, atol=1e-5)
    if rotation is not None:
        assert not torch.allclose(scored[..., :at_window], exact[..., :at_window], atol=1e-3)


def test_whitening_is_that_of_the_rotated_queries():
    """W W^T = R(w) M R(w)^T (+ ridge): the second moment of the scoring queries, not of the pre-RoPE ones."""
    rotation = _rotation()
    codes = _codes(rotation=rotation)
    W = codes.whitening(2, "cpu")
    R = rope_rotate(torch.eye(16)[None, None], torch.full((1, 16), 24), *rotation)[0, 0].T   # columns: R e_i
    expected = whitening((R @ codes.moment @ R.T)[None].expand(2, -1, -1, -1).contiguous())
    torch.testing.assert_close(W, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(W, whitening(codes.moment[None].expand(2, -1, -1, -1).contiguous()), atol=1e-3)


class _Section:
    """A calibration holding one wave section, for stores driven without a model."""

    def __init__(self, codes: PreRopeCodes, layer=0):
        self.tensors = {f"layers.{layer}.query_moment": codes.moment}
        if codes.rotation is not None:
            self.tensors.update({f"layers.{layer}.rope_inv_freq": codes.rotation[0],
                                 f"layers.{layer}.rope_scaling": torch.tensor([codes.rotation[1]])})

    def section(self, name):
        assert name == "wave-pre-rope"
        return self.tensors


def test_store_clusters_pre_rope_keys_and_full_budget_is_exact_with_padding():
    """The index's codes are means of keys rotated back by their positions (each row after its padding), its
    centroids the means of the keys as attention sees them, and with retrieval = 100 % a padded batch decodes
    exactly like the dense cache."""
    B, H, L, prompt = 3, 2, 90, 50
    k, v = _tokens(B, H, L, seed=1)
    pads = (0, 5, 11)
    mask = _padding_mask(B, L, pads).expand(B, 1, L, L)
    section = _Section(_codes(H, rotation=_rotation(), offsets=pads))
    wave = WaveStore(WaveIndex(**PRE_ROPE, retrieval=1.0, estimation=0.0), layer=0, calibration=section)
    outs = _decode([wave, DenseStore(kvpass.Dense(), layer=0)], k, v, prompt, mask, Hq=2 * H)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    index = wave.index
    assert torch.equal(wave._codes.offsets, torch.tensor(pads))
    slots = index.slots[:, :, : index.rows]
    positions = (slots - torch.tensor(pads)[:, None, None]).float()
    for b in range(B):
        for h in range(H):
            for c in range(index.clusters):
                size, start = int(index.sizes[b, h, c]), int(index.starts[b, h, c])
                if size:
                    rows = index.keys[b, h, start : start + size][None, None]
                    pre = rope_rotate(rows, positions[b, h, start : start + size][None], *_rotation(), inverse=True)
                    torch.testing.assert_close(index.codes[b, h, c], pre[0, 0].mean(0), rtol=1e-4, atol=1e-5)
                    torch.testing.assert_close(index.centroids[b, h, c], rows[0, 0].mean(0), rtol=1e-4, atol=1e-5)


def test_store_without_calibration_names_the_fix():
    with pytest.raises(RuntimeError, match="calibration"):
        WaveStore(WaveIndex(**PRE_ROPE), layer=0)


def test_calibrated_moment_is_that_of_the_pre_rope_queries():
    """The section's moment equals the mean q q^T of the q-projection's outputs (before RoPE, taken by a forward
    hook), per KV head over its GQA group, and records the layer's RoPE."""
    model = FAMILIES["llama"].build()
    hooked = {}
    hooks = [layer.self_attn.q_proj.register_forward_hook(
        lambda module, args, out, i=i: hooked.setdefault(i, []).append(out.detach()))
        for i, layer in enumerate(model.model.layers)]
    try:
        cal = calibrate(model, WaveIndex(scoring="pre-rope"), tokens=64, seqlen=32, progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    section = cal.section("wave-pre-rope")
    H, group, D = 2, 2, 16
    for layer, outs in hooked.items():
        q = torch.cat(outs, 0).view(-1, 32, H * group, D).reshape(-1, H, group, D)   # (tokens, H, group, D)
        x = q.transpose(0, 1).reshape(H, -1, D).double()
        torch.testing.assert_close(section[f"layers.{layer}.query_moment"],
                                   (x.transpose(-1, -2) @ x / x.shape[1]).float(), rtol=1e-4, atol=1e-6)
        assert torch.equal(section[f"layers.{layer}.rope_inv_freq"], model.model.rotary_emb.inv_freq.float())


def test_compiled_generate_full_budget_equals_dense_and_runs_retrieval(tmp_path):
    """A model compiled with pre-RoPE codes (calibration artefact given) generates like the dense cache at a full
    budget, and with a partial budget retrieves (keys skipped) and reports it."""
    model = FAMILIES["llama"].build()
    path = tmp_path / "wave.safetensors"
    calibrate(model, WaveIndex(scoring="pre-rope"), tokens=128, seqlen=64, progress=False).save(path)
    assert "wave-pre-rope" in Calibration.load(path).meta["sections"]
    ids = torch.randint(3, 120, (2, 60), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    outputs, reports = {}, {}
    for name, method in (("dense", kvpass.Dense()),
                         ("full", WaveIndex(**PRE_ROPE, retrieval=1.0, estimation=0.0)),
                         ("partial", WaveIndex(**PRE_ROPE, retrieval=0.2, estimation=0.3))):
        kvpass.compile(model, kvpass.Config(attention=method, calibration=str(path)), inner="eager")
        try:
            outputs[name] = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
            reports[name] = kvpass.report(model).get("layer_stats", [])
        finally:
            kvpass.detach(model)
            torch._dynamo.reset()
    assert torch.equal(outputs["dense"], outputs["full"])
    assert len(reports["partial"]) == 2
    assert all(row["keys_skipped"] > 0 and row["clusters"] > 0 for row in reports["partial"])
