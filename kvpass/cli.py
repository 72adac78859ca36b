"""The `kvpass` command line: `generate` (the main job) and `inspect` (what matched and why)."""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from .config import Config, Dense, DenseFFN

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _config(args) -> Config:
    return Config(attention=Dense(dtype=args.kv_dtype), ffn=DenseFFN() if args.ffn == "dense" else None)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="registry name or local HF directory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="model weights dtype")
    parser.add_argument("--kv-dtype", choices=sorted(_DTYPES), default=None, help="KV cache storage dtype")
    parser.add_argument("--ffn", choices=["none", "dense"], default="none", help="FFN method (none: Inductor keeps it)")


def _load(args):
    from .models import load_model

    return load_model(args.model, dtype=_DTYPES[args.dtype], device=args.device)


def _encode(tokenizer, prompt: str, chat: bool, device) -> dict:
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
    else:
        ids = tokenizer(prompt, return_tensors="pt")
    return {key: value.to(device) for key, value in ids.items()}


def cmd_generate(args) -> int:
    from .attach import compile as compile_model
    from .report import report

    if args.max_new_tokens < 1:
        raise SystemExit(f"--max-new-tokens={args.max_new_tokens}: must be at least 1")
    model, tokenizer = _load(args)
    compile_model(model, _config(args), inner=args.inner)
    inputs = _encode(tokenizer, args.prompt, not args.raw, args.device)
    prompt_len = inputs["input_ids"].shape[1]
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def timed():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, **kwargs)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    out, first = timed()   # includes tracing and compiling the prefill and decode graphs
    out, steady = timed()  # the same generation on the compiled graphs
    new = out.shape[1] - prompt_len
    rep = report(model)
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {args.dtype}, "
          f"{args.device}); kvpass {json.dumps(_config(args).to_dict()['attention'])}, inner={args.inner}")
    print(f"prompt: {args.prompt!r}")
    print(f"generated: {tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True)!r}")
    print(f"rewritten: {rep['rewritten']} (attention sites {rep['attention_sites']}, FFN sites {rep['ffn_sites']}, "
          f"layers {rep['layers']}, graphs {rep['graphs']}, unmatched {len(rep['unmatched'])})")
    print(f"KV cache held: {rep['kv_bytes'] / 2**20:.2f} MiB for {rep['tokens_held']} tokens "
          f"({rep['kv_bytes_by_part']})")
    print(f"speed: {new / steady:.1f} tokens/s ({new} tokens in {steady:.2f} s; first call incl. compile {first:.1f} s)")
    if args.json:
        print(json.dumps({"report": rep, "tokens_per_s": new / steady, "compile_s": first}, default=str))
    return 0


def cmd_inspect(args) -> int:
    from .patterns import CATALOGUE, find_attention, find_ffn

    if args.catalogue:
        for entry in CATALOGUE:
            print(f"{entry.name:24s} {entry.kind:9s} {entry.families}")
        return 0
    model, tokenizer = _load(args)
    graphs = []

    def grab(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=grab)(**_encode(tokenizer, "Hello there", False, args.device), use_cache=False)
    for i, gm in enumerate(graphs):
        attention, attention_misses = find_attention(gm.graph)
        ffns, ffn_misses = find_ffn(gm.graph)
        print(f"graph {i}: {len(gm.graph.nodes)} nodes")
        for site in attention + ffns:
            print(f"  matched   {site.variant:24s} layer {site.layer:3d}  {site.output.name}")
        for miss in attention_misses + ffn_misses:
            print(f"  unmatched {miss.describe()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvpass", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="compile a real model with kvpass, generate, and report")
    _add_model_args(gen)
    gen.add_argument("--prompt", default="Explain in two sentences why the sky is blue.")
    gen.add_argument("--max-new-tokens", type=int, default=48)
    gen.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    gen.add_argument("--inner", choices=["inductor", "aot_eager", "eager"], default="inductor")
    gen.add_argument("--json", action="store_true", help="also print the report as JSON")
    gen.set_defaults(run=cmd_generate)
    ins = sub.add_parser("inspect", help="which subgraphs match which pattern, and why others do not")
    _add_model_args(ins)
    ins.add_argument("--catalogue", action="store_true", help="print the pattern catalogue and exit")
    ins.set_defaults(run=cmd_inspect)
    args = parser.parse_args(argv)
    from ._logging import configure_from_env

    configure_from_env()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
