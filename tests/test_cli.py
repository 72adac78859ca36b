"""The command line: the README's main job (`kvpass generate`) and `kvpass inspect`."""
import pytest

from kvpass.cli import main
from kvpass.patterns import CATALOGUE


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
