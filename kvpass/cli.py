"""The `kvpass` command line: `generate` (the main job), `inspect` (what matched and why), `eval ppl`,
`eval passkey`, `bench decode` and `plot` (every eval/bench command writes a JSON record under --out).

A mistake in what the user asked for (a flag out of range, an unknown name, a missing or unreadable file, a model
whose packages are missing) is one line, `kvpass: error: ...`, and exit status 2 (`main`); the commands check their
flags, names and files before loading a model. `KVPASS_LOGS=debug` shows the traceback instead."""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
import traceback

import torch

from .calibration import DEFAULT_SEQLEN, DEFAULT_TOKENS
from .config import (
    ANCHOR_SCORES,
    ANTKV_KEY_METRICS,
    ANTKV_KEYS,
    ANTKV_PROMPT_SCORING,
    CHESS_RULES,
    KIVI,
    WAVE_SCORING,
    WAVE_SEARCH,
    AnTKV,
    Chess,
    Config,
    Dense,
    DenseFFN,
    WaveIndex,
)
from .models import ROPE_SCALINGS, parse_rope_scaling

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _attention_method(args, bits=None):
    """The KV-cache method the flags describe, at `bits` (default: --bits, else the method's default); a bad
    value raises the config's ValueError, which main shows as one line."""
    bits = bits if bits is not None else args.bits
    bits = {"antkv": 1.0, "kivi": 2}.get(args.attention) if bits is None else bits
    if args.attention == "antkv":
        return AnTKV(bits=bits, anchor_ratio=args.anchor_ratio, window=args.window, score=args.score, keys=args.keys,
                     value_bits=args.value_bits, key_metric=args.key_metric, prompt_scoring=args.prompt_scoring)
    if args.attention == "kivi":
        return KIVI(bits=int(bits), group=args.group, residual=args.window)
    if args.attention == "wave":
        return WaveIndex(retrieval=args.retrieval, estimation=args.estimation, min_context=args.min_context,
                         recent=args.recent, scoring=args.scoring, search=args.search, offload=args.offload,
                         buffer=args.buffer)
    return Dense(dtype=args.kv_dtype)


def _ffn_method(args, sparsity=None):
    """The FFN method the flags describe (None: FFN sites left to Inductor), CHESS at `sparsity` (default
    --sparsity)."""
    if args.ffn == "chess":
        return Chess(sparsity=args.sparsity if sparsity is None else sparsity, selective=args.selective,
                     rule=args.rule)
    return DenseFFN() if args.ffn == "dense" else None


def _config(args) -> Config:
    """The flags' config, validated; a --calibration artefact is read once here, so a missing, truncated or foreign
    file is refused before the model loads (the backend would otherwise meet it inside the first compile)."""
    from .calibration.artefact import Calibration

    config = Config(attention=_attention_method(args), ffn=_ffn_method(args), calibration=args.calibration)
    if config.calibration is not None:
        Calibration.load(config.calibration)
    return config


def _method_name(config: Config) -> str:
    m = config.attention
    name = {"antkv": lambda: (f"antkv-{m.bits:g}bit" + ("" if m.value_bits is None else f"-v{m.value_bits:g}bit")
                              + f"-{m.anchor_ratio:g}anchors"      # defaults unnamed
                              + ("" if m.score == "bound" else f"-{m.score}")
                              + ("" if m.keys == "pre-rope" else f"-{m.keys}")
                              + ("" if m.key_metric == "euclidean" else f"-{m.key_metric}-metric")
                              + ("" if m.prompt_scoring == "all" else f"-{m.prompt_scoring}-scored")),
            "kivi": lambda: f"kivi-{m.bits}bit",
            "wave": lambda: (f"wave-{m.retrieval:g}r-{m.estimation:g}e"
                             + ("" if m.recent == WaveIndex().recent else f"-{m.recent}recent")
                             + ("" if m.scoring == "centroid" else f"-{m.scoring}")
                             + ("" if m.search == "scan" else f"-{m.search}")
                             + ("-offload" if m.offload else ""))}.get(m.method, lambda: m.method)()
    f = config.ffn
    if f is not None and f.method == "chess":
        return name + f"+{f.rule}-{f.sparsity:g}" + ("-selective" if f.selective else "")
    return name + ("" if f is None else f"+ffn-{f.method}")


