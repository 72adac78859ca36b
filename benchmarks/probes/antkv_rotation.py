"""Probe: does an orthogonal rotation of each KV head's value space before product quantization help AnTKV?

Rotating v by an orthogonal R (per KV head) spreads its variance evenly over the sub-spaces (cf. OPQ, QuaRot);
attention could undo it once on the output, since o = sum_j p_j v_j is linear. SmolLM2-135M, value codebooks
learned on the calibration text exactly as `kvpass calibrate` learns them (lee, 8 windows of 1024 tokens,
weighted k-means, anchors excluded), once on the values as they are, once on R v for a per-head random
orthogonal R (Haar, seed 0) and once for a randomized Hadamard (Sylvester Hadamard / sqrt(D) times random signs;
D is a power of two). Held-out: the first 4 enwiki windows of 1024 tokens, as in antkv_error_split.py:
value SQNR (dB) per layer, and perplexity with every token's values replaced by their reconstruction (rotated,
encoded, decoded, rotated back) and keys exact. CPU, about 25 minutes (2 cores).

    python benchmarks/probes/antkv_rotation.py
"""
from __future__ import annotations

import torch

from kvpass.calibration import calibration_windows
from kvpass.calibration.antkv import _codebook, _Collector
from kvpass.calibration.collect import run_windows
from kvpass.eval.ppl import windows as cut_windows
from kvpass.eval.texts import load_text
from kvpass.methods import pq
from kvpass.models import load_model

# A sibling probe: the script's directory is on sys.path when it runs as a script.
from antkv_error_split import install_transform, perplexity, reconstruct

RATES = {"1bit": (8, 256), "2bit": (4, 256)}
LAYERS = (2, 15, 28)   # the SQNR table's rows; the mean and the perplexity use every layer


def random_orthogonal(heads: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(heads, dim, dim) Haar-random orthogonal matrices: QR of a Gaussian, signs fixed by R's diagonal."""
    q, r = torch.linalg.qr(torch.randn(heads, dim, dim, generator=generator, dtype=torch.float64))
    return (q * r.diagonal(dim1=-2, dim2=-1).sign()[:, None, :]).float()


def randomized_hadamard(heads: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(heads, dim, dim) H diag(s) / sqrt(dim): Sylvester's Hadamard matrix, random signs s per head."""
    if dim & (dim - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two dimension, not {dim}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (heads, 1, dim), generator=generator, dtype=torch.float64) * 2 - 1
    return (h * signs / dim ** 0.5).float()


def rotate(x: torch.Tensor, rotation: torch.Tensor | None, inverse: bool = False) -> torch.Tensor:
    """x: (..., H, N, D) -> R x per head (R^T x with inverse), rotation (H, D, D); None leaves x as it is."""
    if rotation is None:
        return x
    return torch.einsum("hde,...hnd->...hne" if inverse else "hed,...hnd->...hne", rotation, x.float()).to(x.dtype)


def install(model, books, rotations):
    """Eager attention whose values are rotated, replaced by their codes' reconstruction and rotated back."""

    def transform(layer, k, v):
        r = rotations[layer]
        return k, rotate(reconstruct(rotate(v, r), books[layer]), r, inverse=True)

    install_transform(model, transform)


def main() -> None:
    model, tokenizer = load_model("smollm2-135m")
    calib, _ = calibration_windows(model, tokenizer, tokens=8192, seqlen=1024)
    collector = _Collector(())                       # no keys: values and their weights only
    run_windows(model, calib, collector, progress=True)
    layers = sorted(collector.values)
    heads, dim = collector.values[layers[0]][0].shape[::2]
    generator = torch.Generator().manual_seed(0)
    variants = {"none": {layer: None for layer in layers},
                "random": {layer: random_orthogonal(heads, dim, generator) for layer in layers},
                "hadamard": {layer: randomized_hadamard(heads, dim, generator) for layer in layers}}
    books = {(rate, name): {} for rate in RATES for name in variants}
    for layer in layers:
        values, weights = torch.cat(collector.values[layer], 1), torch.cat(collector.value_weights[layer], 1)
        for rate, (sub, size) in RATES.items():
            for name, rotations in variants.items():
                # The same seed for every variant: the same points sampled, so only the rotation differs.
                books[(rate, name)][layer] = _codebook(rotate(values, rotations[layer]), weights, sub, size, "cpu",
                                                       torch.Generator().manual_seed(0)).float()

    text = load_text("enwiki")
    ids = tokenizer(text.text, add_special_tokens=False, return_tensors="pt", verbose=False)["input_ids"][0]
    batches = cut_windows(ids, 1024, 4)
    held_out = {}
    run_windows(model, batches, lambda call: held_out.setdefault(call.layer, []).append(call.v), progress=False)
    held_out = {layer: torch.cat(vs, 0) for layer, vs in held_out.items()}      # (windows, Hkv, L, D)
    model.set_attn_implementation("sdpa")
    dense = perplexity(model, batches)
    print(f"dense: {dense:.3f}")
    print(f"{'rate':5s} {'rotation':9s} " + " ".join(f"L{layer:<2d} dB" for layer in LAYERS)
          + "  mean dB  values-only ppl")
    for (rate, name), book in books.items():
        sqnr = {layer: pq.sqnr_db(v, rotate(reconstruct(rotate(v, variants[name][layer]), book[layer]),
                                            variants[name][layer], inverse=True))
                for layer, v in held_out.items()}
        install(model, book, variants[name])
        ppl = perplexity(model, batches)
        print(f"{rate:5s} {name:9s} " + " ".join(f"{sqnr[layer]:6.2f}" for layer in LAYERS)
              + f"  {sum(sqnr.values()) / len(sqnr):7.2f}  {ppl:8.3f} ({ppl / dense:.3f}x)", flush=True)


if __name__ == "__main__":
    main()
