"""Evaluation harness: perplexity equals a direct HF computation, decode mode, bench record, bad args."""
import json
import math

import pytest
import torch

import kvpass
from kvpass.cli import main
from kvpass.eval.lengths import check_length
from kvpass.eval.ppl import perplexity, windows
from kvpass.models import RANDOM_SHAPES

from families import FAMILIES


def _tokens(n, seed=0):
    return torch.randint(3, 120, (n,), generator=torch.Generator().manual_seed(seed))


def test_windows_are_non_overlapping_and_bounded():
    ids = torch.arange(1000)
    w = windows(ids, 128, 5)
    assert w.shape == (5, 128) and torch.equal(w.flatten(), ids[:640])
    assert windows(ids, 300, 99).shape == (3, 300)
    for bad, match in (((ids, 1, 4), "seqlen=1"), ((ids, 128, 0), "max_windows=0"), ((ids[:10], 128, 4), "fewer")):
        with pytest.raises(ValueError, match=match):
            windows(*bad)


def test_dense_ppl_equals_direct_hf_computation():
    reference, model = FAMILIES["llama"].build(), FAMILIES["llama"].build()
    batches = windows(_tokens(700), 64, 8)
    with torch.no_grad():
        direct = math.exp(sum(reference(w[None], labels=w[None]).loss.item() for w in batches) / len(batches))
    kvpass.compile(model, kvpass.Config(), inner="aot_eager", strict=True)
    got = perplexity(model, batches, progress=False)
    assert got["tokens"] == len(batches) * 63 and got["mode"] == "prefill"
    assert got["ppl"] == pytest.approx(direct, rel=1e-5)


def test_decode_mode_scores_the_tail_through_the_cache():
    reference, model = FAMILIES["mistral"].build(), FAMILIES["mistral"].build()  # sliding window 8 < tail
    batches = windows(_tokens(200, seed=1), 40, 3)
    with torch.no_grad():
        logits = torch.cat([reference(w[None]).logits for w in batches])  # (3, 40, V)
    tail = 12
    nll = torch.nn.functional.cross_entropy(logits[:, -tail - 1:-1].reshape(-1, logits.shape[-1]),
                                            batches[:, -tail:].reshape(-1))
    kvpass.compile(model, kvpass.Config(), inner="aot_eager", strict=True)
    got = perplexity(model, batches, decode_tail=tail, progress=False)
    assert got["mode"] == "decode" and got["tokens"] == 3 * tail
    assert got["ppl"] == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert kvpass.report(model)["attention_calls"]["decode-engine/decode"] == 3 * (tail - 1) * 2


def test_length_beyond_the_model_limit_is_refused():
    model = FAMILIES["llama"].build()  # 256 positions
    with pytest.raises(ValueError, match="seqlen=300.*256 positions"):
        check_length(model, 300, "seqlen")


