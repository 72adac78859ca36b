"""The decode engine on the GPU: speed against the fp16 peer measured in the same process. (Its checks, recorded
steps = unrecorded ones bit for bit, tokens = HF greedy, 256 steps without a compile or a re-record, a padded
batch = each row alone, are tests/test_cuda.py.)

--part speed: `random:llama:8b` in bf16, kvpass dense (captured decode) and the peer (kvpass.eval.peer: static KV,
  SDPA, the whole step in one CUDA graph) over the same weights, their steps interleaved (A B A B ...) over a
  random-filled cache; B1 at 4K, 32K, 128K and B8 at 32K (sequential where both caches do not fit together).
  `--chess S [--selective]`: kvpass runs CHESS at sparsity S on its FFNs (thresholds calibrated by kvpass.compile
  on random token ids) beside dense attention; `--wave`: the wave index as its attention (the random fill is
  clustered after the first step, which then records anew); `--antkv BITS`: AnTKV at BITS (codebooks calibrated
  by kvpass.compile on random token ids; the random fill is encoded as it is loaded); the peer stays the dense fp16
  step over the same weights.
  Beside tok/s: the GPU time of one replayed step (the recorded graph replayed back to back) over the wall time of
  a step (GPU-busy fraction), peak GiB, the runtime's KV bytes by part, recordings and compiles.
--part e2e: what a user runs: a real prefill of a random prompt and HF `generate` through kvpass.compile, against
  HF's own SDPA prefill of the same prompt; prefill time, decode tok/s, peak GiB, KV bytes by part (the method
  flags above choose kvpass's configuration here too).
--part compile: the seconds of the kvpass pass against Inductor's over the graphs one generate compiles.

    python benchmarks/decode_engine.py --part speed --out benchmarks/results
    python benchmarks/decode_engine.py --part speed --chess 0.5 --points 1x4096,1x32768 --out benchmarks/results
    python benchmarks/decode_engine.py --part speed --antkv 1 --points 1x32768,1x131072 --out benchmarks/results
    python benchmarks/decode_engine.py --part e2e --out benchmarks/results
    python benchmarks/decode_engine.py --part compile --out benchmarks/results [--model M --device cpu]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

import kvpass
from kvpass.attach import backend_of
from kvpass.eval import bench
from kvpass.eval.records import write_record
from kvpass.models import load_model

DENSE = kvpass.Config(attention=kvpass.Dense())


def _replay_ms(graph) -> float:
    from triton.testing import do_bench

    return do_bench(graph.replay, warmup=10, rep=100, return_mode="median")


def _gpu_ms(name, step, backend) -> float | None:
    """GPU time of one step: its recorded CUDA graph replayed back to back (no host work between replays)."""
    if name == "kvpass":
        recordings = backend.engine.recordings
        return _replay_ms(next(iter(recordings.values())).graph) if recordings else None
    return None if step.peer._graph is None else _replay_ms(step.peer._graph)


def speed(points, steps: int, warmup: int, config: kvpass.Config = DENSE) -> list[dict]:
    model = load_model("random:llama:8b", dtype=torch.bfloat16, device="cuda")[0]
    started = time.perf_counter()
    kvpass.compile(model, config)  # calibration and (CHESS) the in-place weight layout; graphs compile at first call
    compile_call_s = time.perf_counter() - started
    print(f"kvpass.compile call: {compile_call_s:.1f} s", flush=True)
    backend = backend_of(model)
    bandwidth = bench.measured_bandwidth(torch.device("cuda"))
    rows = []
    for batch, context in points:
        try:
            rows.append({**_speed_point(model, backend, bandwidth, batch, context, steps, warmup),
                         "kvpass_compile_call_s": compile_call_s})
        except torch.OutOfMemoryError as error:  # keep the other points' rows: the record says which one failed
            backend.runtime.release()
            torch.cuda.empty_cache()
            rows.append({"batch": batch, "context": context, "error": f"{type(error).__name__}: {error}"[:300]})
            print(f"B{batch} ctx {context}: {rows[-1]['error']}", flush=True)
    return rows


def _speed_point(model, backend, bandwidth, batch: int, context: int, steps: int, warmup: int) -> dict:
    """One (batch, context) row: kvpass and the peer, interleaved where both caches fit together."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    capacity = context + warmup + steps + 1
    weights = bench.step_bytes(model, batch, 0, torch.bfloat16)
    kv_bytes = bench.step_bytes(model, batch, capacity, torch.bfloat16) - weights
    together = 2 * kv_bytes + weights < 0.85 * torch.cuda.mem_get_info()[1]
    graphs_before = len(backend.records)
    row = {"batch": batch, "context": context, "interleaved": together, "bandwidth_Bps": bandwidth,
           "step_bytes_kvpass": bench.step_bytes(model, batch, context, torch.bfloat16),
           "step_bytes_peer": bench.step_bytes(model, batch, capacity, torch.bfloat16)}
    groups = [("kvpass", "peer")] if together else [("kvpass",), ("peer",)]
    for names in groups:
        steppers = {name: bench.decode_stepper(model, name, batch=batch, context=context, capacity=capacity)
                    for name in names}
        times = bench.interleave(steppers, torch.device("cuda"), steps=steps, warmup=warmup)
        for name, seconds in times.items():
            median = statistics.median(seconds)
            gpu_ms = _gpu_ms(name, steppers[name], backend)
            row[name] = {"step_ms": 1e3 * median, "tokens_per_s": batch / median, "gpu_ms_replayed": gpu_ms,
                         "gpu_busy": None if gpu_ms is None else gpu_ms / (1e3 * median),
                         "step_ms_all": [1e3 * t for t in seconds]}
        if "kvpass" in names:
            report = kvpass.report(model)
            row.update(kv_bytes_by_part=report["kv_bytes_by_part"], decode_engine=report["decode_engine"],
                       graphs_compiled=len(backend.records) - graphs_before,
                       compile_seconds=report["compile_seconds"], chess=report.get("chess"))
        for step in steppers.values():
            if hasattr(step, "peer"):
                step.peer.release()
        steppers.clear()
        if "kvpass" in names:
            backend.runtime.release()  # the next cache (the peer's, or the next point's) needs the room
        gc.collect()
        torch.cuda.empty_cache()
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    row["kvpass_over_peer"] = row["kvpass"]["tokens_per_s"] / row["peer"]["tokens_per_s"]
    print(f"B{batch} ctx {context}: kvpass {row['kvpass']['tokens_per_s']:.1f} tok/s ({row['kvpass']['step_ms']:.2f} "
          f"ms, GPU {row['kvpass']['gpu_ms_replayed'] or float('nan'):.2f} ms) | peer "
          f"{row['peer']['tokens_per_s']:.1f} tok/s ({row['peer']['step_ms']:.2f} ms, GPU "
          f"{row['peer']['gpu_ms_replayed'] or float('nan'):.2f} ms) | ratio {row['kvpass_over_peer']:.3f} | "
          f"interleaved {together} | engine {row['decode_engine']} | compiles {row['graphs_compiled']} | peak "
          f"{row['peak_gib']:.1f} GiB | chess {row['chess']}", flush=True)
    return row


