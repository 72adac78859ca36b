"""Finding data files inside installed packages without importing them (their own dependencies, e.g. a
model wheel's or gensim's, need not be installed)."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(package: str) -> Path | None:
    """The directory of the installed top-level `package` (import name), or None."""
    try:
        module = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    locations = list(module.submodule_search_locations or []) if module is not None else []
    return Path(locations[0]) if locations else None


def installed_file(package: str, member: str) -> Path | None:
    """`member` (a path relative to the package directory) if `package` is installed and holds it."""
    directory = package_dir(package)
    path = None if directory is None else directory / member
    return path if path is not None and path.is_file() else None
