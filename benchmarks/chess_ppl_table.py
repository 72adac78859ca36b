"""The CHESS perplexity table of issue 6 in one process: dense perplexity once, then CATS, CHESS and CHESS+selective
at each sparsity on the same windows (GPTQ protocol; thresholds active on every token, the prompt's included),
beside the sparsity the thresholds actually reach on the evaluation text (held out from calibration).

    kvpass calibrate --model smollm2-135m --ffn chess --sparsity 0.3 0.4 0.5 0.6 --out runs/cal/smollm2-chess.safetensors
    python benchmarks/chess_ppl_table.py --calibration runs/cal/smollm2-chess.safetensors --out benchmarks/results
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

import kvpass
from kvpass.attach import compile as compile_model
from kvpass.attach import detach
from kvpass.calibration import chess as chess_calibration
from kvpass.calibration.artefact import Calibration
from kvpass.eval.ppl import perplexity, text_windows
from kvpass.eval.records import write_record
from kvpass.models import load_model

SPARSITIES = (0.3, 0.4, 0.5, 0.6)
VARIANTS = {"cats": dict(rule="cats"), "chess": dict(rule="chess"), "chess+selective": dict(selective=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calibration", required=True, help="artefact with every sparsity (kvpass calibrate)")
    parser.add_argument("--text", default="enwiki")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--max-windows", type=int, default=4)
    parser.add_argument("--sparsity", type=float, nargs="+", default=list(SPARSITIES))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    artefact = Calibration.load(args.calibration)
    batches, text = text_windows(tokenizer, args.text, args.seqlen, args.max_windows)
    common = {"windows": batches.shape[0], "seqlen": args.seqlen, "text": text.name, "text_sha256": text.sha256}
    with torch.no_grad():
        dense = perplexity(model, batches, progress=False)
    held_out = chess_calibration.record(model, batches, progress=False)   # what the thresholds zero on this text
    results = [{"name": "dense", **dense, **common}]
    print(f"{'':26s} {'ppl':>9s} {'x dense':>8s} {'FFN zeroed':>10s} {'q/o zeroed':>11s}", flush=True)
    print(f"{'dense':26s} {dense['ppl']:9.3f} {1:8.3f}", flush=True)
    for sparsity in args.sparsity:
        for variant, options in VARIANTS.items():
            method = kvpass.Chess(sparsity=sparsity, **options)
            tensors = artefact.section(chess_calibration.section_name(method))
            measured = chess_calibration.measured_sparsity(held_out, tensors, method.rule)
            compile_model(model, kvpass.Config(ffn=method, calibration=args.calibration), inner="eager", strict=True)
            try:
                start = time.perf_counter()
                row = perplexity(model, batches, progress=False)
            finally:
                detach(model)
                torch._dynamo.reset()
            name = f"{variant}-{sparsity:g}"
            row.update(common, name=name, ratio_to_dense=row["ppl"] / dense["ppl"], config=dataclasses.asdict(method),
                       measured_sparsity={k: measured[k] for k in ("ffn", "q", "o")})
            results.append(row)
            qo = f"{measured['q']:.3f}/{measured['o']:.3f}" if method.selective else ""
            print(f"{name:26s} {row['ppl']:9.3f} {row['ratio_to_dense']:8.3f} {measured['ffn']:10.3f} {qo:>11s}"
                  f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    path = write_record(args.out, "eval ppl", results, config=None, model=args.model,
                        protocol={"tokenization": "whole text, no special tokens", "windows": "non-overlapping",
                                  "calibration": args.calibration, "calibration_text": artefact.meta["text"]})
    print(f"record: {path}")


if __name__ == "__main__":
    main()