def e2e(contexts, new_tokens: int, config: kvpass.Config = DENSE) -> list[dict]:
    model = load_model("random:llama:8b", dtype=torch.bfloat16, device="cuda")[0]
    kvpass.compile(model, config)
    rows = []
    for context in contexts:
        row = bench.generate_against_sdpa(model, context=context, new_tokens=new_tokens)
        report = kvpass.report(model)
        row.update(kv_bytes_by_part=report["kv_bytes_by_part"], kv_bytes_allocated=report["kv_bytes_allocated"],
                   decode_engine=report["decode_engine"], graphs_compiled=report["graphs"],
                   compile_seconds=report["compile_seconds"])
        rows.append(row)
        print(f"e2e ctx {context}: prefill kvpass {row['prefill_s']:.3f} s vs HF SDPA {row['hf_sdpa_prefill_s']:.3f} s "
              f"({row['prefill_fraction_of_sdpa']:.2f}x); decode {row['decode_tokens_per_s']:.1f} tok/s; peak "
              f"{row['peak_gib']:.1f} GiB; engine {report['decode_engine']}", flush=True)
    return rows


def compile_overhead(model_name: str, device: str, prompt: int, new_tokens: int) -> list[dict]:
    """The kvpass pass's seconds over every graph a generate compiles, against the inner compiler's (Inductor's)
    seconds over the same rewritten graphs (Dynamo's tracing, common to both, is not in either). Inductor's FX
    graph cache is off, so each graph is compiled, not looked up."""
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = False
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_model(model_name, dtype=dtype, device=device)[0]
    kvpass.compile(model, DENSE)
    ids = torch.randint(3, 1000, (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    report = kvpass.report(model)
    seconds = report["compile_seconds"]
    row = {"model": model_name, "device": device, "graphs": report["graphs"], **seconds,
           "pass_over_inner": seconds["kvpass_pass"] / seconds["inner"],
           "per_graph": [{"nodes": r.nodes, "kvpass_pass_s": r.rewrite_seconds, "inner_s": r.inner_compile_seconds}
                         for r in backend_of(model).records]}
    print(f"compile {model_name} on {device}: {report['graphs']} graphs; kvpass pass {seconds['kvpass_pass']:.2f} s, "
          f"Inductor {seconds['inner']:.2f} s: the pass adds {100 * row['pass_over_inner']:.1f} %", flush=True)
    return [row]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("speed", "e2e", "compile"), required=True)
    parser.add_argument("--model", default="random:llama:8b", help="--part compile: the model")
    parser.add_argument("--device", default="cuda", help="--part compile: the device")
    parser.add_argument("--out", default=None, help="folder for the JSON record")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--points", default="1x4096,1x32768,1x131072,8x32768", help="BxCONTEXT,...")
    parser.add_argument("--contexts", default="4096,32768", help="e2e prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--chess", type=float, default=None, metavar="S", help="--part speed: CHESS FFNs at sparsity S")
    parser.add_argument("--selective", action="store_true", help="with --chess: CHESS+ (selective projections)")
    parser.add_argument("--wave", action="store_true", help="--part speed: the wave index (device mode, its defaults) "
                        "as kvpass's attention; the filled context is indexed after the first step")
    parser.add_argument("--antkv", type=float, default=None, metavar="BITS",
                        help="AnTKV at BITS as kvpass's attention (codebooks calibrated on random token ids)")
    parser.add_argument("--prompt-scoring", choices=kvpass.config.ANTKV_PROMPT_SCORING, default="all",
                        help="with --antkv: which prompt queries score a prompt token (AnTKV.prompt_scoring)")
    args = parser.parse_args(argv)
    if args.wave and args.antkv is not None:
        parser.error("--wave and --antkv each choose kvpass's attention: give one")
    attention = (kvpass.WaveIndex() if args.wave
                 else kvpass.AnTKV(bits=args.antkv, prompt_scoring=args.prompt_scoring) if args.antkv is not None
                 else kvpass.Dense())
    config = kvpass.Config(attention=attention,
                           ffn=None if args.chess is None else kvpass.Chess(sparsity=args.chess,
                                                                            selective=args.selective))
    if args.part == "speed":
        points = [tuple(int(x) for x in p.split("x")) for p in args.points.split(",")]
        result = speed(points, args.steps, args.warmup, config)
    elif args.part == "e2e":
        result = e2e([int(c) for c in args.contexts.split(",")], args.new_tokens, config)
    else:
        result = compile_overhead(args.model, args.device, prompt=128, new_tokens=8)
    if args.out:
        model = args.model if args.part == "compile" else "random:llama:8b"
        dtype = "float32" if args.part == "compile" and args.device != "cuda" else "bfloat16"
        path = write_record(args.out, f"bench decode-engine-{args.part}", result, config=config.to_dict(),
                            model=model, dtype=dtype, args=vars(args))
        print("record:", path)


if __name__ == "__main__":
    main()
