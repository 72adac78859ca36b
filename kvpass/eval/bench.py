"""Decode (and prefill) throughput and memory, gpt-fast style, for kvpass and HF's own paths in one process.

Decode is measured at a context of `context` tokens without paying for a prefill that long: each path's
cache is filled with random K/V of the right shape (decode speed does not depend on the values), then
`steps` single-token steps are timed one by one (host clock after a device synchronize) and the median
is reported. Paths:
  kvpass-<method>: the model compiled with kvpass (optionally CUDA graphs between the kvpass ops)
  hf-eager:        HF DynamicCache, uncompiled
  hf-static:       HF StaticCache + torch.compile(mode="reduce-overhead") of the forward
  peer:            the gpt-fast-style fp16 step over the same weights (kvpass.eval.peer), one CUDA graph
Beside each: tokens/s, achieved GB/s (bytes one step must read / step time), % of the roofline (the
same bytes over the measured device-copy bandwidth) and peak memory.

A host-bound step's time follows the CPU's speed, which drifts within one process: to compare configurations,
`interleaved_decode` takes their steps in turn on one model copy each.
"""
from __future__ import annotations

import statistics
import time

import torch

PATHS = ("kvpass", "peer", "hf-eager", "hf-static")


def measured_bandwidth(device) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read and written (the HBM ceiling)."""
    if device.type != "cuda":
        return float("nan")
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def graph_time_ms(fn, rep: int = 100) -> float:
    """Mean ms of `fn` (no arguments) replayed from a CUDA graph, captured after three warm-up calls on a side
    stream: the GPU time of what fn launches, without its host-side launch cost."""
    from triton.testing import do_bench

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=25, rep=rep)


def _kv_geometry(model) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the model's KV cache."""
    cfg = model.config.get_text_config(decoder=True)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return cfg.num_hidden_layers, kv_heads, head_dim


def step_bytes(model, batch: int, context: int, kv_dtype: torch.dtype) -> int:
    """Fewest bytes one decode step reads: every weight once (the input embedding only for `batch` rows,
    unless tied to the LM head) plus every cached key and value."""
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embedding
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if not tied:
        weights -= embedding.numel() * embedding.element_size()
    layers, kv_heads, head_dim = _kv_geometry(model)
    kv = 2 * layers * batch * kv_heads * context * head_dim * torch.finfo(kv_dtype).bits // 8
    return weights + kv


def _random_kv(model, batch: int, context: int, generator: torch.Generator):
    """Per-layer (k, v) of shape (batch, kv heads, context, head dim) in the model's dtype and device."""
    param = next(model.parameters())
    layers, kv_heads, head_dim = _kv_geometry(model)
    shape = (batch, kv_heads, context, head_dim)
    for _ in range(layers):
        k = torch.randn(shape, generator=generator, device=param.device, dtype=torch.float32).to(param.dtype)
        v = torch.randn(shape, generator=generator, device=param.device, dtype=torch.float32).to(param.dtype)
        yield k, v


def _fill_hf_cache(cache, model, batch, context, generator) -> None:
    positions = torch.arange(context, device=next(model.parameters()).device)
    for layer, (k, v) in enumerate(_random_kv(model, batch, context, generator)):
        cache.update(k, v, layer, {"cache_position": positions})


def _fill_kvpass_cache(cache, model, batch, context, generator) -> None:
    """Put random K/V straight into the runtime stores (in the form decode reads: AnTKV encodes them) and advance
    HF's counters to match."""
    for layer, (k, v) in enumerate(_random_kv(model, batch, context, generator)):
        cache.runtime.load(layer, k, v)
        cache.layers[layer].seen = context


