"""The command line: the README's main job (`kvpass generate`) and `kvpass inspect`; a user's mistake is one line
(`kvpass: error: ...`, exit status 2, no traceback), found before a model loads."""
import json
import os
import subprocess
import sys

import pytest
import torch
from kvpass.patterns.matchers import CATALOGUE

from kvpass.cli import main


def _refused(capsys, argv, *needles) -> str:
    """Run main(argv): it must refuse with exit status 2 and one stderr line holding each needle, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvpass: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command loads or builds a model: its user errors must be found before that."""
    import kvpass.models

    def refuse(*args, **kwargs):
        raise AssertionError(f"load_model{args} ran before the user error was found")

    monkeypatch.setattr(kvpass.models, "load_model", refuse)


class _Chars:
    """A tokenizer for a tiny random model: one id per character."""

    pad_token_id = 0
    chat_template = None

    def __call__(self, text, return_tensors="pt", **kwargs):
        ids = torch.tensor([[ord(c) % 128 for c in text]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def decode(self, ids, **kwargs):
        return "".join(chr(97 + int(i) % 26) for i in ids)


@pytest.fixture
def tiny_model(monkeypatch):
    """`--model` loads a 2-layer random Llama with a character tokenizer (seconds to compile, not minutes)."""
    import kvpass.models
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    monkeypatch.setattr(kvpass.models, "load_model", lambda *args, **kwargs: (model, _Chars()))
    return model


def test_inspect_catalogue_lists_every_entry(capsys):
    assert main(["inspect", "--catalogue"]) == 0
    out = capsys.readouterr().out
    assert all(entry.name in out for entry in CATALOGUE)


def test_generate_refuses_a_model_without_tokenizer(capsys, no_model):
    _refused(capsys, ["generate", "--model", "random:llama:1b", "--max-new-tokens", "2"], "random:llama:1b",
             "no tokenizer", "smollm2-135m")


@pytest.mark.slow
def test_generate_main_job(capsys):
    assert main(["generate", "--max-new-tokens", "6", "--inner", "aot_eager", "--json"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "compiling smollm2-135m with kvpass (first call" in captured.err
    assert "generated: " in out and "tokens/s" in out
    assert "'sdpa-native-gqa': 30" in out or "'sdpa-repeat-kv-mask': 30" in out


@pytest.mark.slow
def test_inspect_real_model(capsys):
    assert main(["inspect", "--model", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert out.count("matched   ") == 60 and "unmatched" not in out


def test_method_flags_are_validated_before_the_model_loads(capsys, no_model):
    for command in (["eval", "ppl"], ["eval", "passkey"], ["generate"], ["bench", "decode"]):
        _refused(capsys, [*command, "--attention", "antkv", "--bits", "5"], "bits=5.0")
    _refused(capsys, ["generate", "--attention", "kivi", "--bits", "3"], "bits=3")
    _refused(capsys, ["calibrate", "--attention", "kivi", "--out", "x.safetensors"], "needs no calibration")
    _refused(capsys, ["eval", "ppl", "--attention", "wave", "--scoring", "pre-rope", "--search", "graph"],
             "search='graph'")
    _refused(capsys, ["eval", "ppl", "--attention", "wave", "--recent", "0"], "recent=0")
    _refused(capsys, ["generate", "--max-new-tokens", "0"], "--max-new-tokens=0")


def test_rope_scaling_is_one_line(capsys, no_model):
    _refused(capsys, ["eval", "passkey", "--device", "cpu", "--rope-scaling", "yarn:1"], "rope scaling 'yarn:1'",
             "FACTOR > 1")


def test_cuda_device_on_a_machine_without_cuda(capsys, monkeypatch, no_model):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _refused(capsys, ["generate", "--device", "cuda"], "--device cuda", "use --device cpu")
    _refused(capsys, ["eval", "ppl", "--device", "cuda:1"], "--device cuda:1", "use --device cpu")
    _refused(capsys, ["inspect", "--device", "gpu"], "--device gpu", "cpu")


def test_unknown_text_is_one_line(capsys, no_model):
    _refused(capsys, ["eval", "ppl", "--text", "no-such-text"], "unknown text 'no-such-text'", "enwiki")
    _refused(capsys, ["eval", "passkey", "--task", "needle", "--haystack", "no-such-text"], "'no-such-text'")
    _refused(capsys, ["calibrate", "--text", "no-such-text", "--out", "x.safetensors"], "'no-such-text'")


def test_unreadable_calibration_file_is_one_line(capsys, tmp_path, no_model):
    from kvpass.calibration.artefact import FORMAT, VERSION, Calibration

    good = tmp_path / "good.safetensors"
    Calibration({"format": FORMAT, "version": VERSION, "sections": {}}, {"x": torch.zeros(1000)}).save(good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:500])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    for bad in (truncated, garbage):
        with pytest.raises(ValueError, match="re-run `kvpass calibrate"):
            Calibration.load(bad)
        _refused(capsys, ["eval", "ppl", "--attention", "antkv", "--calibration", str(bad)], str(bad),
                 "kvpass calibrate")
        _refused(capsys, ["generate", "--ffn", "chess", "--calibration", str(bad)], str(bad), "kvpass calibrate")
    _refused(capsys, ["generate", "--attention", "antkv", "--calibration", str(tmp_path / "missing.safetensors")],
             "missing.safetensors", "does not exist")


def test_plot_of_a_missing_folder_or_a_stray_file_is_one_line(capsys, tmp_path):
    _refused(capsys, ["plot", str(tmp_path / "nope"), "--out", str(tmp_path / "png")], "nope", "does not exist")
    (tmp_path / "notes.json").write_text("{not json")
    _refused(capsys, ["plot", str(tmp_path / "notes.json")], "notes.json", "not a JSON record")
    (tmp_path / "other.json").write_text('{"a": 1}')
    _refused(capsys, ["plot", str(tmp_path / "other.json")], "other.json", "not a kvpass record")
    (tmp_path / "empty").mkdir()
    _refused(capsys, ["plot", str(tmp_path / "empty")], "no eval ppl")


def test_registry_model_without_its_packages_is_one_line(capsys, monkeypatch, tmp_path):
    import kvpass.models

    spec = kvpass.models.ModelSpec(name="absent-model", package="kvpass_absent_package", file="absent.gguf",
                                   pip_install="pip install kvpass-absent-package==1.0")
    monkeypatch.setitem(kvpass.models.MODELS, "absent-model", spec)
    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path))   # no converted copy to fall back on
    _refused(capsys, ["generate", "--model", "absent-model", "--device", "cpu"], "'absent-model'",
             "pip install kvpass-absent-package==1.0")


def test_empty_prompt_is_refused_before_the_model_loads(capsys, no_model):
    _refused(capsys, ["generate", "--raw", "--prompt", ""], "--prompt is empty")


@pytest.mark.parametrize("tokens", ["1", "-3"])
def test_bench_decode_refuses_a_generate_too_short_to_time_decode(capsys, no_model, tokens):
    _refused(capsys, ["bench", "decode", "--model", "random:llama:1b", "--generate", tokens],
             f"--generate {tokens}", "--generate 2 or more")


def test_debug_logs_show_the_traceback_and_bugs_keep_theirs(monkeypatch):
    import logging

    import kvpass.cli

    logger = logging.getLogger("kvpass")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    monkeypatch.setenv("KVPASS_LOGS", "debug")
    try:
        with pytest.raises(ValueError, match="bits=5.0"):
            main(["eval", "ppl", "--attention", "antkv", "--bits", "5"])
    finally:
        logger.level, logger.handlers[:], logger.propagate = saved[0], saved[1], saved[2]
    monkeypatch.delenv("KVPASS_LOGS")
    # A ValueError from inside a library, or any other error, is a bug: it keeps its traceback.
    monkeypatch.setattr(kvpass.cli, "cmd_plot", lambda args: json.loads("{"))
    with pytest.raises(json.JSONDecodeError):
        main(["plot", "x"])
    monkeypatch.setattr(kvpass.cli, "cmd_plot", lambda args: None.missing)
    with pytest.raises(AttributeError):
        main(["plot", "x"])


def test_the_installed_command_prints_one_line_and_exits_2(tmp_path):
    """The real entry point, in a fresh process: the message, the status, and no traceback unless asked for."""
    command = [sys.executable, "-m", "kvpass.cli", "plot", str(tmp_path / "nope")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.strip().splitlines() == [f"kvpass: error: '{tmp_path / 'nope'}' does not exist; give record "
                                                f"files or folders of them (the eval and bench commands write them "
                                                f"under their --out, e.g. runs/eval)"], done.stderr
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "KVPASS_LOGS": "debug"})
    assert done.returncode == 1 and "Traceback" in done.stderr and "does not exist" in done.stderr


def test_wave_notes_say_when_perplexity_cannot_show_the_index():
    from kvpass.cli import _decode_only_notes
    from kvpass.config import Dense, WaveIndex

    wave = WaveIndex()  # min_context 1024
    assert _decode_only_notes(Dense(), 1024, 0) == []
    prefill = _decode_only_notes(wave, 256, 0)
    assert len(prefill) == 2 and "acts only in decode" in prefill[0] and "--decode-tail" in prefill[0]
    assert "never engages in 256-token windows" in prefill[1] and "min_context=1024" in prefill[1]
    assert _decode_only_notes(wave, 4096, 0) == [prefill[0]]
    assert _decode_only_notes(wave, 4096, 128) == []
    # The boundary measured on the tiny model below: read by the last step at min_context + 2, never before.
    assert len(_decode_only_notes(wave, 1025, 8)) == 1 and _decode_only_notes(wave, 1026, 8) == []


def test_eval_ppl_says_the_wave_index_never_engaged(capsys, tmp_path, tiny_model):
    """Windows of min_context + 1 tokens: the index is never read (the record has no decode reads), and the
    command says so instead of printing a bare ratio."""
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 4)
    argv = ["eval", "ppl", "--text", str(text), "--attention", "wave", "--min-context", "32", "--recent", "8",
            "--seqlen", "33", "--max-windows", "1", "--decode-tail", "8", "--inner", "eager", "--out",
            str(tmp_path / "out")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "x dense perplexity" in out
    assert "note: the wave index never engages in 33-token windows (min_context=32" in out
    record = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert [row["name"] for row in record["results"]] == ["dense", "wave-0.018r-0.232e-8recent"]
    assert "decode_reads" not in record["results"][1]


def test_generate_says_it_is_compiling_before_the_first_call(capsys, monkeypatch, tiny_model):
    seen = []
    generate = type(tiny_model).generate   # kvpass wraps the class's generate, so watch it there

    def watched(self, *args, **kwargs):
        seen.append(capsys.readouterr().err)   # what was printed before this call
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_model), "generate", watched)
    assert main(["generate", "--model", "tiny", "--device", "cpu", "--raw", "--prompt", "hello", "--max-new-tokens",
                 "2", "--inner", "eager"]) == 0
    assert seen[0].strip().splitlines()[-1] == "compiling tiny with kvpass (first call; ~1-3 min on a CPU)..."
    assert "generated: " in capsys.readouterr().out


