import pathlib

from families import coverage_table

README = (pathlib.Path(__file__).parents[1] / "README.md").read_text()


def test_readme_coverage_table_is_the_tested_matrix():
    assert coverage_table() in README, "regenerate the table with: python tests/families.py"


def test_readme_setup_commands_are_what_ci_runs():
    ci = (pathlib.Path(__file__).parents[1] / ".ci/run").read_text()
    assert "bash .ci/setup && .venv/bin/python -m pytest -n 2 -q" in README
    assert ".venv/bin/python -m pytest -n 2 -q" in ci
