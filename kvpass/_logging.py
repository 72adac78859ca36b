"""Logging switches (all read at use time, so tests can set them).

| variable | effect |
|---|---|
| `KVPASS_LOGS` | `warning` (default), `info` (match table of every compile), `debug` (every candidate node and the reason it did or did not match) |
| `KVPASS_EXPLAIN` | comma-separated FX node names (e.g. `scaled_dot_product_attention_3`): log at warning level why each of them did or did not match |
"""
from __future__ import annotations

import logging
import os

logger = logging.getLogger("kvpass")


def configure_from_env() -> None:
    level = os.environ.get("KVPASS_LOGS", "").strip().upper()
    if not level:
        return
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"KVPASS_LOGS={level.lower()!r} is not a level; use debug, info, warning or error")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[kvpass] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def explained_nodes() -> set[str]:
    return {name.strip() for name in os.environ.get("KVPASS_EXPLAIN", "").split(",") if name.strip()}
