"""The noise of issue 20's calibration-size A/B: SmolLM2's default-size AnTKV calibration (16,384 tokens of `lee`)
made again with another k-means seed, written where `kvpass eval ppl --calibration` reads it (docs/antkv.md §6).

    python benchmarks/probes/antkv_calibration_seed1.py --seed 1 --out /tmp/cal-seed1/cal.safetensors
    kvpass eval ppl --model smollm2-135m --text enwiki --seqlen 1024 --max-windows 4 --attention antkv --bits 1 \\
        --calibration /tmp/cal-seed1/cal.safetensors
"""
from __future__ import annotations

import argparse
import functools

import kvpass.calibration.antkv as antkv_calibration
from kvpass.calibration import calibrate
from kvpass.config import AnTKV
from kvpass.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1, help="k-means seed (the default calibration uses 0)")
    parser.add_argument("--bits", type=float, default=1.0)
    parser.add_argument("--out", required=True, help="artefact path (.safetensors)")
    args = parser.parse_args()
    # The calibration entry point takes no seed: the section's calibrator is wrapped with one for this run.
    antkv_calibration.calibrate_antkv = functools.partial(antkv_calibration.calibrate_antkv, seed=args.seed)
    model, tokenizer = load_model("smollm2-135m")
    artefact = calibrate(model, AnTKV(bits=args.bits), tokenizer=tokenizer)
    print(artefact.meta["text"], artefact.meta["sections"], "->", artefact.save(args.out))


if __name__ == "__main__":
    main()
