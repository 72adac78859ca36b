"""One rank of tests/test_tensor_parallel.py (run by `torchrun --nproc-per-node N`; not a test itself).

Loads the tiny Llama saved at argv[1] with HF's tensor-parallel plan (`tp_plan="auto"`: gloo on the CPU), compiles it
with kvpass for each method named in argv[3:] (calibrated on this rank's shard, artefact per rank), generates greedily from a fixed prompt and writes, per method, the
tokens, the KV bytes this rank holds and the report's unmatched sites to argv[2]/rank<R>.json.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import kvpass
from kvpass.calibration import calibrate

CONFIGS = {
    "dense": kvpass.Config(attention=kvpass.Dense()),
    "antkv": kvpass.Config(attention=kvpass.AnTKV(bits=2)),
    "chess": kvpass.Config(ffn=kvpass.Chess(sparsity=0.5)),
}
PROMPT_LENGTH, NEW_TOKENS = 12, 6


def prompt() -> torch.Tensor:
    return torch.randint(3, 250, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(1))


def run(model, method: str, folder: pathlib.Path) -> dict:
    """Compile `model` (sharded or not) for `method`, calibrated on this process's shard with few tokens (fast) and
    saved to `folder` first, as a user gives each rank its own artefact; generate; detach."""
    config = CONFIGS[method]
    section = config.attention if method != "chess" else config.ffn
    if section.needs_calibration:
        rank = dist.get_rank() if dist.is_initialized() else None
        path = folder / f"{method}-{'alone' if rank is None else f'rank{rank}'}.safetensors"
        calibrate(model, section, tokens=512, seqlen=128, progress=False).save(path)
        config = dataclasses.replace(config, calibration=str(path))
    kvpass.compile(model, config, inner="eager")  # the rewrite is what is tested; Inductor adds minutes on 2 cores
    with torch.no_grad():
        tokens = model.generate(prompt(), max_new_tokens=NEW_TOKENS, do_sample=False)[0, PROMPT_LENGTH:]
    report = kvpass.report(model)
    kvpass.detach(model)
    return {"tokens": tokens.tolist(), "kv_bytes": report["kv_bytes"], "unmatched": report["unmatched"],
            "sparse_ffn_sites": report.get("chess", {}).get("sparse_ffn_sites", 0)}


def main() -> None:
    path, out, methods = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3:]
    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.float32)
    result = {method: run(model, method, out) for method in methods}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
