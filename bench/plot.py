"""Charts of benchmark results: the GPU speedup chart (bench/gpu_bench.py JSON), and one chart per result file.

    python bench/plot.py out/gpu_bench.json [more.json ...] -o bench/results/speedup.png
    python bench/plot.py bench/results/*.json --out-dir docs/figures

With ``-o``: gpu_bench.py files only, drawn together in the two panels described below. With ``--out-dir``: one
PNG per file, named after it (``cpu-....json`` -> ``cpu-....png``), its kind read from its structure
(``bench/result_files.py``): bars of the median time per implementation, labelled with the speed over the file's
baseline (``reference``, else ``torch``), for the CPU step, kNN and ``iscse.check`` results; the accuracy per task
for the SentEval transfer results; the two panels below for a gpu_bench.py file. Each title names the machine and
the date the file records.

The GPU chart:
Left panel: forward+backward speedup of each implementation over ``iscse.reference`` (same card, same run) against
the buffer size M (log scale); each point is labelled with its batch size. Right panel: each implementation's
forward+backward time as a multiple of the roofline floor. One line per (file, implementation, dtype); the title
names the card(s) and the date(s). Needs matplotlib (``pip install 'iscse[bench]'``).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # result_files, also when imported by the tests

import result_files as R  # noqa: E402


def series(doc: dict, mode: str = "fwd+bwd"):
    """``{(impl, dtype): [(M, B, speedup, x_floor), ...]}`` sorted by M, for one result document."""
    rows = [r for r in doc.get("rows", []) if r.get("mode") == mode]
    ref = {(r["B"], r["M"], r["D"], r["k"], r["dtype"]): r["median_ms"] for r in rows if r["impl"] == "reference"}
    out = defaultdict(list)
    for r in rows:
        key = (r["B"], r["M"], r["D"], r["k"], r["dtype"])
        speedup = ref[key] / r["median_ms"] if key in ref and r["median_ms"] > 0 else float("nan")
        x_floor = r["median_ms"] / r["floor_ms"] if r.get("floor_ms") else float("nan")
        out[(r["impl"], r["dtype"])].append((r["M"], r["B"], speedup, x_floor))
    return {k: sorted(v) for k, v in out.items()}


def plot(paths, output: Path) -> None:
    """Write the two-panel PNG for the given result files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_f) = plt.subplots(1, 2, figsize=(13, 5))
    cards, colors = [], {}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for path in paths:
        doc = json.loads(Path(path).read_text())
        cards.append(f"{doc.get('device', '?')} (torch {doc.get('torch')}, triton {doc.get('triton')}), "
                     f"{str(doc.get('date', '?'))[:10]}")
        tag = f"{Path(path).stem}: " if len(paths) > 1 else ""
        for (impl, dtype), pts in sorted(series(doc).items()):
            label = f"{tag}{impl} {dtype}"
            color = colors.setdefault(label, palette[len(colors) % len(palette)])
            ms = [p[0] for p in pts]
            if impl != "reference":
                ax_s.plot(ms, [p[2] for p in pts], marker="o", label=label, color=color)
                for m, b, s, _ in pts:
                    ax_s.annotate(f"B={b}", (m, s), textcoords="offset points", xytext=(3, 3), fontsize=7,
                                  color=color)
            ax_f.plot(ms, [p[3] for p in pts], marker="o", label=label, color=color,
                      linestyle="--" if impl == "reference" else "-")
    for ax in (ax_s, ax_f):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("buffer size M")
        ax.grid(True, which="both", alpha=0.3)
    ax_s.axhline(1.0, color="grey", lw=0.8)
    ax_s.set_ylabel("forward+backward speedup over reference")
    ax_f.axhline(1.0, color="grey", lw=0.8)
    ax_f.set_ylabel("forward+backward time / roofline floor")
    ax_s.legend(fontsize=7)
    ax_f.legend(fontsize=7)
    fig.suptitle("IS-CSE step on " + "; ".join(sorted(set(cards))), fontsize=9)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=130)
    print(f"wrote {output}")


# ------------------------------------------------------------------------------------------- one chart per file

#: One colour per implementation / backend across all charts.
COLORS = {"reference": "#7f7f7f", "torch": "#1f77b4", "faiss": "#ff7f0e", "faiss-ivf": "#2ca02c", "auto": "#9467bd",
          "triton": "#d62728"}


def _bars(ax, groups: Sequence[str], series: "OrderedDict[str, List[Optional[float]]]",
          labels: Dict[str, List[str]], log: bool) -> None:
    """Grouped bars: ``series[name][i]`` is the height in group ``i`` (None: no bar), ``labels[name][i]`` the text
    above it."""
    n = max(1, len(series))
    width = 0.8 / n
    for j, (name, values) in enumerate(series.items()):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(groups))]
        pts = [(x, v, t) for x, v, t in zip(xs, values, labels.get(name, [""] * len(values))) if v is not None]
        ax.bar([p[0] for p in pts], [p[1] for p in pts], width * 0.92, label=name,
               color=COLORS.get(name, None), edgecolor="black", linewidth=0.4)
        for x, v, text in pts:
            if text:
                ax.annotate(text, (x, v), textcoords="offset points", xytext=(0, 2), ha="center", va="bottom",
                            fontsize=7.5)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8.5)
    if log:
        ax.set_yscale("log")
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi * 2.5)  # room for the labels above the tallest bar
    else:
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi * 1.08)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.set_axisbelow(True)


