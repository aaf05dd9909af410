"""Plot GPU benchmark results (bench/gpu_bench.py JSON) for the README: speedup over the reference vs buffer size.

    python bench/plot.py out/gpu_bench.json [more.json ...] -o bench/results/speedup.png

Left panel: forward+backward speedup of each implementation over ``iscse.reference`` (same card, same run) against
the buffer size M (log scale); each point is labelled with its batch size. Right panel: each implementation's
forward+backward time as a multiple of the roofline floor. One line per (file, implementation, dtype); the title
names the card(s). Needs matplotlib (``pip install 'iscse[bench]'``).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


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
        cards.append(f"{doc.get('device', '?')} (torch {doc.get('torch')}, triton {doc.get('triton')})")
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


def main(argv=None) -> int:
    """Command line: result JSON files, ``-o`` the PNG."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", help="gpu_bench.json files")
    ap.add_argument("-o", "--output", default="bench/results/speedup.png", help="PNG to write")
    args = ap.parse_args(argv)
    plot(args.results, Path(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