def _check_calibration_text(config: Config, evaluation) -> None:
    """Never calibrate on the evaluation text: the automatic calibration uses the default calibration text, an
    artefact names its own."""
    from .calibration import needs_calibration
    from .calibration.artefact import Calibration
    from .eval.texts import DEFAULT_CALIBRATION, check_distinct

    if not (needs_calibration(config.attention) or needs_calibration(config.ffn)):
        return
    text = DEFAULT_CALIBRATION if config.calibration is None else Calibration.load(config.calibration).meta["text"]
    if isinstance(text, dict) and text.get("sha256") is None:
        return  # random token ids
    check_distinct(text["name"] if isinstance(text, dict) else text, evaluation)


def _compiled_runs(model, config: Config, inner: str):
    """Compile `model` with the dense reference, then with `config` if it differs; yield each run's name
    while the model is compiled for it (accuracy commands always report the dense path beside a method)."""
    from .attach import compile as compile_model
    from .attach import detach

    runs = [("dense", Config())] + ([(_method_name(config), config)] if config != Config() else [])
    for name, cfg in runs:
        compile_model(model, cfg, inner=inner)
        try:
            yield name
        finally:
            detach(model)
            torch._dynamo.reset()


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="registry name or local HF directory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="model weights dtype")
    parser.add_argument("--kv-dtype", choices=sorted(_DTYPES), default=None, help="KV cache storage dtype")
    parser.add_argument("--ffn", choices=["none", "dense", "chess"], default="none",
                        help="FFN method (none: Inductor keeps it; chess: calibrated activation sparsity)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="chess: fraction of FFN activations zeroed")
    parser.add_argument("--selective", action="store_true", help="chess: also sparsify query/output projection "
                                                                 "inputs (CHESS+)")
    parser.add_argument("--rule", choices=CHESS_RULES, default="chess", help="chess: per-channel thresholds (chess) "
                                                                           "or one per layer (cats)")
    parser.add_argument("--attention", choices=["dense", "antkv", "kivi", "wave"], default="dense",
                        help="KV-cache method")
    parser.add_argument("--bits", type=float, default=None, help="antkv: bits/value (4, 3, 2, 1.5, 1, 0.75, 0.5, "
                                                                  "0.375; default 1); kivi: 2, 4 or 8 (default 2)")
    parser.add_argument("--value-bits", type=float, default=None, help="antkv: the values' rate when it differs from "
                                                                       "--bits (then the keys' rate)")
    parser.add_argument("--key-metric", choices=ANTKV_KEY_METRICS, default="query",
                        help="antkv: key codebooks minimize the expected score error (query) or |error|^2 (euclidean)")
    parser.add_argument("--anchor-ratio", type=float, default=0.01, help="antkv: fraction of tokens kept exact")
    parser.add_argument("--window", type=int, default=32, help="antkv/kivi: newest tokens kept exact")
    parser.add_argument("--score", choices=ANCHOR_SCORES, default="bound", help="antkv: Anchor Score candidate")
    parser.add_argument("--keys", choices=ANTKV_KEYS, default="pre-rope", help="antkv: key codebooks before or "
                                                                               "after RoPE")
    parser.add_argument("--prompt-scoring", choices=ANTKV_PROMPT_SCORING, default="all",
                        help="antkv: a prompt token is scored by all later prompt queries, or by the --window queries "
                             "from its own slot on (as generated tokens; linear-time prefill)")
    parser.add_argument("--group", type=int, default=32, help="kivi: tokens per key scale")
    wave = WaveIndex()
    parser.add_argument("--retrieval", type=float, default=wave.retrieval, help="wave: share of clusters attended "
                                                                                "exactly")
    parser.add_argument("--estimation", type=float, default=wave.estimation, help="wave: share of clusters estimated "
                                                                                  "by their centroid")
    parser.add_argument("--min-context", type=int, default=wave.min_context, help="wave: tokens before the index is "
                                                                                  "built")
    parser.add_argument("--recent", type=int, default=wave.recent, help="wave: newest prompt tokens kept exact in the "
                                                                        "steady zone")
    parser.add_argument("--scoring", choices=WAVE_SCORING, default=wave.scoring, help="wave: how clusters are scored")
    parser.add_argument("--search", choices=WAVE_SEARCH, default=wave.search, help="wave: scan every centroid, or "
                                                                                 "search the prompt queries' graph")
    parser.add_argument("--offload", action="store_true", help="wave: clustered K/V in CPU memory, GPU wave buffer")
    parser.add_argument("--buffer", type=float, default=wave.buffer, help="wave (offload): share of indexed tokens "
                                                                          "cached on the GPU")
    parser.add_argument("--calibration", default=None, help="calibration artefact (default: calibrate "
                                                            "automatically on the default text, cached)")
    parser.add_argument("--rope-scaling", default=None, metavar="TYPE:FACTOR",
                        help="run the model past its trained positions, e.g. yarn:4 (types: "
                             f"{', '.join(ROPE_SCALINGS)})")


def _check_device(device: str) -> None:
    """Refuse a device this machine does not have before loading anything (torch fails only later, deep in the first
    move to it)."""
    try:
        kind = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device {device}: {error}") from None
    if kind.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"--device {device}: {why} (torch {torch.__version__}); use --device cpu")
    if kind.type == "cuda" and (kind.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s); use --device "
                         f"cuda:0")


