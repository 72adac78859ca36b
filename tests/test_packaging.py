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
            "assert not heavy, heavy; import kvpass.kernels.attention, kvpass.patterns")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_generic_top_level_packages_are_importable_from_site():
    code = "import importlib.util as u; assert u.find_spec('kernels') is None and u.find_spec('patterns') is None"
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
