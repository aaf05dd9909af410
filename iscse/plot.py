"""Training curves from ``metrics.jsonl``: ``python -m iscse.plot RUN_DIR [RUN_DIR ...] [-o OUT.png]``.

One figure of six panels against the optimizer step: the loss, ``L_cl``, ``L_s``, alpha, the learning rate (the
``train`` records of :class:`~iscse.training.callbacks.MetricsLog`) and STS-B dev Spearman x100 (the ``eval``
records; the best one starred). With one run the per-step values are drawn faintly and their running mean over
them; with several, each run has its colour and the legend names its folder.

The trainer draws ``curves.png`` next to ``metrics.jsonl`` with :func:`write_curves` at every evaluation and at the
end of training (when matplotlib is installed). This module imports matplotlib only inside its functions, and uses
its object-oriented API with the Agg renderer: no window opens and the backend a notebook chose stays as it was.

On the command line, bad input (a missing folder, no ``metrics.jsonl``, a file with no records, matplotlib not
installed) ends with one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

__all__ = ["RunCurves", "read_run", "draw_curves", "write_curves", "main"]

PROG = "python -m iscse.plot"

#: The step panels: (record key, panel title).
STEP_PANELS = (("loss", "loss = L_cl + alpha * L_s"), ("L_cl", "L_cl (contrastive)"), ("L_s", "L_s (smoothing)"),
               ("alpha", "alpha"), ("lr", "learning rate"))


class RunCurves(NamedTuple):
    """The records of one run's ``metrics.jsonl``.

    Attributes:
        name: the label in a legend (the run folder's name).
        train: the ``event == "train"`` records (one per optimizer step: ``step``, ``loss``, ``L_cl``, ``L_s``,
            ``alpha``, ``lr``, ...), sorted by step, the last record kept where a step appears twice.
        eval: the ``event == "eval"`` records (``step``, ``eval_stsb_spearman``, ...), likewise.
    """

    name: str
    train: List[Dict]
    eval: List[Dict]


def _by_step(records: List[Dict]) -> List[Dict]:
    out: Dict[int, Dict] = {}
    for rec in records:
        if isinstance(rec.get("step"), (int, float)):
            out[int(rec["step"])] = rec
    return [out[s] for s in sorted(out)]


def read_run(run_dir: str | os.PathLike, name: Optional[str] = None) -> RunCurves:
    """Read ``run_dir/metrics.jsonl`` (``run_dir`` may also be the file itself).

    Lines that are not JSON objects (a line cut short by a crash) are skipped. Raises FileNotFoundError when the
    folder or the file is missing and ValueError when the file holds no ``train`` or ``eval`` record; the messages
    name the path.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / "metrics.jsonl"
    elif not path.exists():
        raise FileNotFoundError(f"{str(run_dir)!r} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} holds no metrics.jsonl (is it the --output_dir of a training run?)")
    train, evals = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict):
            continue
        if rec.get("event") == "train":
            train.append(rec)
        elif rec.get("event") == "eval":
            evals.append(rec)
    if not train and not evals:
        raise ValueError(f"{str(path)!r} holds no training or evaluation record yet")
    label = name if name is not None else (path.parent.resolve().name or str(path.parent))
    return RunCurves(label, _by_step(train), _by_step(evals))


def _running_mean(values: List[float], window: int) -> List[float]:
    """Trailing mean over ``window`` values, skipping non-finite ones (a NaN step leaves no hole in the mean);
    running sums, so linear in the number of steps."""
    sums, counts = [0.0], [0]
    for v in values:
        ok = math.isfinite(v)
        sums.append(sums[-1] + (v if ok else 0.0))
        counts.append(counts[-1] + ok)
    out = []
    for i in range(1, len(values) + 1):
        lo = max(0, i - window)
        n = counts[i] - counts[lo]
        out.append((sums[i] - sums[lo]) / n if n else float("nan"))
    return out


def _thin(xs: List, ys: List[float], most: int = 2000):
    """Every n-th point, so that at most about ``most`` are drawn (a long run's per-step values are a band at the
    figure's width anyway), the last point kept."""
    stride = max(1, math.ceil(len(xs) / most))
    if stride == 1:
        return xs, ys
    idx = list(range(0, len(xs), stride))
    if idx[-1] != len(xs) - 1:
        idx.append(len(xs) - 1)
    return [xs[i] for i in idx], [ys[i] for i in idx]


def _value(rec: Dict, key: str) -> float:
    v = rec.get(key)
    return float(v) if isinstance(v, (int, float)) else float("nan")


