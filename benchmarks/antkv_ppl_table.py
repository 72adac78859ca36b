"""The AnTKV perplexity table of issue 4 in one process: the model is loaded and its dense perplexity computed
once, then every (rate, anchors, Anchor Score) run is compiled and scored on the same windows (GPTQ protocol,
quantization active in the prompt's own attention), with the KV bytes each token holds.

    kvpass calibrate --model smollm2-135m --bits 4 2 1 0.75 0.375 --out runs/cal/smollm2-antkv.safetensors
    python benchmarks/antkv_ppl_table.py --calibration runs/cal/smollm2-antkv.safetensors --out benchmarks/results

Bytes per token count, per layer and KV head: the key and value codes (one uint8 per sub-vector), the int32
anchor-slot entry, and the expected anchor rows (anchor_ratio x 2 x head dim x 2 bytes); the codebooks and the
32-token exact window are a fixed cost per sequence, not per token. Dense is fp16 K and V.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

import kvpass
from kvpass.attach import compile as compile_model
from kvpass.attach import detach
from kvpass.eval.ppl import perplexity, text_windows
from kvpass.eval.records import write_record
from kvpass.models import load_model

RATES = (4.0, 2.0, 1.0, 0.75, 0.375)


def runs() -> list[tuple[str, kvpass.AnTKV]]:
    table = [(f"antkv-{b:g}bit-{r:g}anchors", kvpass.AnTKV(bits=b, anchor_ratio=r)) for b in RATES for r in (0.01, 0.0)]
    for bits in (1.0, 0.375):
        for score in ("attention", "attention_variance"):
            table.append((f"antkv-{bits:g}bit-0.01anchors-{score}", kvpass.AnTKV(bits=bits, score=score)))
    return table


def bytes_per_token(method, layers: int, kv_heads: int, head_dim: int) -> float:
    if method is None:
        return layers * kv_heads * 2 * head_dim * 2
    codes = sum(head_dim // method.rate(part)[0] for part in ("keys", "values"))   # one byte per sub-vector
    return layers * kv_heads * (codes + 4 + method.anchor_ratio * 2 * head_dim * 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calibration", required=True, help="artefact with every rate (kvpass calibrate)")
    parser.add_argument("--text", default="enwiki")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--max-windows", type=int, default=4)
    parser.add_argument("--only", nargs="*", default=None, help="run names to run (default: all)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    batches, text = text_windows(tokenizer, args.text, args.seqlen, args.max_windows)
    cfg = model.config
    shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, getattr(cfg, "head_dim", None)
             or cfg.hidden_size // cfg.num_attention_heads)
    common = {"windows": batches.shape[0], "seqlen": args.seqlen, "text": text.name, "text_sha256": text.sha256}
    with torch.no_grad():
        dense = perplexity(model, batches, progress=False)
    results = [{"name": "dense", **dense, **common, "bytes_per_token": bytes_per_token(None, *shape)}]
    print(f"{'dense':40s} ppl {dense['ppl']:9.3f}  1.000x dense  {results[0]['bytes_per_token']:.0f} B/token",
          flush=True)
    for name, method in runs():
        if args.only and name not in args.only:
            continue
        compile_model(model, kvpass.Config(attention=method, calibration=args.calibration), inner="eager")
        try:
            start = time.perf_counter()
            row = perplexity(model, batches, progress=False)
        finally:
            detach(model)
            torch._dynamo.reset()
        row.update(common, name=name, ratio_to_dense=row["ppl"] / dense["ppl"], config=dataclasses.asdict(method),
                   bytes_per_token=bytes_per_token(method, *shape))
        results.append(row)
        print(f"{name:40s} ppl {row['ppl']:9.3f}  {row['ratio_to_dense']:.3f}x dense  "
              f"{row['bytes_per_token']:.0f} B/token  ({time.perf_counter() - start:.0f} s)", flush=True)
    path = write_record(args.out, "eval ppl", results, config=None, model=args.model,
                        protocol={"tokenization": "whole text, no special tokens", "windows": "non-overlapping",
                                  "calibration": args.calibration})
    print(f"record: {path}")


if __name__ == "__main__":
    main()
