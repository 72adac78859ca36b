"""`kvpass plot`: PNGs from JSON records (perplexity per configuration, tokens/s and memory vs context,
passkey heat maps). Plots are drawn from records only, so every figure has a command behind it."""
from __future__ import annotations

import collections
import pathlib


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_records(records: list[dict], out_dir) -> list[pathlib.Path]:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_command = collections.defaultdict(list)
    for record in records:
        by_command[record["command"]].append(record)
    written = []
    if by_command["eval ppl"]:
        written.append(_perplexity(by_command["eval ppl"], out / "perplexity.png"))
    if by_command["bench decode"]:
        written += _bench(by_command["bench decode"], out)
    for i, record in enumerate(by_command["eval passkey"]):
        from .passkey import heatmap

        path = out / f"passkey-{i}.png"
        heatmap(record["results"], path, title=f"{record['model']}: {record.get('task', 'passkey')}")
        written.append(path)
    if not written:
        raise ValueError("no eval ppl / eval passkey / bench decode records among the inputs")
    return written


def _perplexity(records, path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels, values = [], []
    for record in records:
        for row in record["results"]:
            labels.append(f"{row['name']}\n{record['model']} {row['mode']} L={row['seqlen']}")
            values.append(row["ppl"])
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set_ylabel("perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _bench(records, out):
    plt = _pyplot()
    rows = [row for record in records for row in record["results"] if "tokens_per_s" in row]
    paths = []
    for key, label, name in (("tokens_per_s", "decode tokens/s", "decode-tokens-per-s.png"),
                             ("peak_gib", "peak GPU memory (GiB)", "decode-memory.png")):
        fig, ax = plt.subplots(figsize=(7, 4))
        series = collections.defaultdict(list)
        for row in rows:
            if row.get(key) is not None:
                series[f"{row['path']} B{row['batch']}"].append((row["context"], row[key]))
        for name_, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name_)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)
    return paths
