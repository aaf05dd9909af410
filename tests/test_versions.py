"""The tested-versions table of docs/install.md stays true: its requirement column is setup.py's (always checked),
its GPU and CI columns satisfy those requirements, and, when CI runs (``CI=true``), the CI column is what is
installed."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "install.md"
PACKAGES = ("Python", "torch", "triton", "transformers", "sentence-transformers", "faiss-cpu")
REQUIREMENT, CI, GPU = "Requirement (setup.py)", "CI (CPU)", "GPU machine (not yet run on a GPU)"
NOT_RECORDED = "not recorded"


def version_table(text: str) -> dict:
    """{package: {column title: cell}} from the page's table whose first header cell is "Package"."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"^\|\s*Package\s*\|", line)), None)
    assert start is not None, f"{PAGE}: no table with a 'Package' column"
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    header = cells(lines[start])
    table = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        row = dict(zip(header, cells(line)))
        table[row["Package"].strip("`")] = row
    return table


def setup_requirements() -> dict:
    """{package: set of specifier strings} of every requirement written in setup.py, transformers' trainer range
    from iscse/training/_hf_adapter.py (setup.py reads it as text), Python's from python_requires."""
    setup = (REPO / "setup.py").read_text(encoding="utf-8")
    adapter = (REPO / "iscse" / "training" / "_hf_adapter.py").read_text(encoding="utf-8")
    found: dict = {}
    for name, spec in re.findall(r'"([A-Za-z][A-Za-z0-9_.-]*)((?:[<>=!~]=?[0-9][^",]*,?)+)"', setup + adapter):
        found.setdefault(name, set()).add(spec)
    found["Python"] = {re.search(r'python_requires="([^"]+)"', setup).group(1)}
    return found


def _main_requirement(package: str, found: dict) -> str:
    if package == "transformers":  # the trainer's range; the sentence-transformers extra alone admits more
        from_adapter = re.search(r'^TRANSFORMERS_REQUIREMENT = "transformers([^"]+)"', (
            REPO / "iscse" / "training" / "_hf_adapter.py").read_text(encoding="utf-8"), re.M).group(1)
        return from_adapter
    specs = found.get(package, set())
    assert len(specs) == 1, f"setup.py states {package} as {sorted(specs)}: one requirement expected"
    return next(iter(specs))


def _installed(package: str) -> str:
    if package == "Python":
        return platform.python_version()
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _same_release(table_value: str, installed: str) -> bool:
    """True when ``installed`` is the table's version at the table's precision (2.13.0 matches 2.13.0+cpu, 3.11
    matches 3.11.7)."""
    try:
        want, have = Version(table_value).release, Version(installed).release
    except Exception:
        return False
    return have[:len(want)] == want


def test_the_table_lists_the_tested_packages():
    table = version_table(PAGE.read_text(encoding="utf-8"))
    assert list(table) == list(PACKAGES)
    for package, row in table.items():
        assert {REQUIREMENT, CI, GPU} <= set(row), (package, row)


def test_the_requirement_column_is_setup_pys():
    text = PAGE.read_text(encoding="utf-8")
    table, found = version_table(text), setup_requirements()
    for package in PACKAGES:
        cell = table[package][REQUIREMENT].strip("`")
        want = _main_requirement(package, found)
        assert SpecifierSet(cell) == SpecifierSet(want), (
            f"docs/install.md says {package} {cell}, setup.py requires {package}{want}")
        for spec in found.get(package, ()):  # e.g. the sentence-transformers extra's looser transformers
            assert f"`{spec}`" in text, f"docs/install.md does not mention setup.py's {package}{spec}"


def test_the_ci_and_gpu_columns_satisfy_the_requirements():
    table, found = version_table(PAGE.read_text(encoding="utf-8")), setup_requirements()
    for package in PACKAGES:
        spec = SpecifierSet(_main_requirement(package, found))
        for column in (CI, GPU):
            value = table[package][column]
            if value == NOT_RECORDED:
                assert column == GPU, f"the CI column must give {package}'s version"
                continue
            assert Version(value) in spec, f"docs/install.md: {package} {value} ({column}) is outside {spec}"


def test_the_ci_torch_is_the_one_ci_installs_and_the_tested_transformers():
    from iscse.training._hf_adapter import TESTED_TRANSFORMERS

    table = version_table(PAGE.read_text(encoding="utf-8"))
    pin = re.search(r"torch==([0-9][^\s'\"]*)", (REPO / ".ci" / "run").read_text(encoding="utf-8")).group(1)
    assert table["torch"][CI] == pin, f"docs/install.md says CI runs torch {table['torch'][CI]}; .ci/run pins {pin}"
    for column in (CI, GPU):
        version = Version(table["transformers"][column])
        assert f"{version.major}.{version.minor}" in TESTED_TRANSFORMERS, (column, version, TESTED_TRANSFORMERS)


def test_every_extra_of_setup_py_is_on_the_page():
    setup = (REPO / "setup.py").read_text(encoding="utf-8")
    block = setup[setup.index("EXTRAS = {"):setup.index("setup(")]
    extras = set(re.findall(r'^\s*"([a-z][a-z0-9-]*)": \[', block, re.M)) | set(re.findall(r'EXTRAS\["([a-z-]+)"\]',
                                                                                           block))
    assert {"triton", "train", "demo", "dev"} <= extras
    text = PAGE.read_text(encoding="utf-8")
    missing = sorted(e for e in extras if f"`.[{e}]`" not in text)
    assert not missing, f"docs/install.md does not describe the extras {missing}"


@pytest.mark.skipif(os.environ.get("CI", "").lower() not in ("1", "true", "yes"),
                    reason="the CI column is checked where CI runs (CI=true): elsewhere other versions are fine")
def test_ci_installs_the_versions_of_the_table():
    table = version_table(PAGE.read_text(encoding="utf-8"))
    wrong = []
    for package in PACKAGES:
        value, installed = table[package][CI], _installed(package)
        if not _same_release(value, installed):
            wrong.append(f"{package}: docs/install.md's CI column says {value}, installed here: {installed}")
    assert not wrong, ("update the CI column of docs/install.md (or .ci/run) so that it says what CI installs:\n"
                       + "\n".join(wrong))


def test_the_release_comparison():
    assert _same_release("2.13.0", "2.13.0+cpu") and _same_release("3.11", "3.11.7")
    assert not _same_release("2.13.0", "2.13.1") and not _same_release("6.3.0", "not installed")
    assert not _same_release("3.11.7", "3.11")