def test_wave_flags_reach_the_method_and_its_name():
    import argparse

    from kvpass.cli import _add_model_args, _config, _method_name

    parser = argparse.ArgumentParser()
    _add_model_args(parser)
    config = _config(parser.parse_args(["--attention", "wave", "--recent", "256", "--estimation", "0.5"]))
    assert (config.attention.recent, config.attention.estimation) == (256, 0.5)
    assert _method_name(config) == "wave-0.018r-0.5e-256recent"
    assert _method_name(_config(parser.parse_args(["--attention", "wave"]))) == "wave-0.018r-0.232e"


@pytest.mark.slow
def test_calibrate_writes_an_artefact_the_eval_reads(tmp_path, capsys):
    import json

    from kvpass.calibration.artefact import Calibration

    out = tmp_path / "smol.safetensors"
    assert main(["calibrate", "--model", "smollm2-135m", "--bits", "1", "0.375", "--tokens", "512", "--seqlen",
                 "256", "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert sorted(meta["sections"]) == ["antkv-0.375bit-query-metric", "antkv-1bit-query-metric"]
    assert meta["text"]["name"] == "lee"
    assert Calibration.load(out).section("antkv-1bit-query-metric")["layers.29.values"].shape == (3, 8, 256, 8)
    capsys.readouterr()   # the calibration's progress bars
    _refused(capsys, ["eval", "ppl", "--text", "lee", "--attention", "antkv", "--calibration", str(out)],
             "calibration text 'lee' is the evaluation text")


@pytest.mark.slow
def test_chess_calibration_reaches_its_sparsity_on_held_out_text(tmp_path, capsys):
    """`kvpass calibrate --ffn chess` on the default calibration text ('lee'); the thresholds then zero the target
    fraction (within 2 points) of SmolLM2's FFN activations and projection inputs on another text (enwiki)."""
    from kvpass.calibration import chess
    from kvpass.calibration.artefact import Calibration
    from kvpass.eval.ppl import text_windows
    from kvpass.models import load_model

    out = tmp_path / "chess.safetensors"
    assert main(["calibrate", "--model", "smollm2-135m", "--ffn", "chess", "--sparsity", "0.3", "0.5", "--tokens",
                 "2048", "--seqlen", "512", "--out", str(out)]) == 0
    artefact = Calibration.load(out)
    assert sorted(artefact.meta["sections"]) == ["chess-0.3", "chess-0.5"] and artefact.meta["text"]["name"] == "lee"
    model, tokenizer = load_model("smollm2-135m")
    held_out = chess.record(model, text_windows(tokenizer, "enwiki", 512, 2)[0], progress=False)
    for s in (0.3, 0.5):
        tensors = artefact.section(f"chess-{s:g}")
        for rule in ("chess", "cats"):
            measured = chess.measured_sparsity(held_out, tensors, rule)
            assert all(abs(measured[kind] - s) <= 0.02 for kind in ("ffn", "q", "o")), (s, rule, measured)


def test_plot_draws_dense_once_with_readable_labels(tmp_path):
    """Every eval ppl record carries its own dense row: the chart draws it once per protocol, and no label runs
    into another or off the figure."""
    from kvpass.eval.plot import _perplexity_figure, _perplexity_groups, _pyplot, plot_records

    def record(model, mode, seqlen, windows, tokens, dense, name, ppl):
        """One `kvpass eval ppl` record: its dense row, then the method's."""
        return {"command": "eval ppl", "model": model, "results": [
            {"name": n, "ppl": v, "mode": mode, "seqlen": seqlen, "windows": windows, "tokens": tokens,
             "text": "enwiki"} for n, v in (("dense", dense), (name, ppl))]}

    methods = ["antkv-0.375bit-0.01anchors-attention_variance", "kivi-2bit", "chess+selective-0.5", "cats-0.5"]
    records = [record("smollm2-135m", "prefill", 1024, 4, 4092, 21.74, name, 30.0 + i)
               for i, name in enumerate(methods)]
    # Same model, length and tokens scored, other windows: another protocol, another dense.
    records.append(record("qwen2.5-0.5b", "decode", 32000, 1, 512, 26.8, "wave-0.018r-0.232e", 26.3))
    records.append(record("qwen2.5-0.5b", "decode", 32000, 2, 512, 31.8, "wave-0.018r-0.232e", 31.8))
    groups = _perplexity_groups(records)
    assert [list(rows) for rows in groups.values()] == [["dense", *methods], ["dense", "wave-0.018r-0.232e"],
                                                        ["dense", "wave-0.018r-0.232e"]]
    fig = _perplexity_figure(records)
    try:
        fig.canvas.draw()
        width, height = fig.canvas.get_width_height()
        drawn_x = [label for ax in fig.axes for tick, label in zip(ax.get_xticks(), ax.get_xticklabels())
                   if ax.get_xlim()[0] <= tick <= ax.get_xlim()[1]]   # matplotlib also lists ticks past the limits
        labels = [text for ax in fig.axes for text in [ax.title, ax.xaxis.label, *ax.texts, *ax.get_yticklabels()]
                  if text.get_text()] + drawn_x
        boxes = [text.get_window_extent() for text in labels]
        assert all(0 <= box.x0 and box.x1 <= width and 0 <= box.y0 and box.y1 <= height for box in boxes)
        clashes = [(labels[i].get_text(), labels[j].get_text()) for i in range(len(boxes))
                   for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]
        assert not clashes, clashes
        assert sum(label.get_text() == "dense" for label in labels) == len(groups)
    finally:
        _pyplot().close(fig)
    assert plot_records(records, tmp_path)[0].read_bytes()[:4] == b"\x89PNG"
