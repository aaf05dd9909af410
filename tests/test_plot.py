"""Training curves (:mod:`iscse.plot`) and the trainer's ``curves.png`` (:class:`~iscse.training.callbacks.CurvesPlot`).

- ``python -m iscse.plot``: one run (into ``RUN_DIR/curves.png``) and several in one figure; bad input (a missing
  folder, no ``metrics.jsonl``, a file with no record, matplotlib missing) ends with one line on stderr, status 2.
- :func:`~iscse.plot.read_run` keeps the last record of a step and skips a line cut short by a crash.
- ``CurvesPlot``: draws on the main process only; without matplotlib it writes nothing and logs one debug line; a
  drawing that fails logs one warning, then debug lines, and never raises.

The trainer's own ``curves.png`` (a real run) is checked in ``test_train.py`` on its shared run.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from iscse import plot as P

PNG = b"\x89PNG\r\n\x1a\n"


def _size(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG, path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def write_run(folder: Path, steps: int = 30, evals=(0, 10, 20, 30), scale: float = 1.0) -> Path:
    """A run folder with a ``metrics.jsonl`` as the trainer writes it: train records every step (an L_s of 0 while
    the buffer fills), eval records at ``evals``, a test record, and a torn last line."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        l_cl, l_s = scale * (2.0 / step + 0.1), (0.0 if step < 4 else 0.5 + 0.01 * step)
        lines.append({"event": "train", "step": step, "epoch": step / 100, "loss": l_cl + 0.1 * l_s, "L_cl": l_cl,
                      "L_s": l_s, "alpha": 0.1, "lr": 5e-5 * (1 - step / (steps + 1))})
        if step in evals:
            lines.append({"event": "eval", "step": step, "eval_stsb_spearman": 60 + step * scale,
                          "eval_avg_sts": 60.0, "best": True})
    if 0 in evals:
        lines.insert(0, {"event": "eval", "step": 0, "eval_stsb_spearman": 55.0, "eval_avg_sts": 55.0, "best": True})
    lines.append({"event": "test", "step": steps, "test_avg": 70.0})
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"event": "train", "st'
    (folder / "metrics.jsonl").write_text(text, encoding="utf-8")
    return folder


def test_read_run_sorts_by_step_keeps_the_last_record_and_skips_torn_lines(tmp_path):
    run = write_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as fh:  # a step logged again (the newest record wins)
        fh.write("\n" + json.dumps({"event": "train", "step": 3, "loss": 9.0, "L_cl": 9.0, "L_s": 0.0}) + "\n")
    curves = P.read_run(run)
    assert curves.name == "run"
    assert [r["step"] for r in curves.train] == list(range(1, 31))
    assert curves.train[2]["loss"] == 9.0
    assert [r["step"] for r in curves.eval] == [0, 10, 20, 30]
    assert P.read_run(run / "metrics.jsonl").train == curves.train  # the file itself works too


def test_cli_draws_one_run_into_its_folder_and_several_into_one_figure(tmp_path, capsys):
    a = write_run(tmp_path / "a")
    b = write_run(tmp_path / "b", evals=(), scale=1.5)  # a run that never evaluated
    assert P.main([str(a)]) == 0
    assert _size(a / "curves.png") == (1200, 640)
    assert "wrote" in capsys.readouterr().out
    out = tmp_path / "figs" / "both.png"
    assert P.main([str(a), str(b), "-o", str(out), "--title", "a vs b"]) == 0
    width, height = _size(out)
    assert width == 1200 and height > 640  # room for the legend of the runs below the panels
    assert not list(out.parent.glob(".both.png.tmp-*"))


@pytest.mark.parametrize("case", ["missing folder", "no metrics.jsonl", "empty file", "only a torn line",
                                  "output is a folder", "no matplotlib"])
