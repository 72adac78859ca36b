"""Probe: where does AnTKV's low-bit perplexity go? Key error vs value error, and pre- vs post-RoPE key codebooks.

SmolLM2-135M, codebooks from the calibration text (lee, 8 windows of 1024 tokens, weighted k-means exactly as
`kvpass calibrate` builds them), perplexity on the first 4 enwiki windows of 1024 tokens with every token's
keys and/or values replaced by their codes' reconstruction inside eager attention (no anchors, no exact
window: the quantizer alone). Pre-RoPE keys are the post-RoPE keys rotated back by their position's angle,
quantized there and rotated forward again, so their codebooks never see the position. CPU, about 10 minutes.

    python benchmarks/probes/antkv_error_split.py
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from kvpass.kernels.coded_attention import rope_rotate
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvpass.calibration import calibration_windows
from kvpass.calibration.antkv import _codebook, _Collector
from kvpass.calibration.collect import run_windows
from kvpass.eval.ppl import windows as cut_windows
from kvpass.eval.texts import load_text
from kvpass.methods import pq
from kvpass.methods.rope import model_rotations
from kvpass.models import load_model

RATES = {"1bit": (8, 256), "0.375bit": (16, 64)}
_PROBE = "kvpass_probe"


def reconstruct(x, book):
    return pq.decode(pq.encode(x, book), book).to(x.dtype)


def install_transform(model, transform):
    """Eager attention over transform(layer, k, v) -> (k, v) (B, Hkv, L, D|Dv) instead of the layer's k, v."""

    def attention(module, q, k, v, mask, scaling=None, dropout=0.0, **kwargs):
        k, v = transform(module.layer_idx, k, v)
        group = q.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                             attn_mask=mask, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(_PROBE, attention)
    AttentionMaskInterface.register(_PROBE, sdpa_mask)
    model.set_attn_implementation(_PROBE)


def install(model, books, rotations, keys: str | None, values: bool):
    """Eager attention whose K (keys = "post" or "pre" RoPE codebooks, or None) and/or V are reconstructed."""

    def transform(layer, k, v):
        if keys == "pre":
            positions = torch.arange(k.shape[2])[None]
            pre = rope_rotate(k, positions, *rotations[layer], inverse=True)
            k = rope_rotate(reconstruct(pre, books["keys-pre"][layer]), positions, *rotations[layer])
        elif keys == "post":
            k = reconstruct(k, books["keys-post"][layer])
        if values:
            v = reconstruct(v, books["values"][layer])
        return k, v

    install_transform(model, transform)


@torch.no_grad()
def perplexity(model, batches) -> float:
    nll = 0.0
    for window in batches:
        logits = model(window[None], use_cache=False).logits[0, :-1]
        nll += F.cross_entropy(logits.float(), window[1:], reduction="sum").item()
    return math.exp(nll / (batches.numel() - batches.shape[0]))


def main() -> None:
    model, tokenizer = load_model("smollm2-135m")
    calib, _ = calibration_windows(model, tokenizer, tokens=8192, seqlen=1024)
    rotations = model_rotations(model, range(model.config.num_hidden_layers), "keys stay post-RoPE")
    collector = _Collector(("post-rope", "pre-rope"), rotations)
    run_windows(model, calib, collector, progress=True)
    generator = torch.Generator().manual_seed(0)
    books = {rate: {"keys-post": {}, "keys-pre": {}, "values": {}} for rate in RATES}
    for layer in sorted(collector.values):
        kw, vw = torch.cat(collector.key_weights[layer], 1), torch.cat(collector.value_weights[layer], 1)
        parts = {"keys-post": (torch.cat(collector.keys["post-rope"][layer], 1), kw),
                 "keys-pre": (torch.cat(collector.keys["pre-rope"][layer], 1), kw),
                 "values": (torch.cat(collector.values[layer], 1), vw)}
        for rate, (sub, size) in RATES.items():
            for name, (vectors, weights) in parts.items():
                books[rate][name][layer] = _codebook(vectors, weights, sub, size, "cpu", generator).float()
    text = load_text("enwiki")
    ids = tokenizer(text.text, add_special_tokens=False, return_tensors="pt", verbose=False)["input_ids"][0]
    batches = cut_windows(ids, 1024, 4)
    model.set_attn_implementation("sdpa")
    dense = perplexity(model, batches)
    print(f"dense: {dense:.3f}")
    for rate in RATES:
        for keys, values in ((None, True), ("post", False), ("pre", False), ("post", True), ("pre", True)):
            install(model, books[rate], rotations, keys, values)
            ppl = perplexity(model, batches)
            what = " + ".join(([f"{keys}-RoPE keys"] if keys else []) + (["values"] if values else []))
            print(f"{rate:8s} {what:28s} ppl {ppl:8.3f}  ({ppl / dense:.3f}x dense)", flush=True)


if __name__ == "__main__":
    main()