def _random_prompt(model, batch: int, context: int, seed: int) -> torch.Tensor:
    """(batch, context) random token ids on the model's device."""
    device = next(model.parameters()).device
    vocab = model.config.get_text_config(decoder=True).vocab_size
    return torch.randint(0, vocab, (batch, context), device=device,
                         generator=torch.Generator(device=device).manual_seed(seed))


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_stepper(model, path: str, *, batch: int, context: int, capacity: int, seed: int = 0):
    """A function that runs one decode step of `model` (already prepared for `path`, see prepare()) per call:
    `batch` rows over a cache random-filled with `context` tokens (room for `capacity` in all), the same random
    token each step, positions context, context + 1, ... Returns the step's logits."""
    from transformers import DynamicCache, StaticCache

    from ..cache import KVCache, cache_argument

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    if path == "peer":
        from .peer import PeerDecoder

        peer = PeerDecoder(model, batch=batch, capacity=capacity)
        peer.fill(context, generator)
        peer_token = torch.randint(0, vocab, (batch, 1), device=device, generator=generator)

        def step():
            return peer.step(peer_token)

        step.peer = peer  # its recorded CUDA graph, for the GPU time of one step
        return step
    if path == "kvpass":
        cache = KVCache(model, capacity=capacity)
        _fill_kvpass_cache(cache, model, batch, context, generator)
    elif path == "hf-eager":
        cache = DynamicCache(config=model.config)
        _fill_hf_cache(cache, model, batch, context, generator)
    else:
        cache = StaticCache(config=model.config, max_cache_len=capacity)
        _fill_hf_cache(cache, model, batch, context, generator)
    token = torch.randint(0, vocab, (batch, 1), device=device, generator=generator)
    position = [context]

    @torch.no_grad()
    def step():
        pos = torch.full((batch, 1), position[0], device=device, dtype=torch.long)
        position[0] += 1
        return model(input_ids=token, position_ids=pos, use_cache=True, **{cache_argument(model): cache}).logits

    return step


def timed_step(step, device) -> float:
    """Seconds of one step, host clock between device synchronizations."""
    _synchronize(device)
    start = time.perf_counter()
    step()
    _synchronize(device)
    return time.perf_counter() - start