def _times(groups_rows, key: str, base: Optional[str]):
    """(group labels, series of median ms, labels "N ms" / "N ms (Sx)") from ``{group label: [rows]}``."""
    names = []
    for rows in groups_rows.values():
        for r in rows:
            if r[key] not in names and r["median_ms"] is not None:
                names.append(r[key])
    series = OrderedDict((n, []) for n in names)
    labels = {n: [] for n in names}
    for rows in groups_rows.values():
        by = {r[key]: r["median_ms"] for r in rows}
        base_ms = by.get(base)
        for n in names:
            ms = by.get(n)
            series[n].append(ms)
            s = R.speedup(base_ms, ms)
            text = "" if ms is None else f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"
            labels[n].append(text + ("" if s is None or n == base else f"\n{s:.1f}x"))
    return list(groups_rows), series, labels


def chart(res: "R.Result", output: Path) -> Path:
    """Write the chart of one result file (a :class:`result_files.Result` of kind step, knn, check or transfer)
    to ``output``; returns it."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.4), dpi=110, layout="constrained")
    ax = fig.subplots()
    note = ""
    if res.kind == "transfer":
        rows = R.transfer_rows(res.doc)
        series = OrderedDict([("test accuracy", [r["acc"] for r in rows])])
        _bars(ax, [r["task"] for r in rows], series, {"test accuracy": [f"{r['acc']:.1f}" for r in rows]}, log=False)
        ax.set_ylim(50, 100)
        avg = res.doc["results"]["transfer"].get("avg")
        if avg is not None:
            ax.axhline(avg, color="grey", lw=0.8, ls="--")
            ax.annotate(f"average {avg:.2f}", (len(rows) - 0.5, avg), xytext=(0, 3), textcoords="offset points",
                        ha="right", va="bottom", fontsize=8, color="dimgrey")
        ax.set_ylabel("accuracy (%)")
        ax.get_legend_handles_labels()  # one series: no legend
    else:
        if res.kind == "step":
            rows = R.step_rows(res.doc)
            key, base = "impl", R.baseline_of(r["impl"] for r in rows)
            groups = OrderedDict()
            for r in rows:
                groups.setdefault(f"M={r['M']:,}\n{r['mode']}", []).append(r)
            shapes = {(r["B"], r["D"], r["k"]) for r in rows}
        elif res.kind == "knn":
            rows = R.knn_rows(res.doc)
            key, base = "backend", "torch"
            groups = OrderedDict()
            for r in rows:
                groups.setdefault(f"M={r['M']:,}", []).append(r)
            shapes = {(r["B"], r["D"], r["k"]) for r in rows}
            recalls = [f"{r['M']:,}: {r['recall']:.2f}" for r in rows if r["recall"] is not None]
            if recalls:
                note = "faiss-ivf recall@16 at M=" + ", ".join(recalls)
        elif res.kind == "check":
            rows = R.check_rows(res.doc)
            key, base = "impl", "reference"
            groups = OrderedDict()
            for r in rows:
                groups.setdefault(f"M={r['M']:,}, {r['dtype']}", []).append(r)
            shapes = {(r["B"], r["D"], r["k"]) for r in rows}
            untimed = sorted({r["impl"] for r in rows if r["median_ms"] is None})
            notes = []
            if untimed:
                notes.append(", ".join(untimed) + ": " + "; ".join(sorted({r["note"] or "not timed" for r in rows
                                                                           if r["median_ms"] is None})))
            load = (res.doc.get("environment", {}).get("load_average") or [None])[0]
            if load is not None and load > 1.5:
                notes.append(f"load average {load:.1f} at the start: the times are upper bounds")
            note = "\n".join(notes)
        else:
            raise ValueError(f"{res.path}: no chart for kind {res.kind!r}")
        labels, series, texts = _times(groups, key, base)
        heights = [v for vs in series.values() for v in vs if v]
        log = max(heights) / min(heights) > 8  # a log axis for spans over an order of magnitude, else from 0
        _bars(ax, labels, series, texts, log=log)
        ax.set_ylabel("median time (ms, log scale)" if log else "median time (ms)")
        shape = ", ".join(f"B={b}, D={d}, k={k}" for b, d, k in sorted(shapes))
        # beside the axes, never over a bar
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title_fontsize=8,
                  title=f"{shape}\nlabels: ms" + (f",\nspeed vs {base}" if base else ""), alignment="left")
    if note:
        ax.text(0.99, 0.98, note, transform=ax.transAxes, ha="right", va="top", fontsize=7.5, color="dimgrey")
    fig.suptitle(f"{res.title}\n{res.machine}, {res.date}", fontsize=10)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    print(f"wrote {output}")
    return output


def main(argv=None) -> int:
    """Command line: result JSON files, ``-o`` the PNG."""
    ap = argparse.ArgumentParser(prog="python bench/plot.py", description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", help="result JSON files")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("-o", "--output", default=None,
                       help="one PNG of all the gpu_bench.json files given (default bench/results/speedup.png)")
    where.add_argument("--out-dir", default=None, help="one PNG per result file, of any kind, in this folder")
    args = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("bench/plot.py: error: matplotlib is not installed (pip install 'iscse[bench]')", file=sys.stderr)
        return 2
    if args.out_dir is None:
        try:
            kinds = {p: R.load(p).kind for p in args.results}
        except ValueError as exc:
            print(f"bench/plot.py: error: {exc}", file=sys.stderr)
            return 2
        other = [p for p, kind in kinds.items() if kind != "gpu"]
        if other:
            print(f"bench/plot.py: error: {other[0]} is not a gpu_bench.py result: draw it with --out-dir DIR",
                  file=sys.stderr)
            return 2
        plot(args.results, Path(args.output or "bench/results/speedup.png"))
        return 0
    for path in args.results:
        try:
            res = R.load(path)
        except ValueError as exc:
            print(f"bench/plot.py: error: {exc}", file=sys.stderr)
            return 2
        out = Path(args.out_dir) / f"{Path(path).stem}.png"
        if res.kind == "gpu":
            plot([path], out)
        else:
            chart(res, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
