"""CPU time of one IS-CSE step under the paper's ablations: grouping knn|pddp x aggregation attention|mean.

For each combination, the torch backend and the reference transcription (``iscse.reference.iscse_step``) run one
step (forward + the gradients of ``z1, z2``) on a full buffer of random unit rows, after a warm-up; medians of
``--reps`` calls, interleaved across the eight configurations. Prints one JSON line per configuration and a table.

Run: ``PYTHONPATH=$PWD python bench/cpu_ablations.py [--threads 1] [--reps 5]`` (defaults B=64, D=768, M=1024, k=16).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import iscse
from iscse import reference as R

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchlib, also under PYTHONSAFEPATH=1
import benchlib  # noqa: E402

_MODE = {"knn": "knn", "pddp": "pddp"}
_AGGR = {"attention": "attn", "mean": "mean"}


def _step(impl: str, grouping: str, aggregation: str, B: int, M: int, D: int, k: int):
    z1 = torch.randn(B, D, requires_grad=True)
    z2 = torch.randn(B, D, requires_grad=True)
    rows = F.normalize(torch.randn(M, D), dim=1)
    if impl == "reference":
        def loss():
            return R.iscse_step(z1, z2, rows, k=k, mode=_MODE[grouping], aggr=_AGGR[aggregation]).loss
    else:
        buf = iscse.MemoryBuffer(M, D)
        buf.push(rows)

        def loss():
            return iscse.iscse_loss(z1, z2, buf, k=k, backend=impl, grouping=grouping, aggregation=aggregation)
    return lambda: torch.autograd.grad(loss(), (z1, z2))


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``--help`` shows each default as the parser holds it."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--B", type=int, default=64, help="batch rows")
    ap.add_argument("--M", type=int, default=1024, help="buffer rows")
    ap.add_argument("--D", type=int, default=768, help="embedding width")
    ap.add_argument("--k", type=int, default=16, help="neighbours per row")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per configuration")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; not given: torch's own")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    configs = [(impl, g, a) for g in ("knn", "pddp") for a in ("attention", "mean") for impl in ("torch", "reference")]
    steps = {c: _step(*c, args.B, args.M, args.D, args.k) for c in configs}
    for fn in steps.values():
        fn()  # warm-up
    times = {c: [] for c in configs}
    for _ in range(args.reps):
        for c, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[c].append(1e3 * (time.perf_counter() - start))
    env = benchlib.environment(())
    for (impl, g, a), t in times.items():
        row = dict(impl=impl, grouping=g, aggregation=a, B=args.B, M=args.M, D=args.D, k=args.k,
                   **benchlib.summarize_ms(t), **env)
        print(json.dumps(row))
    print(f"{'grouping':9} {'aggregation':12} {'torch ms':>10} {'reference ms':>13}")
    for g in ("knn", "pddp"):
        for a in ("attention", "mean"):
            t, r = (benchlib.summarize_ms(times[(i, g, a)])["median_ms"] for i in ("torch", "reference"))
            print(f"{g:9} {a:12} {t:10.1f} {r:13.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
