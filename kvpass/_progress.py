"""Progress bars when tqdm is installed (the `eval` extra) and wanted; the plain iterable otherwise."""
from __future__ import annotations


def progress(items, enabled: bool = True, unit: str = "it", desc: str | None = None):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, unit=unit, desc=desc, leave=False)
