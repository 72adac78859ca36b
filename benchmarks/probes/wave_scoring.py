"""Keys read vs accuracy of the wave index's scorings ("centroid" = RetroInfer, "whitened" = query-aware
clustering, "pre-rope" = A2ATS codes) on the real model's own queries, keys and values (CPU, fp32 references).

Each layer of SmolLM2-135M sees one enwiki window: the first `prompt` tokens are loaded into a wave store (the
whitened index takes their queries' second moment; the pre-RoPE codes use a calibration on the default
calibration text), then the next `steps` tokens are decoded one at a time
with their real queries, and each output is compared with exact attention over the same keys. Prints, per
clustering and retrieval budget, the share of keys read exactly (steady zone + retrieved clusters) and the mean
relative error of the attention output, over all layers and steps.

    python benchmarks/probes/wave_scoring.py --prompt 3840 --steps 64 --scorings centroid pre-rope
"""
from __future__ import annotations

import argparse

import torch


def main() -> None:
    from kvpass import WaveIndex
    from kvpass.calibration import calibrate
    from kvpass.calibration.collect import observe_attention
    from kvpass.config import WAVE_SCORING, WAVE_SEARCH
    from kvpass.eval.ppl import windows
    from kvpass.eval.texts import load_text
    from kvpass.methods.base import AttentionSpec
    from kvpass.methods.wave import WaveStore
    from kvpass.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=3840)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.009, 0.018, 0.036, 0.072])
    parser.add_argument("--scorings", nargs="+", choices=WAVE_SCORING, default=list(WAVE_SCORING))
    parser.add_argument("--searches", nargs="+", choices=WAVE_SEARCH, default=["scan"],
                        help="scan every centroid, or search the cluster graph (not with pre-rope)")
    parser.add_argument("--rope-windows", type=int, nargs="+", default=[WaveIndex.rope_window],
                        help="pre-rope: the scoring distances to compare")
    parser.add_argument("--per-layer", action="store_true", help="also print each layer's mean relative error")
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m")
    codes = calibrate(model, WaveIndex(scoring="pre-rope"), tokenizer=tokenizer) if "pre-rope" in args.scorings else None
    ids = tokenizer(load_text("enwiki").text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    window = windows(ids, args.prompt + args.steps, 1)
    calls = []
    with torch.no_grad(), observe_attention(model, calls.append):
        model._call_impl(window, use_cache=False)
    P = args.prompt
    print(f"{'scoring':>14} {'retrieval':>9} {'keys exact %':>12} {'keys est. %':>11} {'rel. error':>10} {'centroids %':>11}")
    variants = [(scoring, window, search) for scoring in args.scorings
                for window in (args.rope_windows if scoring == "pre-rope" else [WaveIndex.rope_window])
                for search in (["scan"] if scoring == "pre-rope" else args.searches)]
    for scoring, window, search in variants:
        for retrieval in args.budgets:
            method = WaveIndex(retrieval=retrieval, scoring=scoring, rope_window=window, search=search)
            errors, exact, estimated, scored, layers = [], [], [], [], []
            for call in calls:
                spec = AttentionSpec(scale=call.scale, softcap=call.softcap)
                store = WaveStore(method, layer=call.layer, calibration=codes)
                store.load(call.k[:, :, :P], call.v[:, :, :P], call.q[:, :, :P])
                for t in range(P, P + args.steps):
                    store.append(call.k[:, :, t : t + 1], call.v[:, :, t : t + 1])
                    out = store.tripartite(call.q[:, :, t : t + 1], spec)
                    truth = call.out[:, :, t : t + 1]
                    errors.append(((out - truth).norm() / truth.norm()).item())
                    store.maintain()
                layers.append(sum(errors[-args.steps:]) / args.steps)
                stats = store.stats()
                exact.append(stats["keys_exact"])
                estimated.append(stats["keys_estimated"])
                scored.append(stats["centroids_scored"])
            n = len(calls)
            name = (scoring if scoring != "pre-rope" else f"{scoring}-{window}") + ("" if search == "scan" else "+graph")
            print(f"{name:>14} {retrieval:9.3f} {100 * sum(exact) / n:12.2f} {100 * sum(estimated) / n:11.2f} "
                  f"{sum(errors) / len(errors):10.4f} {100 * sum(scored) / n:11.1f}", flush=True)
            if args.per_layer:
                print("    per layer: " + " ".join(f"{call.layer}:{e:.3f}" for call, e in zip(calls, layers)))


if __name__ == "__main__":
    main()