def _load(args):
    from .models import load_model

    _check_device(args.device)
    scaling = None if args.rope_scaling is None else parse_rope_scaling(args.rope_scaling)
    return load_model(args.model, dtype=_DTYPES[args.dtype], device=args.device, rope_scaling=scaling)


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

    _positive("--max-new-tokens", args.max_new_tokens)
    if not args.prompt:
        raise ValueError("--prompt is empty: give the model some text to continue, e.g. --prompt 'The sky is blue "
                         "because'")
    if args.model.startswith("random:"):  # refused before building weights it could not use
        raise ValueError(f"--model {args.model} has no tokenizer (random weights are for speed runs: kvpass bench "
                         f"decode); generate needs a real model such as smollm2-135m")
    config = _config(args)
    model, tokenizer = _load(args)
    compile_model(model, config, inner=args.inner)
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

    # The first call traces and compiles the prefill and decode graphs, silently: say so before it starts.
    print(f"compiling {args.model} with kvpass (first call" + ("; ~1-3 min on a CPU" if model.device.type == "cpu"
                                                              else "") + ")...", file=sys.stderr, flush=True)
    out, first = timed()   # includes tracing and compiling the prefill and decode graphs
    out, steady = timed()  # the same generation on the compiled graphs
    new = out.shape[1] - prompt_len
    rep = report(model)
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {args.dtype}, "
          f"{args.device}); kvpass {json.dumps(config.to_dict()['attention'])}, inner={args.inner}")
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


def cmd_calibrate(args) -> int:
    from .calibration import calibrate

    if args.attention is None:  # `kvpass calibrate` alone calibrates AnTKV, as it always has
        args.attention = "dense" if args.ffn == "chess" else "antkv"
    methods = []                # one model run per calibrator for all its settings
    if args.attention == "antkv":
        methods += [_attention_method(args, bits) for bits in args.bits or [None]]
    if args.attention == "wave" and args.scoring == "pre-rope":
        methods.append(_attention_method(args))
    if args.ffn == "chess":
        methods += [_ffn_method(args, sparsity) for sparsity in args.sparsity]
    if not methods:
        raise ValueError(f"--attention {args.attention} --ffn {args.ffn} needs no calibration "
                         f"(--attention antkv, --attention wave --scoring pre-rope and --ffn chess do)")
    if args.text is not None:
        from .eval.texts import load_text

        load_text(args.text)  # an unknown name is refused before the model loads
    model, tokenizer = _load(args)
    start = time.perf_counter()
    calibration = calibrate(model, methods, tokenizer=tokenizer, text=args.text, tokens=args.tokens,
                            seqlen=args.seqlen)
    path = calibration.save(args.out)
    shapes = {name: tuple(t.shape) for name, t in list(calibration.tensors.items())[:2]}
    print(f"calibrated {list(calibration.meta['sections'])} for {args.model} on {calibration.meta['text']['name']} "
          f"({calibration.meta['text']['tokens']} tokens) in {time.perf_counter() - start:.0f} s; e.g. {shapes}")
    print(f"artefact: {path} (+ {path.with_suffix('.json').name})")
    return 0