def test_cli_bad_input_is_one_line_and_status_2(case, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    argv = [str(run)]
    if case == "missing folder":
        argv = [str(tmp_path / "nope")]
    elif case == "empty file":
        (run / "metrics.jsonl").write_text("")
    elif case == "only a torn line":
        (run / "metrics.jsonl").write_text('{"event": "tr')
    elif case == "output is a folder":
        write_run(run)
        argv += ["-o", str(tmp_path)]
    elif case == "no matplotlib":
        write_run(run)
        monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert P.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m iscse.plot: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not (run / "curves.png").exists()
    expected = {"missing folder": "does not exist", "no metrics.jsonl": "holds no metrics.jsonl",
                "empty file": "no training or evaluation record", "only a torn line": "no training or evaluation",
                "output is a folder": "is a folder", "no matplotlib": "matplotlib is not installed"}[case]
    assert expected in err


def _state(main: bool = True):
    return SimpleNamespace(is_world_process_zero=main)


def test_curves_callback_draws_on_the_main_process_only(tmp_path, monkeypatch):
    from iscse.training.callbacks import CurvesPlot

    pytest.importorskip("matplotlib")
    drawn = []
    monkeypatch.setattr(P, "write_curves", drawn.append)  # the drawing itself: test_cli_* and test_train.py
    run = write_run(tmp_path / "run")
    other = CurvesPlot(run)
    other.on_evaluate(None, _state(main=False), None)
    other.on_train_end(None, _state(main=False), None)
    assert other.drawn == 0 and drawn == []
    cb = CurvesPlot(run, min_interval_s=3600.0)
    cb.on_train_begin(None, _state(), None)
    cb.on_evaluate(None, _state(), None)  # an evaluation within min_interval_s of the start does not draw
    assert cb.drawn == 0
    cb.on_train_end(None, _state(), None)  # the end always does
    assert cb.drawn == 1 and drawn == [run]
    cb = CurvesPlot(run, min_interval_s=0.0)
    cb.on_train_begin(None, _state(), None)
    cb.on_evaluate(None, _state(), None)
    cb.on_evaluate(None, _state(), None)
    assert cb.drawn == 2 and drawn == [run] * 3


def test_curves_callback_is_quiet_without_matplotlib(tmp_path, monkeypatch, caplog):
    from iscse.training.callbacks import CurvesPlot

    run = write_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an import of it raises ImportError
    cb = CurvesPlot(run)
    with caplog.at_level(logging.DEBUG, logger="iscse"):
        cb.on_evaluate(None, _state(), None)
        cb.on_evaluate(None, _state(), None)
        cb.on_train_end(None, _state(), None)
    assert cb.drawn == 0 and not cb.enabled and not (run / "curves.png").exists()
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]  # one line, at debug level


def test_a_failing_drawing_logs_once_and_never_raises(tmp_path, monkeypatch, caplog):
    from iscse.training.callbacks import CurvesPlot

    pytest.importorskip("matplotlib")
    calls = []

    def broken(run_dir):
        calls.append(run_dir)
        raise RuntimeError("the disk is full\nsecond line")

    monkeypatch.setattr(P, "write_curves", broken)
    cb = CurvesPlot(write_run(tmp_path / "run"), min_interval_s=0.0)
    with caplog.at_level(logging.DEBUG, logger="iscse"):
        for _ in range(3):
            cb.on_evaluate(None, _state(), None)
        cb.on_train_end(None, _state(), None)
    assert len(calls) == 4 and cb.drawn == 0
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING] + [logging.DEBUG] * 3
    assert "the disk is full" in caplog.records[0].getMessage()
    assert "second line" not in caplog.records[0].getMessage()


def test_running_mean_skips_nan_and_matches_a_direct_mean():
    import random

    rnd = random.Random(5)
    values = [rnd.random() if rnd.random() > 0.1 else float("nan") for _ in range(101)]
    for window in (1, 3, 7):
        got = P._running_mean(values, window)
        for i, g in enumerate(got):
            kept = [v for v in values[max(0, i + 1 - window):i + 1] if v == v]
            want = sum(kept) / len(kept) if kept else float("nan")
            assert (g != g and want != want) or abs(g - want) < 1e-12, (window, i)
    xs, ys = P._thin(list(range(4001)), [float(i) for i in range(4001)], most=2000)
    assert len(xs) <= 2002 and xs[0] == 0 and xs[-1] == 4000 and ys == [float(x) for x in xs]
