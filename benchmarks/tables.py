"""Markdown tables for BENCHMARKS.md from JSON records: python benchmarks/tables.py benchmarks/results"""
from __future__ import annotations

import sys

from kvpass.eval.records import load_records


def _env(record) -> str:
    env = record["environment"]
    v = env["versions"]
    return (f"{env['device']}; torch {v['torch']}, triton {v['triton']}, transformers {v['transformers']}; "
            f"{record['date'][:10]}, commit {env.get('commit')}")


def _markdown(header: list[str], rows: list[list], notes) -> str:
    """A markdown table of `rows` under `header`, then one "- note" line per distinct note, sorted."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines + [""] + [f"- {note}" for note in sorted(set(notes))])


def bench_table(records) -> str:
    rows, notes = [], []
    for record in records:
        notes.append(_env(record) + (", CUDA graphs" if record.get("cudagraphs") else ""))
        bandwidth = record.get("bandwidth_bytes_per_s") or float("nan")
        for row in record["results"]:
            if "error" in row:
                rows.append([row["path"], row["batch"], row["context"], row["error"], "", "", "", ""])
                continue
            roof = 100 * row["bytes_per_step"] / (row["step_ms"] * 1e-3) / bandwidth
            path = row["path"] + (" (CUDA graphs)" if record.get("cudagraphs") else "")
            prefill = f"{row['prefill_tokens_per_s']:.0f}" if "prefill_tokens_per_s" in row else ""
            peak = "" if row.get("peak_gib") is None else f"{row['peak_gib']:.1f}"
            rows.append([path, row["batch"], row["context"], f"{row['tokens_per_s']:.1f}", f"{row['step_ms']:.2f}",
                         f"{roof:.0f} %", peak, prefill])
    return _markdown(["path", "batch", "context", "decode tok/s", "ms/step", "% of roofline", "peak GiB",
                      "prefill tok/s"], rows, notes)


def ppl_table(records) -> str:
    rows = [[record["model"], row["text"], row["mode"], f"{row['seqlen']} × {row['windows']}", row["name"],
             f"{row['ppl']:.3f}", f"{row.get('ratio_to_dense', 1.0):.4f}", row["tokens"],
             f"{row['bytes_per_token']:.0f}" if "bytes_per_token" in row else ""]
            for record in records for row in record["results"]]
    return _markdown(["model", "text", "mode", "seqlen × windows", "name", "perplexity", "ratio to dense", "tokens",
                      "KV bytes/token"], rows, [_env(r) for r in records])


def passkey_table(records) -> str:
    rows = [[record["model"], row.get("task", record.get("task")), row["name"], row["length"], f"{row['depth']:.2f}",
             f"{row['success']:.2f}", row["trials"]] for record in records for row in record["results"]]
    return _markdown(["model", "task", "name", "length", "depth", "success", "trials"], rows,
                     [_env(r) for r in records])


def kernel_table(records) -> str:
    rows = [[row["context"], row["path"], f"{row['ms']:.3f}", f"{row['bytes_held'] / 1e6:.1f}",
             f"{row['gb_per_s']:.0f}"] for record in records for row in record["results"]]
    return _markdown(["context", "path", "ms (median)", "MB held", "MB/ms"], rows,
                     [f"{_env(r)}; {r.get('shape')}" for r in records])


def _commit(record) -> str:
    """The commit a record's code came from (its first word: a record may say more about how it ran)."""
    return (record["environment"].get("commit") or "?").split()[0]


def _ffn_method(record) -> str:
    """kvpass's FFN in a decode-engine speed record: dense, CHESS at its sparsity, or CHESS+ (selective)."""
    ffn = (record.get("config") or {}).get("ffn") or {}
    if ffn.get("method") != "chess":
        return "dense"
    return f"CHESS{'+' if ffn.get('selective') else ''} {ffn['sparsity']}"


def engine_speed_table(records) -> str:
    rows = []
    for record in records:
        for row in record["results"]:
            if "error" in row:  # a point that did not run (out of memory): its row says so
                rows.append([_commit(record), _ffn_method(record), row["batch"], row["context"],
                             record["args"]["steps"], row["error"][:60]] + [""] * 7)
                continue
            k, p = row["kvpass"], row["peer"]
            busy = "" if k.get("gpu_busy") is None else f"{100 * k['gpu_busy']:.0f} %"
            rows.append([_commit(record), _ffn_method(record), row["batch"], row["context"], record["args"]["steps"],
                         f"{k['tokens_per_s']:.1f}",
                         f"{p['tokens_per_s']:.1f}",
                         f"{row['kvpass_over_peer']:.3f}", busy, "yes" if row["interleaved"] else "no (memory)",
                         row["decode_engine"]["records"], row["graphs_compiled"], f"{row['peak_gib']:.1f}"])
    return _markdown(["code", "kvpass FFN", "batch", "context", "steps", "kvpass tok/s", "peer tok/s", "kvpass / peer", "GPU-busy (kvpass)",
                      "interleaved", "recordings", "compiles", "peak GiB"], rows, [_env(r) for r in records])


def engine_e2e_table(records) -> str:
    rows = [[_commit(record), row["context"], row["new_tokens"], f"{row['prefill_s']:.3f}",
             f"{row['hf_sdpa_prefill_s']:.3f}",
             f"{row['prefill_fraction_of_sdpa']:.2f}", f"{row['decode_tokens_per_s']:.1f}", f"{row['peak_gib']:.1f}",
             f"{sum(row['kv_bytes_by_part'].values()) / 2**20:.0f}"]
            for record in records for row in record["results"]]
    return _markdown(["code", "prompt", "new tokens", "kvpass prefill s", "HF SDPA prefill s", "SDPA / kvpass",
                      "decode tok/s", "peak GiB", "KV MiB held"], rows, [_env(r) for r in records])


def engine_compile_table(records) -> str:
    rows = [[row["model"], row["device"], row["graphs"], f"{row['kvpass_pass']:.2f}", f"{row['inner']:.2f}",
             f"{100 * row['pass_over_inner']:.1f} %"] for record in records for row in record["results"]]
    return _markdown(["model", "device", "graphs", "kvpass pass s", "Inductor s", "pass / Inductor"], rows,
                     [_env(r) for r in records])


def main(paths) -> None:
    records = load_records(paths)
    for command, render in (("bench decode", bench_table), ("eval ppl", ppl_table), ("eval passkey", passkey_table),
                            ("bench antkv-kernels", kernel_table), ("bench decode-engine-speed", engine_speed_table),
                            ("bench decode-engine-e2e", engine_e2e_table),
                            ("bench decode-engine-compile", engine_compile_table)):
        chosen = [r for r in records if r["command"] == command]
        if chosen:
            print(f"### {command}\n\n{render(chosen)}\n")


if __name__ == "__main__":
    main(sys.argv[1:] or ["benchmarks/results"])