def decode_point(model, path: str, *, batch: int, context: int, steps: int, warmup: int = 8,
                 seed: int = 0) -> dict:
    """Time `steps` decode steps at `context` for one path of an already prepared model (see prepare())."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step = decode_stepper(model, path, batch=batch, context=context, capacity=context + warmup + steps + 1,
                          seed=seed)
    # the warm-up compiles (and lets Triton specialise on the positions' divisibility): no compile is timed
    seconds = statistics.median(interleave({path: step}, device, steps=steps, warmup=warmup)[path])
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"path": path, "batch": batch, "context": context, "step_ms": seconds * 1e3,
            "tokens_per_s": batch / seconds, "peak_gib": None if peak is None else peak / 2**30}


def interleave(steppers: dict, device, *, steps: int, warmup: int) -> dict[str, list[float]]:
    """Run `warmup` then `steps` rounds of every stepper in turn, A B A B ..., timing each step: a host-bound
    step's time follows the CPU's speed, which drifts by up to 2x within one process (benchmarks/results/
    probe-decode-step-times-20261124.txt), so back-to-back runs would compare drifts. Returns seconds per step."""
    for _ in range(warmup):
        for step in steppers.values():
            step()
    times = {name: [] for name in steppers}
    for _ in range(steps):
        for name, step in steppers.items():
            times[name].append(timed_step(step, device))
    return times


def _interleaved_row(path: str, batch: int, context: int, seconds: list[float]) -> dict:
    median = statistics.median(seconds)
    return {"path": path, "batch": batch, "context": context, "step_ms": 1e3 * median,
            "tokens_per_s": batch / median, "step_ms_all": [1e3 * x for x in seconds]}


def interleaved_decode(models: dict, path: str, *, batch: int, context: int, steps: int, warmup: int = 8,
                       seed: int = 0) -> dict[str, dict]:
    """Decode steps of several prepared models (one per configuration, e.g. {"dense": a, "chess": b}) taken in
    turn (`interleave`). Returns, per name, the row decode_point would give plus `step_ms_all` (every step) and,
    against the first model, `paired_speedup`: the median over steps of first-model time / this model's time in
    the same round."""
    device = next(next(iter(models.values())).parameters()).device
    steppers = {name: decode_stepper(model, path, batch=batch, context=context,
                                     capacity=context + warmup + steps + 1, seed=seed)
                for name, model in models.items()}
    times = interleave(steppers, device, steps=steps, warmup=warmup)
    first = times[next(iter(models))]
    return {name: {**_interleaved_row(path, batch, context, t),
                   "paired_speedup": statistics.median(a / b for a, b in zip(first, t))} for name, t in times.items()}


def interleaved_paths(model, paths, *, batch: int, context: int, steps: int, warmup: int = 8, seed: int = 0) -> dict:
    """Decode steps of several paths over ONE prepared model (kvpass and the peer coexist: the peer reuses the
    model's modules, not its compiled call), taken in turn (`interleave`). Returns, per path, the row decode_point
    would give plus `step_ms_all`."""
    device = next(model.parameters()).device
    steppers = {path: decode_stepper(model, path, batch=batch, context=context, capacity=context + warmup + steps + 1,
                                     seed=seed) for path in paths}
    times = interleave(steppers, device, steps=steps, warmup=warmup)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {path: {**_interleaved_row(path, batch, context, t), "peak_gib": peak} for path, t in times.items()}


class _TokenClock:
    """A `generate` streamer that stamps the host clock (after a device synchronize) as each new token arrives:
    HF calls `put` once with the prompt, then once per generated token."""

    def __init__(self, device):
        self.device, self.stamps = device, []

    def put(self, value) -> None:
        _synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def generate_point(model, *, context: int, new_tokens: int, seed: int = 0) -> dict:
    """What a user runs: HF `generate` of `new_tokens` (>= 2) after a real prefill of a random `context`-token
    prompt through `model` as prepared (e.g. kvpass.compile), after a warm-up generate of the same length (what a
    user's second request meets: compiled, recorded, the cache grown to its size). One timed generate, its tokens
    stamped as they arrive: prefill = start to the first new token, decode tok/s = the remaining tokens over the
    time from the first to the last (two separate generates, subtracted, can differ by more than the decode takes
    on a busy host)."""
    if new_tokens < 2:
        raise ValueError(f"generate_point needs new_tokens >= 2 to time decode, got {new_tokens}")
    device = next(model.parameters()).device
    ids = _random_prompt(model, 1, context, seed)
    clock = _TokenClock(device)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _synchronize(device)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock)
    prompt, first, *_, last = clock.stamps
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"context": context, "new_tokens": new_tokens, "prefill_s": first - start,
            "prefill_tokens_per_s": context / (first - start),
            "decode_tokens_per_s": (new_tokens - 1) / (last - first),
            "peak_gib": None if peak is None else peak / 2**30}


def generate_against_sdpa(model, *, context: int, new_tokens: int, seed: int = 0) -> dict:
    """generate_point's row, beside HF's own SDPA prefill of the same prompt: `hf_sdpa_prefill_s` and
    `prefill_fraction_of_sdpa` (HF's seconds over the model's)."""
    row = generate_point(model, context=context, new_tokens=new_tokens, seed=seed)
    hf = sdpa_prefill_seconds(model, context=context, seed=seed)
    return {**row, "hf_sdpa_prefill_s": hf, "prefill_fraction_of_sdpa": hf / row["prefill_s"]}


def sdpa_prefill_seconds(model, *, context: int, seed: int = 0, repeats: int = 3) -> float:
    """Best of `repeats` uncompiled HF forwards (the model's own SDPA attention) over a random prompt: the prefill
    kvpass's is compared with. model.forward bypasses model.compile (which wraps only __call__)."""
    device = next(model.parameters()).device
    ids = _random_prompt(model, 1, context, seed)
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            model.forward(ids, use_cache=False, logits_to_keep=1)
            _synchronize(device)
            best = min(best, time.perf_counter() - start)
    return best


def prefill_point(model, *, batch: int, context: int, seed: int = 0) -> dict:
    """One prefill of `context` tokens through `model` as it is (compiled or not): tokens/s and peak memory."""
    device = next(model.parameters()).device
    ids = _random_prompt(model, batch, context, seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        model(ids, use_cache=False, logits_to_keep=1)  # warm-up: compiles this shape
        _synchronize(device)
        start = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        _synchronize(device)
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"batch": batch, "context": context, "prefill_tokens_per_s": batch * context / seconds,
            "prefill_peak_gib": None if peak is None else peak / 2**30}


def prepare(model, path: str, config, *, cudagraphs: bool, inner: str = "inductor"):
    """Compile `model` in place for one path; returns an undo function."""
    from ..attach import compile as compile_model
    from ..attach import detach

    if path == "kvpass":
        compile_model(model, config, cudagraphs=cudagraphs, inner=inner)
        return lambda: (detach(model), torch._dynamo.reset())
    if path == "hf-static":
        eager_forward = model.forward
        options = dict(mode="reduce-overhead") if cudagraphs else {}
        model.forward = torch.compile(model.forward, backend=inner, fullgraph=True, **options)
        return lambda: (setattr(model, "forward", eager_forward), torch._dynamo.reset())
    return lambda: None


def format_row(row: dict, bytes_per_step: int, bandwidth: float) -> str:
    achieved = bytes_per_step / (row["step_ms"] * 1e-3)
    roofline = "" if bandwidth != bandwidth else f" {100 * achieved / bandwidth:5.1f}% of roofline"
    peak = "" if row["peak_gib"] is None else f" peak {row['peak_gib']:6.2f} GiB"
    return (f"{row['path']:14s} B{row['batch']:<3d} ctx {row['context']:>7d}: {row['tokens_per_s']:8.1f} tok/s "
            f"({row['step_ms']:7.2f} ms/step) {achieved / 1e9:7.1f} GB/s{roofline}{peak}")