def test_cli_bad_arguments_are_clear(tmp_path, capsys):
    """One line each, `kvpass: error: ...` and exit status 2 (tests/test_cli.py tests the mechanism)."""
    assert main(["bench", "decode", "--model", "random:smollm2:135m", "--batch", "0", "--out", str(tmp_path)]) == 2
    assert "kvpass: error: --batch=0" in capsys.readouterr().err
    assert main(["eval", "ppl", "--model", "not-a-model", "--device", "cpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'not-a-model'" in err and "random:<family>:<size>" in err


def test_bench_decode_tiny_cpu_point_writes_a_record(tmp_path, capsys, monkeypatch):
    # SmolLM2's shape cut to 2 layers: the command's every path (a 30-layer trace took 3 of its 4 CPU minutes)
    monkeypatch.setitem(RANDOM_SHAPES["smollm2"], "2-layer", {**RANDOM_SHAPES["smollm2"]["135m"], "num_hidden_layers": 2})
    assert main(["bench", "decode", "--model", "random:smollm2:2-layer", "--context", "32", "--steps", "2",
                 "--paths", "kvpass", "peer", "hf-eager", "--inner", "aot_eager", "--prefill-max", "32",
                 "--generate", "4", "--out", str(tmp_path)]) == 0
    record = json.loads(next(tmp_path.glob("bench-decode-*.json")).read_text())
    assert record["command"] == "bench decode" and record["environment"]["versions"]["torch"]
    rows = {row["path"]: row for row in record["results"]}
    assert set(rows) == {"kvpass", "peer", "hf-eager", "kvpass-generate"}
    generated = rows.pop("kvpass-generate")   # what a user runs: a real prefill and HF generate
    assert generated["new_tokens"] == 4 and generated["decode_tokens_per_s"] > 0
    assert generated["prefill_s"] > 0 and generated["hf_sdpa_prefill_s"] > 0
    assert generated["kv_bytes_by_part"]["keys"] > 0
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["bytes_per_step"] > 0
    kvpass_row = rows["kvpass"]
    assert kvpass_row["prefill_tokens_per_s"] > 0 and kvpass_row["over_peer"] > 0
    assert kvpass_row["kv_bytes_by_part"]["keys"] > 0 and kvpass_row["decode_engine"]["eager_steps"] > 0
    assert "tok/s" in capsys.readouterr().out


def test_interleaved_decode_alternates_models_and_pairs_their_steps(monkeypatch):
    """Two prepared copies of a tiny model decode in turn; each gets its own cache, `steps` timed steps and a
    paired speed-up against the first; every step of each really runs (the models' forward calls alternate)."""
    from kvpass.eval import bench

    models = {name: FAMILIES["llama"].build() for name in ("first", "second")}
    undos = [bench.prepare(model, "kvpass", kvpass.Config(), cudagraphs=False, inner="eager")
             for model in models.values()]
    calls = []
    for name, model in models.items():
        forward = model.forward
        monkeypatch.setattr(model, "forward", lambda *a, _f=forward, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    try:
        rows = bench.interleaved_decode(models, "kvpass", batch=2, context=24, steps=3, warmup=1)
    finally:
        for undo in undos:
            undo()
    assert calls == ["first", "second"] * 4
    assert set(rows) == {"first", "second"}
    for row in rows.values():
        assert len(row["step_ms_all"]) == 3 and row["tokens_per_s"] > 0 and row["paired_speedup"] > 0
    assert rows["first"]["paired_speedup"] == 1.0


def test_plot_draws_pngs_from_records(tmp_path):
    from kvpass.eval.plot import plot_records
    from kvpass.eval.records import load_records, write_record

    bench_rows = [{"path": p, "batch": 1, "context": c, "tokens_per_s": t, "step_ms": 1e3 / t, "peak_gib": 1.0 + c / 1e4}
                  for p, t0 in (("kvpass", 50.0), ("hf-eager", 15.0)) for c, t in ((4096, t0), (32768, t0 * 0.8))]
    write_record(tmp_path / "rec", "bench decode", bench_rows, config=None, model="random:llama:8b")
    write_record(tmp_path / "rec", "eval ppl", [{"name": "dense", "ppl": 21.3, "mode": "prefill", "seqlen": 1024}],
                 config=None, model="smollm2-135m")
    write_record(tmp_path / "rec", "eval passkey", [{"name": "dense", "length": 512, "depth": d, "success": 1.0,
                                                     "trials": 2} for d in (0.1, 0.9)], config=None, model="m")
    written = plot_records(load_records([tmp_path / "rec"]), tmp_path / "png")
    assert {p.name for p in written} == {"perplexity.png", "decode-tokens-per-s.png", "decode-memory.png",
                                         "passkey-0.png"}
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_eval_ppl_cli_on_the_real_model(tmp_path):
    text = tmp_path / "sample.txt"
    text.write_text(" ".join(f"Sentence number {i} talks about the weather in town {i % 7}." for i in range(200)))
    assert main(["eval", "ppl", "--model", "smollm2-135m", "--text", str(text), "--seqlen", "128",
                 "--max-windows", "2", "--ffn", "dense", "--out", str(tmp_path / "out")]) == 0
    record = json.loads(next((tmp_path / "out").glob("eval-ppl-*.json")).read_text())
    dense, method = record["results"]
    assert dense["name"] == "dense" and method["name"] == "dense+ffn-dense"
    assert dense["tokens"] == 2 * 127 and dense["text_sha256"] == method["text_sha256"]
    assert method["ratio_to_dense"] == pytest.approx(1.0, abs=1e-4)  # the dense FFN op computes the same
