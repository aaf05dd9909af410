"""The package's layering (docs/concepts.md: Layering): no import circle, a light ``import iscse``, quiet ``python -m`` entry points.

The import graph is read statically (``ast``) from every module of ``iscse/``, ``kernels/`` (as ``iscse.kernels``) and
``bench/``: an edge is a module-level import of another module of the project (imports inside functions are lazy by
design and do not make a circle at import time, so they are not edges).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Set

import pytest

REPO = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["iscse", "kernels"] + parts[1:]
    elif parts[0] == "bench":
        parts = parts[1:]  # bench scripts import each other as top-level modules (their folder is on sys.path)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules(folder: str) -> Dict[str, Path]:
    return {_module_name(p): p for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts}


def _graph(mods: Dict[str, Path], lazy: bool = False) -> Dict[str, Set[str]]:
    """Imports between the given modules: module-level ones, and with ``lazy`` also those inside functions."""
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in (ast.walk(tree) if lazy else tree.body):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Try):  # optional imports at module level (try: import triton ...)
                for sub in node.body:
                    if isinstance(sub, ast.Import):
                        targets += [a.name for a in sub.names]
            for target in targets:
                # importing a.b.c also runs a and a.b
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    mod = ".".join(parts[:i])
                    # a module's own parent packages are initialised before it anyway: not an edge
                    if mod in mods and mod != name and not name.startswith(mod + "."):
                        graph[name].add(mod)
    return graph


def _cycle(graph: Dict[str, Set[str]]):
    state: Dict[str, int] = {}
    stack = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _package_graph(lazy: bool = False):
    mods = _modules("iscse")
    mods.update(_modules("kernels"))
    return _graph(mods, lazy)


@pytest.mark.parametrize("lazy", [False, True], ids=["module-level", "with-lazy-imports"])
def test_no_import_circle_in_the_package(lazy):
    """Not even through imports inside functions: no module calls back into one that imports it (the registry finds
    implementations by name, and they import only the interface)."""
    graph = _package_graph(lazy)
    # A package's __init__ importing its own submodules is the usual pattern, not a circle, as long as no submodule
    # imports its package's __init__ back: drop edges from a package to its children and look for any cycle.
    pruned = {m: {t for t in deps if not t.startswith(m + ".")} for m, deps in graph.items()}
    assert _cycle(pruned) is None, " -> ".join(_cycle(pruned))


def test_no_import_circle_in_bench():
    graph = _graph(_modules("bench"), lazy=True)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_layers_point_down():
    graph = _package_graph()
    # the Backend interface imports no implementation; kernels import nothing of iscse but themselves
    assert graph["iscse.backends.base"] == set()
    for name, deps in graph.items():
        if name.startswith("iscse.kernels"):
            assert all(d.startswith("iscse.kernels") for d in deps), (name, deps)
    # the ops core never imports training, evaluation or integrations at module level
    core = ["iscse", "iscse.buffer", "iscse.functional", "iscse.loss", "iscse.reference", "iscse.pddp",
            "iscse.hard_negatives", "iscse._validation"] + [m for m in graph if m.startswith("iscse.backends")]
    for name in core:
        bad = {d for d in graph[name] if d.split(".")[1:2] and d.split(".")[1] in ("training", "evaluation",
                                                                                  "integrations")}
        assert not bad, (name, bad)
    # FAISS is a kNN provider: it does not call back into the registry
    assert "iscse.backends" not in graph["iscse.backends.faiss_knn"]


def _run(code_or_args, **kw):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *code_or_args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120, **kw)


def test_import_iscse_is_light():
    heavy = ("transformers", "datasets", "scipy", "sklearn", "sentence_transformers", "faiss", "triton",
             "huggingface_hub", "accelerate", "matplotlib")
    code = ("import sys, iscse; print(sorted({m.split('.')[0] for m in sys.modules} & set(%r)))" % (heavy,))
    proc = _run(["-c", code])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
    assert proc.stderr == "", proc.stderr


@pytest.mark.parametrize("module", ["iscse.evaluate", "iscse.train", "iscse.download", "iscse.check", "iscse.plot"])
def test_entry_points_print_no_warning(module):
    proc = _run(["-W", "default", "-m", module, "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "usage: python -m " + module in proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr


def test_design_references_name_sections_of_the_concepts_page():
    """Docstrings cite the design as ``docs/concepts.md: <section>[; <section>]``: every cited section must be a
    heading of that page, and nothing may cite the old design file, which the repository does not have."""
    headings = sorted({line.lstrip("#").strip() for line in (REPO / "docs" / "concepts.md").read_text().splitlines()
                       if line.startswith("#")}, key=len, reverse=True)
    marker = "docs/concepts.md: "
    cited, missing, stale = 0, [], []
    for path in [*REPO.glob("iscse/**/*.py"), *REPO.glob("kernels/*.py"), *REPO.glob("tests/*.py"),
                 *REPO.glob("bench/*.py"), *REPO.glob("*.md"), *REPO.glob("docs/*.md")]:
        if path == Path(__file__).resolve():
            continue
        text = path.read_text(encoding="utf-8")
        if "DESIGN" + ".md" in text:
            stale.append(str(path.relative_to(REPO)))
        at = text.find(marker)
        while at >= 0:
            rest = text[at + len(marker):]
            while True:  # "<section>" or "<section>; <section>; ..."
                section = next((h for h in headings if rest.startswith(h)), None)
                if section is None:
                    missing.append((str(path.relative_to(REPO)), rest[:40]))
                    break
                cited += 1
                rest = rest[len(section):]
                if not rest.startswith("; "):
                    break
                rest = rest[2:]
            at = text.find(marker, at + 1)
    assert not stale, f"files citing the old design file: {stale}"
    assert cited, "no file cites docs/concepts.md: the test no longer finds the citations"
    assert not missing, f"citations of docs/concepts.md that start with none of its headings: {missing}"
