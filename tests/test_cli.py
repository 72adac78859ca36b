"""The command line: the README's main job (`kvpass generate`) and `kvpass inspect`."""
import pytest
from kvpass.patterns.matchers import CATALOGUE

from kvpass.cli import main


def test_inspect_catalogue_lists_every_entry(capsys):
    assert main(["inspect", "--catalogue"]) == 0
    out = capsys.readouterr().out
    assert all(entry.name in out for entry in CATALOGUE)


def test_generate_refuses_a_model_without_tokenizer():
    with pytest.raises(SystemExit, match="no tokenizer"):
        main(["generate", "--model", "random:smollm2:135m", "--max-new-tokens", "2"])


@pytest.mark.slow
def test_generate_main_job(capsys):
    assert main(["generate", "--max-new-tokens", "6", "--inner", "aot_eager", "--json"]) == 0
    out = capsys.readouterr().out
    assert "generated: " in out and "tokens/s" in out
    assert "'sdpa-native-gqa': 30" in out or "'sdpa-repeat-kv-mask': 30" in out


@pytest.mark.slow
def test_inspect_real_model(capsys):
    assert main(["inspect", "--model", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert out.count("matched   ") == 60 and "unmatched" not in out


def test_method_flags_are_validated():
    with pytest.raises(SystemExit, match="bits=3.0"):
        main(["eval", "ppl", "--attention", "antkv", "--bits", "3"])
    with pytest.raises(SystemExit, match="needs no calibration"):
        main(["calibrate", "--attention", "kivi", "--out", "x.safetensors"])
    with pytest.raises(SystemExit, match="search='graph'"):
        main(["eval", "ppl", "--attention", "wave", "--scoring", "pre-rope", "--search", "graph"])
    with pytest.raises(SystemExit, match="recent=0"):
        main(["eval", "ppl", "--attention", "wave", "--recent", "0"])
    with pytest.raises(SystemExit, match=r"rope scaling 'yarn:1'.*FACTOR > 1"):
        main(["eval", "passkey", "--rope-scaling", "yarn:1"])


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
    assert sorted(meta["sections"]) == ["antkv-0.375bit", "antkv-1bit"] and meta["text"]["name"] == "lee"
    assert Calibration.load(out).section("antkv-1bit")["layers.29.values"].shape == (3, 8, 256, 8)
    with pytest.raises(SystemExit, match="calibration text 'lee' is the evaluation text"):
        main(["eval", "ppl", "--text", "lee", "--attention", "antkv", "--calibration", str(out)])


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
                 "4096", "--seqlen", "512", "--out", str(out)]) == 0
    artefact = Calibration.load(out)
    assert sorted(artefact.meta["sections"]) == ["chess-0.3", "chess-0.5"] and artefact.meta["text"]["name"] == "lee"
    model, tokenizer = load_model("smollm2-135m")
    held_out = chess.record(model, text_windows(tokenizer, "enwiki", 512, 2)[0], progress=False)
    for s in (0.3, 0.5):
        tensors = artefact.section(f"chess-{s:g}")
        for rule in ("chess", "cats"):
            measured = chess.measured_sparsity(held_out, tensors, rule)
            assert all(abs(measured[kind] - s) <= 0.02 for kind in ("ffn", "q", "o")), (s, rule, measured)
