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


def _perplexity_groups(records) -> dict[tuple, dict[str, dict]]:
    """The perplexity rows by protocol (model, RoPE scaling, text, mode, window length, windows, tokens scored), each
    configuration once, dense first: every record ran its own dense baseline, and on the same protocol it is the
    same number. A configuration measured in several records keeps its last row."""
    groups: dict[tuple, dict[str, dict]] = {}
    for record in records:
        for row in record["results"]:
            key = (record["model"], record.get("rope_scaling"), row.get("text"), row["mode"], row["seqlen"],
                   row.get("windows"), row.get("tokens"))
            groups.setdefault(key, {})[row["name"]] = row
    return {key: dict(sorted(rows.items(), key=lambda item: item[0] != "dense")) for key, rows in groups.items()}


def _perplexity_figure(records):
    """One panel per protocol, one horizontal bar per configuration (long names stay readable on the y axis), each
    labelled with its perplexity and its ratio to dense."""
    plt = _pyplot()
    groups = _perplexity_groups(records)
    sizes = [len(rows) + 1.5 for rows in groups.values()]   # bars + the panel's title and axis
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 0.35 * sum(sizes) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": sizes})
    for ax, ((model, scaling, text, mode, seqlen, count, tokens), rows) in zip(axes[:, 0], groups.items()):
        names, values = list(rows), [row["ppl"] for row in rows.values()]
        dense = rows["dense"]["ppl"] if "dense" in rows else None
        ax.barh(range(len(names)), values, color=["tab:gray" if name == "dense" else "tab:blue" for name in names])
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        for i, (name, row) in enumerate(rows.items()):
            ratio = row.get("ratio_to_dense") or (None if dense is None or name == "dense" else row["ppl"] / dense)
            ax.text(row["ppl"], i, f" {row['ppl']:.3f}" + ("" if ratio is None else f"  ({ratio:.4f} x dense)"),
                    va="center", fontsize=8)
        ax.set_xlim(0, max(values) * 1.45)   # room for the value labels
        windows = f"{seqlen}-token windows" if count is None else f"{count} x {seqlen}-token windows"
        ax.set_title(", ".join([model + (f" rope {scaling}" if scaling else ""), *([text] if text else []), mode,
                                windows]) + ("" if tokens is None else f" ({tokens} tokens scored)"), fontsize=9,
                     loc="left")   # left-aligned: a long title runs into the free space right of the bars
        ax.tick_params(axis="x", labelsize=8)
    axes[-1, 0].set_xlabel("perplexity (lower is better)")
    fig.tight_layout()
    return fig


def _perplexity(records, path):
    plt = _pyplot()
    fig = _perplexity_figure(records)
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
