"""JSON records: every eval/bench command writes one, with what was run, where, and on which versions.

A record is {"command", "date", "config", "model", "environment": {versions, device}, "results": [...],
...extra}; `kvpass plot` and BENCHMARKS.md are produced from records, never typed in by hand.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import subprocess
from importlib import metadata

import torch


def environment() -> dict:
    versions = {}
    for package in ("kvpass", "torch", "triton", "transformers", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"versions": versions, "device": device, "python": platform.python_version(), "commit": _git_commit()}


def _git_commit() -> str | None:
    """The checkout's commit; KVPASS_COMMIT overrides it for copies whose git metadata is stale (a working tree
    shipped to another machine)."""
    if os.environ.get("KVPASS_COMMIT"):
        return os.environ["KVPASS_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=pathlib.Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_record(out_dir: str | pathlib.Path, command: str, results: list[dict], *, config: dict | None,
                 model: str | None, **extra) -> pathlib.Path:
    """Write `<out_dir>/<command>-<timestamp>.json` and return its path."""
    now = datetime.datetime.now(datetime.timezone.utc)
    record = {"command": command, "date": now.isoformat(timespec="seconds"), "config": config, "model": model,
              "environment": environment(), "results": results, **extra}
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{command.replace(' ', '-')}-{now.strftime('%Y%m%dT%H%M%S%f')}.json"
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return path


def load_records(paths) -> list[dict]:
    """Records from files and/or folders (every *.json inside); ValueError names a path that is missing or a file
    that is not a record."""
    records = []
    for path in map(pathlib.Path, paths):
        if not path.exists():
            raise ValueError(f"{str(path)!r} does not exist; give record files or folders of them (the eval and bench "
                             f"commands write them under their --out, e.g. runs/eval)")
        for file in sorted(path.glob("*.json")) if path.is_dir() else [path]:
            try:
                record = json.loads(file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"{str(file)!r} is not a JSON record ({error})") from None
            if not isinstance(record, dict) or "command" not in record:
                raise ValueError(f"{str(file)!r} is not a kvpass record (no 'command'); the eval and bench commands "
                                 f"write records")
            records.append(record)
    return records