def cmd_inspect(args) -> int:
    from .patterns.matchers import CATALOGUE, find_attention, find_ffn

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


def _positive(name: str, values) -> None:
    for value in values if isinstance(values, (list, tuple)) else [values]:
        if value < 1:
            raise ValueError(f"{name}={value}: must be at least 1")


def cmd_eval_ppl(args) -> int:
    from .eval.lengths import check_length
    from .eval.ppl import perplexity, text_windows
    from .eval.records import write_record
    from .eval.texts import load_text

    _positive("--seqlen", args.seqlen)
    _positive("--max-windows", args.max_windows)
    config = _config(args)
    text = load_text(args.text)
    _check_calibration_text(config, text)
    model, tokenizer = _load(args)
    check_length(model, args.seqlen, "--seqlen")
    batches, text = text_windows(tokenizer, text, args.seqlen, args.max_windows)
    results = []
    for name in _compiled_runs(model, config, args.inner):
        row = perplexity(model, batches, decode_tail=args.decode_tail)
        results.append({"name": name, **row, "windows": batches.shape[0], "seqlen": args.seqlen,
                        "text": text.name, "text_sha256": text.sha256})
        reads = row.get("decode_reads")
        print(f"{name:24s} ppl {row['ppl']:9.4f}  ({row['tokens']} tokens, {row['mode']}, {row['seconds']:.1f} s)"
              + ("" if reads is None else "; decode read " + ", ".join(f"{k} {100 * v:.2f} %"
                                                                       for k, v in reads.items())))
    for row in results[1:]:
        row["ratio_to_dense"] = row["ppl"] / results[0]["ppl"]
        print(f"{row['name']}: {row['ratio_to_dense']:.4f} x dense perplexity")
    for note in _decode_only_notes(config.attention, args.seqlen, args.decode_tail):
        print(f"note: {note}")
    path = write_record(args.out, "eval ppl", results, config=config.to_dict(), model=args.model,
                        rope_scaling=args.rope_scaling,
                        protocol={"tokenization": "whole text, no special tokens", "windows": "non-overlapping",
                                  "decode_tail": args.decode_tail}, text_source=text.source)
    print(f"record: {path}")
    return 0


def _decode_only_notes(method, seqlen: int, decode_tail: int) -> list[str]:
    """What a perplexity run could not show of a method that acts only in decode (the wave index: prompts attend
    exactly), so that a ratio of 1.0000 is not read as "no loss"."""
    if method.method != "wave":
        return []
    notes = []
    if not decode_tail:
        notes.append("the wave index acts only in decode (prompts attend exactly), so prefill perplexity is dense's; "
                     "use --decode-tail N (e.g. 128) to score the last N tokens of each window through decode")
    # A window's sequence holds at most seqlen - 1 tokens (the last is only a target); the index is built after the
    # step that reaches min_context and first read by the next one (measured: read at seqlen = min_context + 2).
    if seqlen - 1 <= method.min_context:
        notes.append(f"the wave index never engages in {seqlen}-token windows (min_context={method.min_context}: "
                     f"shorter sequences attend exactly); use --seqlen above {method.min_context + 1} or a smaller "
                     f"--min-context")
    return notes


def cmd_eval_passkey(args) -> int:
    from .eval.passkey import heatmap, run_passkey
    from .eval.records import write_record
    from .eval.texts import load_text

    config = _config(args)
    haystack = None if args.task == "passkey" else load_text(args.haystack).text
    model, tokenizer = _load(args)
    results = []
    for name in _compiled_runs(model, config, args.inner):
        rows = run_passkey(model, tokenizer, lengths=args.lengths, depths=args.depths, trials=args.trials,
                           haystack=haystack, seed=args.seed)
        results += [{"name": name, **row} for row in rows]
        for row in rows:
            print(f"{name:16s} length {row['length']:6d} depth {row['depth']:.2f}: success {row['success']:.2f}")
    path = write_record(args.out, "eval passkey", results, config=config.to_dict(), model=args.model, task=args.task,
                        rope_scaling=args.rope_scaling)
    png = heatmap(results, path.with_suffix(".png"), title=f"{args.model}: {args.task}")
    print(f"record: {path}\nheat map: {png}")
    return 0


