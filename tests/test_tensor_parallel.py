"""kvpass on a model sharded with HF's tensor-parallel plan (`from_pretrained(..., tp_plan="auto")` under torchrun):
two CPU processes over gloo (tests/tensor_parallel_worker.py) against one process, on a tiny random Llama.

Each rank's runtime holds the KV heads of its shard and runs with a calibration of its own shard (the worker gives
each rank its artefact; the automatic one is keyed by the shard's weights); an artefact made for another shard is
refused. CHESS thresholds each rank's shard of the FFN channels.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import kvpass
from kvpass.calibration.artefact import Calibration

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tensor_parallel_worker as worker  # noqa: E402

METHODS = ("dense", "antkv", "chess")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> pathlib.Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ranks(tiny_llama, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    env = {**os.environ, "KVPASS_CACHE": str(tmp_path_factory.mktemp("cache")), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           str(pathlib.Path(worker.__file__)), str(tiny_llama), str(out), *METHODS],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def alone(tiny_llama, tmp_path_factory) -> dict:
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("alone")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        hf = model.generate(worker.prompt(), max_new_tokens=worker.NEW_TOKENS, do_sample=False)
    return {"hf": hf[0, worker.PROMPT_LENGTH:].tolist(), **{m: worker.run(model, m, folder) for m in METHODS}}


def test_dense_under_tensor_parallel_generates_the_single_process_tokens_with_half_the_kv_per_rank(ranks, alone):
    for rank in ranks:
        assert rank["dense"]["tokens"] == alone["dense"]["tokens"] == alone["hf"]
        assert rank["dense"]["kv_bytes"] * 2 == alone["dense"]["kv_bytes"]  # one of the two KV heads per rank


def test_antkv_calibrates_each_shard_and_generates_the_single_process_tokens(ranks, alone):
    for rank in ranks:
        assert rank["antkv"]["tokens"] == alone["antkv"]["tokens"]
        assert not rank["antkv"]["unmatched"]


def test_chess_sparsifies_each_ranks_ffn_shard_and_generates_the_single_process_tokens(ranks, alone):
    """The down projection is row-parallel: each rank's FFN is its shard of the intermediate channels (a DTensor's
    local shard in the graph), with the thresholds its own calibration gave those channels; the all-reduce after it
    sums the sparse partial outputs."""
    assert alone["chess"]["sparse_ffn_sites"] == 2
    for rank in ranks:
        assert not rank["chess"]["unmatched"] and rank["chess"]["sparse_ffn_sites"] == 2
        assert rank["chess"]["tokens"] == alone["chess"]["tokens"]


def test_an_artefact_made_for_another_shard_is_refused(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    artefact = Calibration.new(model, {"name": "test"})
    artefact.add_section("s", {}, {"x": torch.zeros(1)})
    artefact.check(model, "s", {})
    artefact.meta["model"]["shard"] = {"rank": 1, "world": 2}
    with pytest.raises(ValueError, match=r"made for rank 1 of 2 and this process runs the whole model"):
        artefact.check(model, "s", {})
    assert kvpass.calibration.artefact.shard_of(model) is None
