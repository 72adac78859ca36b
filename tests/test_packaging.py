import pathlib
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    mapping = setuptools["package-dir"]
    found = {".".join([package, *init.parent.relative_to(ROOT / folder).parts])
             for package, folder in mapping.items() for init in (ROOT / folder).rglob("__init__.py")}
    assert found == listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_import_does_not_initialise_cuda_nor_import_transformers():
    code = ("import sys, torch; before = set(sys.modules); import kvpass; assert not torch.cuda.is_initialized(); "
            "heavy = {m.split('.')[0] for m in set(sys.modules) - before} & {'transformers', 'triton'}; "
            "assert not heavy, heavy; import kvpass.kernels.attention, kvpass.patterns.matchers")
    subprocess.run([sys.executable, "-c", code], check=True)


# Every folder of the repository root but kvpass/ itself (the one package it means to provide).
TOP_LEVEL_FOLDERS = sorted(path.name for path in ROOT.iterdir()
                           if path.is_dir() and path.name != "kvpass" and path.name.isidentifier())


def test_top_level_folders_are_not_packages():
    """A folder of the repository root with an __init__.py is a regular package for any Python started there
    (`python`, `python -m pytest`): it would shadow an installed distribution of the same name, as kernels/ did
    Hugging Face's `kernels` (transformers 5.25 imports it). Without one it is a namespace portion, which loses."""
    packages = [name for name in TOP_LEVEL_FOLDERS if (ROOT / name / "__init__.py").exists()]
    assert not packages, f"remove __init__.py from {packages}; ship their packages through package-dir"


def test_every_package_under_kernels_and_patterns_is_mapped():
    mapped = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    for folder in ("kernels", "patterns"):
        for init in (ROOT / folder).glob("*/__init__.py"):
            assert str(init.parent.relative_to(ROOT)) in mapped, f"map {init.parent.relative_to(ROOT)} in package-dir"


def test_installed_distributions_win_over_repository_folders_in_the_repository_root():
    """Run where a new user runs: the repository root is sys.path[0]. Every top-level folder name is either not
    importable, or only a namespace (which any installed package of that name replaces), or comes from outside the
    repository; and transformers imports HF `kernels` where it is installed."""
    code = ("import importlib, importlib.util, pathlib, sys; root = pathlib.Path.cwd().resolve()\n"
            f"for name in {TOP_LEVEL_FOLDERS!r}:\n"
            "    try: module = importlib.import_module(name)\n"
            "    except ImportError: continue\n"
            "    if module.__file__ is None: continue\n"
            "    assert root / name not in pathlib.Path(module.__file__).resolve().parents, (name, module.__file__)\n"
            "if importlib.util.find_spec('kernels') is not None:\n"
            "    import transformers.integrations.hub_kernels, kernels\n"
            "    assert root / 'kernels' not in pathlib.Path(kernels.__file__).resolve().parents, kernels.__file__\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_kvpass_packages_resolve_to_the_repository_folders():
    code = ("import kvpass.kernels.attention as k, kvpass.patterns.matchers as p; "
            "print(k.__file__); print(p.__file__)")
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd="/", capture_output=True, text=True).stdout
    assert out.split() == [str(ROOT / "kernels/attention/__init__.py"), str(ROOT / "patterns/matchers/__init__.py")]