def cmd_bench_decode(args) -> int:
    from .eval import bench
    from .eval.lengths import check_length
    from .eval.records import write_record

    _positive("--batch", args.batch)
    _positive("--context", args.context)
    _positive("--steps", args.steps)
    if args.generate < 0 or args.generate == 1:
        raise ValueError(f"--generate {args.generate}: decode speed needs at least 2 new tokens (the first comes from the prefill); "
                         "use --generate 2 or more, or 0 to skip")
    config = _config(args)
    model, _ = _load(args)
    check_length(model, max(args.context) + args.steps + 8, "--context + steps")
    device = next(model.parameters()).device
    bandwidth = bench.measured_bandwidth(device)
    kv_dtype = getattr(config.attention, "torch_dtype", None) or next(model.parameters()).dtype
    print(f"{args.model} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; "
          f"device copy {bandwidth / 1e9:.0f} GB/s; kvpass {json.dumps(config.to_dict()['attention'])}")
    # kvpass and the peer run together, their steps interleaved (the peer reuses the model's modules, not its
    # compiled call); HF's paths each prepare the model their own way, so they run alone.
    together = [p for p in ("kvpass", "peer") if p in args.paths]
    groups = ([together] if together else []) + [[p] for p in args.paths if p not in together]
    results = []
    for paths in groups:
        undo = bench.prepare(model, paths[0], config, cudagraphs=args.cudagraphs, inner=args.inner)
        try:
            for batch in args.batch:
                for context in args.context:
                    try:
                        rows = bench.interleaved_paths(model, paths, batch=batch, context=context, steps=args.steps)
                        if "kvpass" in rows:
                            rows["kvpass"].update(_kvpass_state(model))
                            if context <= args.prefill_max:
                                rows["kvpass"].update(bench.prefill_point(model, batch=batch, context=context))
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        for path in paths:
                            results.append({"path": path, "batch": batch, "context": context, "error": "out of memory"})
                            print(f"{path:14s} B{batch:<3d} ctx {context:>7d}: out of memory")
                        continue
                    for row in rows.values():
                        bytes_per_step = bench.step_bytes(model, batch, context, kv_dtype)
                        row.update({"bytes_per_step": bytes_per_step,
                                    "roofline_tokens_per_s": batch * bandwidth / bytes_per_step})
                        if "peer" in rows and row["path"] != "peer":
                            row["over_peer"] = row["tokens_per_s"] / rows["peer"]["tokens_per_s"]
                        results.append(row)
                        print(bench.format_row(row, bytes_per_step, bandwidth) + (
                            f"; prefill {row['prefill_tokens_per_s']:.0f} tok/s" if "prefill_tokens_per_s" in row
                            else "") + (f"; {row['over_peer']:.3f}x peer" if "over_peer" in row else ""))
                    if "kvpass" in rows and args.generate and batch == 1:
                        results.append(_generate_row(model, context, args.generate))
        finally:
            undo()
    path = write_record(args.out, "bench decode", results, config=config.to_dict(), model=args.model,
                        dtype=args.dtype, bandwidth_bytes_per_s=bandwidth, cudagraphs=args.cudagraphs,
                        steps=args.steps)
    print(f"record: {path}")
    return 0


def _generate_row(model, context: int, new_tokens: int) -> dict:
    """What a user runs through the kvpass-compiled model (kvpass.eval.bench.generate_against_sdpa), with the kvpass
    state after it; printed as it comes."""
    from .eval import bench

    row = {"path": "kvpass-generate", "batch": 1, **bench.generate_against_sdpa(model, context=context,
                                                                                new_tokens=new_tokens)}
    row.update(_kvpass_state(model))
    print(f"{row['path']:14s} B1   ctx {context:>7d}: prefill {row['prefill_s']:.3f} s "
          f"({row['prefill_fraction_of_sdpa']:.2f}x HF SDPA's speed), decode {row['decode_tokens_per_s']:.1f} tok/s "
          f"over {new_tokens} tokens" + ("" if row["peak_gib"] is None else f", peak {row['peak_gib']:.1f} GiB"))
    return row


