"""The package's layers run one way: the import-linter contracts of pyproject.toml ([tool.importlinter]) hold.

import-linter (grimp) reads a package from its folder on disk. In this repository kvpass.kernels.<family> and
kvpass.patterns.matchers live in the top-level kernels/ and patterns/ folders (setuptools package-dir), which an
editable install maps in at import time only, so grimp would see neither. The check therefore runs over the
package laid out as a wheel installs it: the repository's files copied by the package-dir mapping.
"""
import pathlib
import shutil
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).parents[1]

_CHECK = """
import sys, grimp
from importlinter.cli import lint_imports

graph = grimp.build_graph("kvpass")
expected = {"kvpass.kernels.attention", "kvpass.kernels.sparse_ffn.reference", "kvpass.patterns.matchers.attention"}
assert expected <= set(graph.modules), sorted(expected - set(graph.modules))
sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))
"""


def stage(destination: pathlib.Path) -> pathlib.Path:
    """Copy the package's Python files into destination/ as a wheel lays them out; returns destination."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(mapping.items()):  # "kvpass" first, then the folders mapped into it
        for source in (ROOT / folder).rglob("*.py"):
            if "__pycache__" in source.parts:
                continue
            target = destination.joinpath(*package.split("."), source.relative_to(ROOT / folder))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    return destination


def lint(staged: pathlib.Path) -> subprocess.CompletedProcess:
    """import-linter (the `test` extra) over the staged package, with pyproject.toml's contracts."""
    return subprocess.run([sys.executable, "-c", _CHECK, str(ROOT / "pyproject.toml")], cwd=staged,
                          capture_output=True, text=True)


def test_layers_run_one_way(tmp_path):
    result = lint(stage(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_wrong_way_import_breaks_the_contract(tmp_path):
    """The check is not vacuous: a kernel reaching up into the runtime fails it, named."""
    staged = stage(tmp_path)
    reference = staged / "kvpass/kernels/attention/reference.py"
    reference.write_text(reference.read_text() + "\nfrom kvpass.runtime import Runtime  # noqa: E402,F401\n")
    result = lint(staged)
    assert result.returncode != 0
    assert "kvpass.kernels.attention.reference -> kvpass.runtime" in result.stdout, result.stdout
