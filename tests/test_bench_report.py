"""``bench/report.py`` (the tables of ``docs/benchmarks.md``) and ``bench/plot.py --out-dir`` (the charts).

- The committed generated block of ``docs/benchmarks.md`` is what ``bench/report.py`` makes of ``bench/results/*.json``
  now (``--check``): a new or changed result file fails this test until the page is regenerated.
- Only the text between the markers is replaced; a page without them gets them at its end; ``--check`` writes
  nothing and says what to run.
- Every result file is of a known kind, and its section names the machine and the date recorded in it.
- ``bench/plot.py --out-dir`` draws a chart per result file.
"""
import importlib.util
import json
import shutil
import sys

import pytest

from conftest import REPO


def _load(name):
    """Import bench/<name>.py (bench/ is not a package) under a private module name."""
    key = f"_iscse_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.fixture(scope="module")
def report():
    return _load("report")


def test_committed_benchmarks_page_is_current(report, capsys):
    assert report.main(["--check"]) == 0, capsys.readouterr().err


def test_every_result_file_has_a_section_with_its_machine_and_date(report):
    block = report.generate()
    files = sorted(p.name for p in (REPO / "bench" / "results").glob("*.json"))
    assert files, "bench/results holds no result file"
    for name in files:
        doc = json.loads((REPO / "bench" / "results" / name).read_text())
        date = (doc.get("datetime") or doc.get("date") or doc.get("environment", {}).get("date"))[:10]
        section = block[block.index(f"`bench/results/{name}`") - 300:block.index(f"`bench/results/{name}`")]
        assert date in section and "AMD EPYC" in section, (name, section)
    # the speeds are ratios to the baseline measured in the same file: reference / torch at M=1024, forward+backward
    assert "| 64 | 1024 | 768 | 16 | forward+backward | `torch` | 4.16 | 11.8x |" in block


def test_only_the_block_between_the_markers_is_replaced(report, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(REPO / "bench" / "results", results)
    page = tmp_path / "benchmarks.md"
    before, after = "# Benchmarks\n\nProse before.\n\n", "\n\nProse after, kept.\n"
    page.write_text(before + report.BEGIN + "\nstale\n" + report.END + after)
    argv = ["--results", str(results), "--doc", str(page)]
    assert report.main(argv + ["--check"]) == 1
    assert "run python bench/report.py" in capsys.readouterr().err
    assert "stale" in page.read_text()  # --check writes nothing
    assert report.main(argv) == 0
    text = page.read_text()
    assert text.startswith(before + report.BEGIN) and text.endswith(report.END + after) and "stale" not in text
    assert report.main(argv + ["--check"]) == 0
    # a new result file makes the page stale again
    (results / "transfer-copy.json").write_text((results / next(
        p.name for p in results.glob("transfer-*.json"))).read_text())
    assert report.main(argv + ["--check"]) == 1


def test_a_page_without_markers_gets_them_at_its_end(report, tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nIntro.\n")
    assert report.main(["--doc", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# Benchmarks\n\nIntro.\n\n" + report.BEGIN) and text.endswith(report.END + "\n")
    assert report.splice("x", "B") == "x\n\nB\n"
    with pytest.raises(ValueError, match="more than once"):
        report.splice(report.BEGIN + report.BEGIN + report.END, "B")


def test_an_unknown_result_file_is_named(report, tmp_path, capsys):
    (tmp_path / "odd.json").write_text('{"what": 1}')
    assert report.main(["--results", str(tmp_path), "--doc", str(tmp_path / "p.md"), "--print"]) == 2
    err = capsys.readouterr().err
    assert "odd.json" in err and err.count("\n") == 1


def test_plot_draws_one_chart_per_result_file(tmp_path):
    pytest.importorskip("matplotlib")
    plot = _load("plot")
    files = sorted((REPO / "bench" / "results").glob("*.json"))
    kinds = {}
    for path in files:  # one file of each kind: the drawing of each kind is what can break
        kinds.setdefault(_load("result_files").load(path).kind, path)
    assert plot.main([str(p) for p in kinds.values()] + ["--out-dir", str(tmp_path)]) == 0
    for path in kinds.values():
        assert (tmp_path / f"{path.stem}.png").read_bytes()[:4] == b"\x89PNG"
    # -o is the GPU chart: a CPU result is refused with a pointer to --out-dir
    assert plot.main([str(files[0]), "-o", str(tmp_path / "x.png")]) == 2


def test_committed_figures_are_modest_pngs():
    figures = sorted((REPO / "docs" / "figures").glob("*.png"))
    assert figures
    for png in figures:
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size < 200_000, png.name