def _kvpass_state(model) -> dict:
    """The kvpass row's extras: bytes held by part and allocated, graphs compiled, the decode engine's counts."""
    from .report import report

    state = report(model)
    return {key: state[key] for key in ("kv_bytes_by_part", "kv_bytes_allocated", "graphs", "decode_engine")
            if key in state}


def cmd_export(args) -> int:
    """Export the model under the flags' config: FILE.pt2 (kvpass.export, + FILE.json) or FILE.onnx
    (kvpass.portable_onnx); then load the file back and generate from the prompt with it, as its user would."""
    from . import portable, portable_onnx

    config = _config(args)
    model, tokenizer = _load(args)
    onnx = str(args.out).endswith(".onnx")
    start = time.perf_counter()
    if onnx:
        from . import export_onnx   # the package's: it resolves the calibration AnTKV's model carries

        path = export_onnx(model, args.out, config, cache_len=args.max_cache_len)
        written = f"{path}"
    else:
        from . import export   # the package's: it resolves the calibration AnTKV's program carries

        program = export(model, config, max_batch=args.max_batch, max_cache_len=args.max_cache_len)
        path, meta = portable.save(program, args.out, config=config, model_name=args.model)
        written = f"{path} and {meta}"
    print(f"wrote {written} ({path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    if tokenizer is not None and args.max_new_tokens > 0:
        ids = _encode(tokenizer, args.prompt, False, "cpu" if onnx else args.device)
        prompt, mask = ids["input_ids"], ids.get("attention_mask")
        if onnx:
            out = portable_onnx.generate(path, prompt, mask, max_new_tokens=args.max_new_tokens,
                                         cache_len=args.max_cache_len)
        else:
            out = portable.generate(torch.export.load(path), prompt, mask, max_new_tokens=args.max_new_tokens)
        runner = ("onnx's reference evaluator with kvpass's op" if isinstance(config.attention, AnTKV)
                  else "onnxruntime") if onnx else "torch.export.load"
        print(f"loaded back ({runner}), greedy:",
              tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True))
    return 0