def draw_curves(runs: Sequence[RunCurves], output: str | os.PathLike, title: Optional[str] = None) -> Path:
    """Draw ``runs`` (one or more :class:`RunCurves`) into the PNG ``output``; returns its path.

    The file is replaced in one rename (a reader never sees half a PNG) and gets the user's umask. Raises
    ImportError when matplotlib is not installed, ValueError when ``runs`` is empty.
    """
    if not runs:
        raise ValueError("runs is empty: pass at least one RunCurves")
    try:
        import matplotlib  # noqa: F401 (first: without it, the submodules' imports below must fail too)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise ImportError("matplotlib is not installed (pip install matplotlib)") from None

    single = len(runs) == 1
    legend_rows = 0 if single else math.ceil(len(runs) / 4)
    height = 6.4 + 0.3 * legend_rows
    # Fixed margins rather than a layout engine: constrained layout doubles the drawing time, and the trainer draws
    # at every evaluation.
    fig = Figure(figsize=(12, height), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.06, right=0.985, top=1 - 0.62 / height, bottom=(0.55 + 0.3 * legend_rows) / height,
                        wspace=0.22, hspace=0.28)
    axes = fig.subplots(2, 3, sharex=True).ravel()
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    last_step = max([r.train[-1]["step"] for r in runs if r.train] + [r.eval[-1]["step"] for r in runs if r.eval])
    for i, run in enumerate(runs):
        color = palette[i % len(palette)] if not single else palette[0]
        steps = [rec["step"] for rec in run.train]
        window = max(1, round(len(steps) / 25))
        for ax, (key, _) in zip(axes, STEP_PANELS):
            values = [_value(rec, key) for rec in run.train]
            if not values or all(math.isnan(v) for v in values):
                continue
            smooth = key in ("loss", "L_cl", "L_s") and window > 1
            if smooth:
                ax.plot(*_thin(steps, values), color=color, alpha=0.3, lw=0.8,
                        label="per step" if single else None)
                ax.plot(*_thin(steps, _running_mean(values, window)), color=color, lw=1.6,
                        label=f"mean of {window} steps" if single else run.name)
            else:
                ax.plot(*_thin(steps, values), color=color, lw=1.6, label=None if single else run.name)
        ax = axes[5]
        ev = [(rec["step"], _value(rec, "eval_stsb_spearman")) for rec in run.eval]
        ev = [(s, v) for s, v in ev if math.isfinite(v)]
        if ev:
            ax.plot([s for s, _ in ev], [v for _, v in ev], "o-", color=color, lw=1.6, ms=4,
                    label=None if single else run.name)
            best_step, best = max(ev, key=lambda sv: sv[1])
            ax.plot([best_step], [best], "*", color=color, ms=13, mec="black", mew=0.6, zorder=3,
                    label=f"best {best:.2f} (step {best_step})" if single else None)
    for ax, (_, panel) in zip(axes, STEP_PANELS):
        ax.set_title(panel, fontsize=10)
    axes[5].set_title("STS-B dev (Spearman x100)", fontsize=10)
    if not any(r.eval for r in runs):
        axes[5].text(0.5, 0.5, "no evaluation in this run" if single else "no evaluation in these runs",
                     ha="center", va="center", transform=axes[5].transAxes, color="grey")
    if not any(r.train for r in runs):
        for ax in axes[:5]:
            ax.text(0.5, 0.5, "no training step recorded", ha="center", va="center", transform=ax.transAxes,
                    color="grey")
    # "%g" labels: the default's offset text ("1e-3" above the axis) collides with the panel title
    axes[4].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    lo, hi = axes[3].get_ylim()
    axes[3].set_ylim(min(0.0, lo), max(hi, 1e-3) * 1.1 if hi > 0 else 1.0)  # a constant alpha reads as one
    axes[4].set_ylim(bottom=min(0.0, axes[4].get_ylim()[0]))
    span = max(1, last_step)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_xlim(-0.02 * span, 1.02 * span)
    for ax in axes[3:]:
        ax.set_xlabel("optimizer step")
    if single:
        for ax, where in ((axes[0], "upper right"), (axes[5], "lower right")):
            if ax.get_legend_handles_labels()[0]:  # the per-step / mean legend only where there is a mean
                ax.legend(fontsize=8, loc=where)
    else:
        handles, labels = [], []
        for ax in axes:  # one entry per run, from whichever panel drew it first
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="lower center", ncols=min(len(labels), 4), fontsize=9, frameon=False)
    fig.suptitle(title if title is not None else
                 (f"{runs[0].name}: training curves" if single else "training curves"), fontsize=12)
    return _save(fig, Path(output))


def _save(fig, output: Path) -> Path:
    from ._io import current_umask

    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.tmp-", suffix=".png", dir=output.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png")
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return output


def write_curves(run_dir: str | os.PathLike) -> Path:
    """Draw ``run_dir/metrics.jsonl`` into ``run_dir/curves.png`` (what the trainer calls); returns the path.
    Raises as :func:`read_run` and :func:`draw_curves`."""
    run = read_run(run_dir)
    return draw_curves([run], Path(run_dir) / "curves.png")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m iscse.plot``: returns the exit status (0 written, 2 bad input)."""
    ap = argparse.ArgumentParser(
        prog=PROG, description="Draw the training curves of one run (loss, L_cl, L_s, alpha, lr, STS-B dev against "
                               "the step) from its metrics.jsonl, or of several runs in one figure.")
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a training --output_dir holding metrics.jsonl")
    ap.add_argument("-o", "--output", default=None,
                    help="the PNG to write (default: RUN_DIR/curves.png for one run, curves.png here for several)")
    ap.add_argument("--title", default=None, help="the figure's title (default: the run's folder name)")
    args = ap.parse_args(argv)
    try:
        runs = [read_run(d) for d in args.runs]
        names = [r.name for r in runs]
        if len(set(names)) < len(names):  # two folders called "run": label them by the path given instead
            runs = [r._replace(name=str(d).rstrip("/\\") or r.name) for r, d in zip(runs, args.runs)]
        output = Path(args.output) if args.output else (
            Path(args.runs[0]) / "curves.png" if len(runs) == 1 else Path("curves.png"))
        if output.is_dir():
            raise ValueError(f"-o {str(output)!r} is a folder; name the PNG file to write")
        draw_curves(runs, output, title=args.title)
    except (OSError, ValueError, ImportError) as exc:
        from ._io import first_line

        print(f"{PROG}: error: {first_line(exc)}", file=sys.stderr)
        return 2
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
