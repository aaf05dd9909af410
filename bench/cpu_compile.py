"""Eager vs ``torch.compile`` (Inductor) CPU step time of ISCSELoss, torch backend.

Two steps are timed, each compiled with ``fullgraph=True`` (``loss.backward()`` traced with Dynamo's
``trace_autograd_ops``):

- ``loss``: ``criterion(z1, z2)`` + backward on leaf embeddings ``(B, D)``;
- ``train``: a small encoder (``Linear(D, D)`` + tanh, two dropout-free views of one random batch perturbed by
  noise) + criterion + backward + a plain SGD update of the encoder.

Each criterion starts empty; the first ``--warmup`` steps (which fill the buffer: ``M / B`` steps) are not timed,
the first compiled call's time (tracing + compilation) is reported separately. Then eager and compiled steps are
timed in alternating blocks of 10 (so machine load hits both alike) and the medians with 20th/80th percentiles
printed, with the number of compiled graphs. One JSON line per step kind is printed and, with ``--out``, written.

Run: ``PYTHONPATH=$PWD python bench/cpu_compile.py [--threads 1]`` (defaults B=64, D=384, M=1024, k=16).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch._dynamo
from torch._dynamo.utils import counters

import iscse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchlib, also under PYTHONSAFEPATH=1
import benchlib  # noqa: E402


def _cpu_name() -> str:
    return benchlib.cpu_name()


def _make(kind: str, B: int, D: int, M: int, k: int, seed: int):
    torch.manual_seed(seed)
    crit = iscse.ISCSELoss(D, buffer_size=M, k=k, backend="torch",
                           alpha=iscse.alpha_schedule("cosine", total_steps=10_000))
    if kind == "loss":
        def step(z1, z2):  # z1, z2: leaves that require grad
            loss = crit(z1, z2)
            loss.backward()
            return loss.detach()
        return step, crit
    enc = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.Tanh())
    params = list(enc.parameters())

    def step(x1, x2):
        loss = crit(enc(x1), enc(x2))
        loss.backward()
        with torch.no_grad():
            for p in params:
                p.sub_(1e-3 * p.grad)
                p.grad = None
        return loss.detach()
    return step, crit


def _inputs(B, D, leaves=False):
    x = torch.randn(B, D)
    a, b = x + 0.1 * torch.randn(B, D), x + 0.1 * torch.randn(B, D)
    return (a.requires_grad_(), b.requires_grad_()) if leaves else (a, b)


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run(kind: str, B: int, D: int, M: int, k: int, warmup: int, steps: int) -> dict:
    torch._dynamo.reset()
    counters.clear()
    eager_step, _ = _make(kind, B, D, M, k, 0)
    comp_fn, comp_crit = _make(kind, B, D, M, k, 0)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(comp_fn, fullgraph=True)
        t0 = time.perf_counter()
        compiled(*_inputs(B, D, kind == 'loss'))
        first = time.perf_counter() - t0
        for _ in range(warmup):
            eager_step(*_inputs(B, D, kind == 'loss'))
            compiled(*_inputs(B, D, kind == 'loss'))
        times = {"eager": [], "compiled": []}
        for block in range(steps // 10):
            for name, fn in (("eager", eager_step), ("compiled", compiled)) if block % 2 == 0 else \
                    (("compiled", compiled), ("eager", eager_step)):
                for _ in range(10):
                    args = _inputs(B, D, kind == 'loss')
                    t0 = time.perf_counter()
                    fn(*args)
                    times[name].append(time.perf_counter() - t0)
    assert comp_crit.buffer.full
    row = {"step": kind, "B": B, "D": D, "M": M, "k": k, "backend": "torch", "first_compiled_call_s": round(first, 2),
           "graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
           "steps_timed": len(times["eager"])}
    for name, xs in times.items():
        row[f"{name}_ms"] = {"median": round(1e3 * statistics.median(xs), 3), "p20": round(1e3 * _pct(xs, 0.2), 3),
                             "p80": round(1e3 * _pct(xs, 0.8), 3)}
    row.update(cpu=_cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__,
               date=datetime.date.today().isoformat())
    return row


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``--help`` shows each default as the parser holds it."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--B", type=int, default=64, help="batch rows")
    p.add_argument("--D", type=int, default=384, help="embedding width")
    p.add_argument("--M", type=int, default=1024, help="buffer rows")
    p.add_argument("--k", type=int, default=16, help="neighbours per row")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps (compilation included)")
    p.add_argument("--steps", type=int, default=100, help="timed steps")
    p.add_argument("--kinds", nargs="+", default=["loss", "train"], choices=["loss", "train"], help="what to time")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads; not given: torch's own; 1 avoids OpenMP spin-waits on a loaded machine")
    p.add_argument("--out", default=None, help="also write the JSON lines to this file")
    return p


def main() -> None:
    args = build_parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [run(kind, args.B, args.D, args.M, args.k, args.warmup, args.steps) for kind in args.kinds]
    for row in rows:
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