def cmd_plot(args) -> int:
    from .eval.plot import plot_records
    from .eval.records import load_records

    for path in plot_records(load_records(args.records), args.out):
        print(path)
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
    cal = sub.add_parser("calibrate", help="learn a method's calibration (AnTKV codebooks, CHESS thresholds, pre-RoPE "
                                           "wave codes' query moments) into "
                                           "an artefact", conflict_handler="resolve")  # --bits takes several rates
    _add_model_args(cal)
    cal.set_defaults(attention=None, run=cmd_calibrate)
    cal.add_argument("--bits", type=float, nargs="+", default=None, help="antkv: one or more rates (one section "
                                                                        "each)")
    cal.add_argument("--sparsity", type=float, nargs="+", default=[0.5],
                     help="chess: one or more sparsities (one section each)")
    cal.add_argument("--text", default=None, help="calibration text (default: the default calibration text)")
    cal.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="calibration tokens")
    cal.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN, help="tokens per calibration window")
    cal.add_argument("--out", required=True, help="artefact path (.safetensors; metadata also as .json)")
    ins = sub.add_parser("inspect", help="which subgraphs match which pattern, and why others do not")
    _add_model_args(ins)
    ins.add_argument("--catalogue", action="store_true", help="print the pattern catalogue and exit")
    ins.set_defaults(run=cmd_inspect)
    ev = sub.add_parser("eval", help="accuracy: perplexity or passkey/needle, method vs dense").add_subparsers(
        dest="what", required=True)
    ppl = ev.add_parser("ppl", help="perplexity (GPTQ protocol; --decode-tail for decode mode)")
    _add_model_args(ppl)
    ppl.add_argument("--text", default="enwiki", help="registry name or a .txt file")
    ppl.add_argument("--seqlen", type=int, default=1024)
    ppl.add_argument("--max-windows", type=int, default=4)
    ppl.add_argument("--decode-tail", type=int, default=0, help="teacher-force the last N tokens through decode")
    ppl.add_argument("--inner", choices=["inductor", "aot_eager", "eager"], default="aot_eager")
    ppl.add_argument("--out", default="runs/eval")
    ppl.set_defaults(run=cmd_eval_ppl)
    pk = ev.add_parser("passkey", help="passkey (filler) or needle (essay haystack) retrieval")
    _add_model_args(pk)
    pk.add_argument("--task", choices=["passkey", "needle"], default="passkey")
    pk.add_argument("--haystack", default="pg-essays", help="text for --task needle")
    pk.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    pk.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    pk.add_argument("--trials", type=int, default=2)
    pk.add_argument("--seed", type=int, default=0)
    pk.add_argument("--inner", choices=["inductor", "aot_eager", "eager"], default="aot_eager")
    pk.add_argument("--out", default="runs/eval")
    pk.set_defaults(run=cmd_eval_passkey)
    be = sub.add_parser("bench", help="speed and memory").add_subparsers(dest="what", required=True)
    dec = be.add_parser("decode", help="decode (and prefill) tokens/s and peak memory vs the fp16 peer (and HF)")
    _add_model_args(dec)
    dec.set_defaults(model="random:smollm2:135m", run=cmd_bench_decode)
    dec.add_argument("--batch", type=int, nargs="+", default=[1])
    dec.add_argument("--context", type=int, nargs="+", default=[256, 1024])
    dec.add_argument("--steps", type=int, default=10)
    dec.add_argument("--paths", nargs="+", choices=["kvpass", "peer", "hf-eager", "hf-static"],
                     default=["kvpass", "peer"], help="kvpass and peer (the gpt-fast-style fp16 step, "
                                                      "kvpass.eval.peer) run interleaved")
    dec.add_argument("--cudagraphs", action="store_true", help="CUDA graphs (kvpass: between its ops; HF static: "
                                                               "reduce-overhead)")
    dec.add_argument("--prefill-max", type=int, default=8192, help="also time a prefill at contexts up to this")
    dec.add_argument("--generate", type=int, default=0, metavar="N",
                     help="also time what a user runs (kvpass path, batch 1): a random prompt of each context "
                          "prefilled and N tokens generated through HF generate, beside HF's own SDPA prefill")
    dec.add_argument("--inner", choices=["inductor", "aot_eager", "eager"], default="inductor",
                     help="compiler behind kvpass and hf-static")
    dec.add_argument("--out", default="runs/bench")
    ex = sub.add_parser("export", help="a portable program: torch.export .pt2 (+ .json) that carries its KV cache, "
                                       "or .onnx for onnxruntime")
    _add_model_args(ex)
    ex.add_argument("--out", required=True, help="FILE.pt2 (metadata beside it as .json) or FILE.onnx")
    ex.add_argument("--max-batch", type=int, default=1, help=".pt2: rows the program's cache holds")
    ex.add_argument("--max-cache-len", type=int, default=2048, help="tokens per row the .pt2 program's cache holds "
                                                                    "(.onnx: the cache generating back uses)")
    ex.add_argument("--prompt", default="The capital of France is", help="generated from after loading the file")
    ex.add_argument("--max-new-tokens", type=int, default=16, help="0: do not load back and generate")
    ex.set_defaults(run=cmd_export)
    pl = sub.add_parser("plot", help="PNGs from JSON records")
    pl.add_argument("records", nargs="+", help="record files or folders")
    pl.add_argument("--out", default="runs/plots")
    pl.set_defaults(run=cmd_plot)
    args = parser.parse_args(argv)
    from ._logging import configure_from_env

    try:
        configure_from_env()
        return args.run(args)
    except (ValueError, ImportError) as error:
        if not _for_the_user(error) or os.environ.get("KVPASS_LOGS", "").strip().lower() == "debug":
            raise
        print(f"kvpass: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


def _for_the_user(error: BaseException) -> bool:
    """Whether `error` is a message for the user rather than a bug: a ValueError that kvpass's own code raised (its
    convention for a bad value: the message names it and the fix; a ValueError from inside torch or transformers
    stays a traceback), or a missing package of a registry model or text (the message gives the pip command)."""
    from .eval.texts import TextNotInstalledError
    from .models import ModelNotInstalledError

    if isinstance(error, (ModelNotInstalledError, TextNotInstalledError)):
        return True
    frames = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(error.__traceback__)]
    return (isinstance(error, ValueError) and bool(frames)
            and pathlib.Path(frames[-1]).resolve().is_relative_to(_PACKAGE))


_PACKAGE = pathlib.Path(__file__).resolve().parent


if __name__ == "__main__":
    sys.exit(main())
