"""``python -m iscse.check``: the diagnostic to run on a new machine and to attach to a bug report.

It prints, as a table on stdout (progress goes to stderr, a line per group of checks):

- **Environment**: Python, the platform, iscse (version and where it was imported from), torch, CUDA, Triton,
  FAISS, ``TRITON_INTERPRET``, the CPU's name and the flags that matter for the CPU paths (AVX2, AVX-512,
  AVX-512-BF16, AMX; from ``/proc/cpuinfo`` where there is one, else "unknown"), torch's CPU capability and threads,
  and on a GPU its name, memory, compute capability, SM count and the driver version.
- **Verification**: every backend that :func:`iscse.backends.available_backends` lists for the device, each called
  by name through the functional API (``backend=name``, which is never second-guessed), against
  :mod:`iscse.reference` in float64 on the same (rounded) inputs, on a few shapes ``(B, M, D, k)`` including odd
  ones (``B = 1``, ``k = 1``, ``M = B + k``, ``D`` not a power of two; in the full mode also ``k = 64``
  and the paper's ``(64, 1024, 768, 16)``), fp32 and bf16 inputs (the buffer in fp32, :class:`iscse.ISCSELoss`'s default; the kNN
  also with a bf16 buffer), both aggregations (``"attention"``, ``"mean"``):

  - ``knn_topk``: the exact (float64) similarities of the returned neighbours equal those of the reference's
    neighbours (:func:`iscse.reference.knn`), so that tied neighbours may come in either order; the returned values
    are the exact dot products, sorted; the query's own slot is never returned;
  - ``smooth``: ``z*`` and the gradient of ``q`` (a random upstream gradient) against
    :func:`iscse.reference.aggregate`;
  - ``info_nce``: the loss and both gradients against :func:`iscse.reference.cos_sim_ce`;
  - ``step``: one :func:`iscse.iscse_loss` step on a full buffer whose write pointer is mid-ring: ``L_cl``, ``L_s``,
    the loss, the gradients of ``z1`` and ``z2`` (separate random upstream gradients for the two components) and the
    pushed buffer, against the paper's step composed of :mod:`iscse.reference`'s ops (push, kNN with rank 0
    dropped, aggregation, the two cross-entropies). The reference searches with the row the backend stored, so a
    rounding of ``q2`` in the buffer (bf16 inputs) cannot swap two near-tied neighbours between the two.

  A kNN-only backend (FAISS) gets ``knn_topk`` and the step (its neighbours, the device's default for the rest). On
  CUDA the fused Triton step is checked in both of its modes (gradients made in backward from what the forward held,
  and made in forward: ``iscse.kernels.iscse_loss.HOLD_MAX_BYTES``; every combination on the largest shape, spread
  over the others: :func:`plan`), and every backend that makes no host read
  replays a captured CUDA graph of an :class:`iscse.ISCSELoss` training step against eager steps (the buffer filling
  and then full). Under ``TRITON_INTERPRET=1`` on CPU the Triton backend is verified in the interpreter on tiny
  shapes only, its modes and dtypes spread over them (the interpreter takes about a second a step).
  Each check records its worst error against its tolerance (per dtype; :data:`TOLERANCES`).
- **Timing**: forward + backward of one step on a full buffer for every backend, and for the paper's step
  (:func:`iscse.reference.iscse_step`) in the same run, interleaved, medians after a warm-up
  (``triton.testing.do_bench`` medians on a GPU, wall clock on a CPU), at the paper's shape ``(64, 1024, 768, 16)``
  and a large one (``(512, 65536, 1024, 16)`` on a GPU, fp32 and bf16; ``(64, 65536, 768, 16)`` on a CPU, fp32),
  as a ratio to the reference; on a GPU also next to the roofline floor (:mod:`iscse._roofline`: bytes over the
  measured copy bandwidth, FLOPs over the measured bf16 matmul rate of the same card). The Triton backend is not
  timed in the interpreter.

Flags: ``--quick`` (fewer shapes, the paper's shape only for timing: under a minute on a 2-core CPU), ``--json PATH``
(everything above, machine-readable: the environment, every check with its errors and tolerances, every timing with
its shape, dtype, median and ratio), ``--device`` (default: ``cuda`` when available, else ``cpu``), ``--backends``
(a comma-separated subset), ``--no-timing`` (verification only), ``--seed`` (inputs are drawn on the CPU from it, so
they are the same on every machine).

Exit status: 0 when every verification passed, 1 when any failed (or raised), 2 for bad arguments (one line on
stderr), 3 when interrupted (SIGINT, e.g. ``timeout -s INT``) before the end with no failure so far; an interrupted
run still prints and writes what it checked and timed. A backend that is listed as available but cannot run on the device at all (e.g. a CPU-only FAISS with CUDA
tensors) is reported as unusable, not as a failure.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
import zlib
from importlib import metadata
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import iscse
from iscse._io import write_json_atomic
from iscse import reference as R
from iscse.backends import available_backends, get_backend

__all__ = ["main", "environment", "gpu_driver", "verify_backend", "graph_replay_check", "time_backends", "TOLERANCES",
           "QUICK_SHAPES", "FULL_SHAPES", "INTERPRETER_SHAPES"]

TEMPERATURE, ATTN_TEMPERATURE, ALPHA = 0.05, 2.0, 0.3
AGGREGATIONS = ("attention", "mean")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# (B, M, D, k). The full mode adds k = 64, more odd shapes and the paper's shape (float64 references at that size
# take seconds on a small CPU).
QUICK_SHAPES = [(1, 9, 13, 1), (5, 12, 20, 7), (33, 130, 96, 16)]
FULL_SHAPES = [(1, 24, 13, 4), (5, 21, 96, 16), (33, 70, 100, 1), (17, 300, 384, 64), (64, 1024, 768, 16)]
INTERPRETER_SHAPES = [(1, 9, 13, 1), (5, 12, 20, 7)]  # B = 1 and k = 1; M = B + k, D not a power of two
TIMING_SHAPES = {"cpu": [(64, 1024, 768, 16), (64, 65536, 768, 16)],
                 "cuda": [(64, 1024, 768, 16), (512, 65536, 1024, 16)]}

#: Tolerances by input dtype and quantity: relative errors (``max |got - want| / max |want|``), except ``"sims"``
#: (the neighbours' exact similarities, absolute: they lie in [-1, 1]). bf16 inputs are rounded before the float64
#: reference sees them; what remains is the backend's own low-precision arithmetic (``q2`` is normalised in bf16,
#: gradients are returned in bf16). A bf16 buffer searches in bf16, so neighbours one bf16 step apart may swap, and
#: the reference backend's values are its bf16 dot products (the paper's code computes in the buffer's dtype).
TOLERANCES = {
    "fp32": {"sims": 1e-5, "vals": 1e-5, "value": 1e-4, "grad": 1e-4, "buffer": 1e-6},
    "bf16": {"sims": 1e-5, "vals": 1e-5, "value": 2e-2, "grad": 3e-2, "buffer": 1e-2},
    "bf16, bf16 buffer": {"sims": 1.6e-2, "vals": 8e-3},
}


# ------------------------------------------------------------------------------------------------- environment

def _cpu_info() -> Dict[str, object]:
    """The CPU's name and the flags the CPU paths care about, from ``/proc/cpuinfo`` (Linux); None where unknown."""
    name, flags = None, None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and name is None:
                    name = value.strip()
                elif key in ("flags", "Features") and flags is None:  # x86 / ARM
                    flags = set(value.split())
                if name and flags is not None:
                    break
    except OSError:
        pass
    info: Dict[str, object] = {"name": name or platform.processor() or platform.machine() or "unknown",
                               "cores": os.cpu_count()}
    wanted = {"AVX2": "avx2", "AVX-512F": "avx512f", "AVX-512-BF16": "avx512_bf16", "AVX-512-VNNI": "avx512_vnni",
              "AMX-TILE": "amx_tile", "AMX-BF16": "amx_bf16", "AMX-INT8": "amx_int8"}
    info["flags"] = None if flags is None else {label: flag in flags for label, flag in wanted.items()}
    info["torch_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def _version(module: str, dists: Tuple[str, ...]) -> Optional[str]:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        return getattr(__import__(module), "__version__", "unknown")
    except ImportError:
        return None


def _git_commit(folder: str) -> Optional[str]:
    """The short commit of the checkout ``folder`` is in, ``+changes`` when tracked files differ from it; None
    outside a git checkout (an installed package)."""
    try:
        head = subprocess.run(["git", "-C", folder, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode or not head.stdout.strip():
            return None
        dirty = subprocess.run(["git", "-C", folder, "status", "--porcelain", "--untracked-files=no", "."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_driver() -> Optional[str]:
    """The NVIDIA driver version (``nvidia-smi``), or None where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> Dict[str, object]:
    """The machine and versions: a dict of plain values (see the module docstring)."""
    package = os.path.dirname(os.path.realpath(iscse.__file__))  # through links (bench/device_check.sh's tree)
    env: Dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "platform": platform.platform(),
        "iscse": iscse.__version__, "iscse_path": package, "iscse_git_commit": _git_commit(package),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "torch_threads": torch.get_num_threads(),
        "triton": _version("triton", ("triton",)), "faiss": _version("faiss", ("faiss-cpu", "faiss-gpu",
                                                                               "faiss-gpu-cu12", "faiss")),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"), "cpu": _cpu_info(), "device": str(device),
        # Other work on the machine skews the timings (threads that wait for each other), so it is recorded.
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(device if device.type == "cuda" else 0)
        env["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                      "capability": f"sm_{p.major}{p.minor}", "sms": p.multi_processor_count,
                      "count": torch.cuda.device_count()}
        env["driver"] = gpu_driver()
    else:
        env["gpu"] = None
    return env


# ------------------------------------------------------------------------------------------------ verification

def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want| / max |want|`` in float64 on the CPU (the absolute error where ``want`` is all zero);
    ``inf`` for a shape mismatch or a non-finite value."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape or not torch.isfinite(got).all():
        return float("inf")
    diff = (got - want).abs().max().item() if got.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    return diff / scale if scale > 0 else diff


class _Inputs:
    """Random inputs drawn on the CPU from a seed (the same on every machine), then moved to ``device``."""

    def __init__(self, seed: int, device: torch.device):
        self.gen = torch.Generator().manual_seed(seed)
        self.device = device

    def normal(self, *shape, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64).to(self.device, dtype)

    def unit(self, n: int, d: int, dtype=torch.float32) -> torch.Tensor:
        return F.normalize(self.normal(n, d, dtype=torch.float64), dim=1).to(dtype)

    def scalar(self) -> float:
        return 0.5 + torch.rand((), generator=self.gen, dtype=torch.float64).item()  # a non-unit upstream gradient

    def full_buffer(self, M: int, D: int, dtype=torch.float32) -> iscse.MemoryBuffer:
        """A full buffer of random unit rows, its write pointer a third of the way round (pushes wrap mid-batch)."""
        buf = iscse.MemoryBuffer(M, D, dtype=dtype, device=self.device)
        buf.push(self.unit(M, D))
        if M // 3:
            buf.push(self.unit(M // 3, D))
        return buf


def _check_knn(name, inp, shape, label):
    B, M, D, k = shape
    qdtype, bdtype = (torch.float32, torch.float32) if label == "fp32" else \
        (torch.bfloat16, torch.bfloat16 if "buffer" in label else torch.float32)
    buf = inp.full_buffer(M, D, bdtype)
    q = inp.unit(B, D, qdtype)
    buf.push(q)  # q is the batch pushed last: its own slots are excluded
    vals, idx = iscse.knn_topk(q, buf, k, backend=name)
    rows = buf.rows().double().cpu()  # the reference's order: the batch is in the last B rows
    q64 = q.double().cpu()
    sim = q64 @ rows.t()
    want = sim.gather(1, R.knn(q64, rows, k))  # descending, rank 0 (the query's own row) dropped
    ranks = buf.slots_to_ranks(idx).cpu()
    got = sim.gather(1, ranks)
    own = torch.arange(M - B, M).unsqueeze(1)
    vals = vals.detach().double().cpu()
    return {
        "sims": (got.sort(1, descending=True).values - want).abs().max().item(),
        "vals": _rel(vals, got),
        "own slot returned": float("inf") if bool((ranks == own).any()) else 0.0,
        "vals not sorted": max(0.0, (vals[:, 1:] - vals[:, :-1]).max().item()) if k > 1 else 0.0,
    }


def _check_smooth(name, inp, shape, label, aggregation):
    B, M, D, k = shape
    buf = inp.full_buffer(M, D)
    q = inp.unit(B, D, DTYPES[label]).requires_grad_()
    q64 = q.detach().double().cpu().requires_grad_()
    storage = buf.storage.double().cpu()
    vals, idx = (q64.detach() @ storage.t()).topk(k, dim=1)
    z = iscse.smooth(q, buf, idx.to(inp.device), vals.float().to(inp.device), ATTN_TEMPERATURE, backend=name,
                     aggregation=aggregation)
    want = R.aggregate(q64, storage, idx, ATTN_TEMPERATURE, "attn" if aggregation == "attention" else "mean")
    g = inp.normal(B, D, dtype=torch.float64)
    (grad,) = torch.autograd.grad(z, q, g.to(z.dtype))
    (grad_want,) = torch.autograd.grad(want, q64, g.cpu())
    return {"z*": _rel(z, want), "grad q": _rel(grad, grad_want)}


def _check_info_nce(name, inp, shape, label):
    B, _, D, _ = shape
    a, b = (inp.normal(B, D, dtype=DTYPES[label]).requires_grad_() for _ in range(2))
    a64, b64 = (t.detach().double().cpu().requires_grad_() for t in (a, b))
    loss = iscse.info_nce(a, b, TEMPERATURE, backend=name)
    want = R.cos_sim_ce(a64, b64, TEMPERATURE)
    g = inp.scalar()
    got_grads = torch.autograd.grad(loss * g, (a, b))
    want_grads = torch.autograd.grad(want * g, (a64, b64))
    return {"loss": _rel(loss, want), "grad a": _rel(got_grads[0], want_grads[0]),
            "grad b": _rel(got_grads[1], want_grads[1])}


def _reference_step(r1, r2, before, after, k, aggregation):
    """The paper's step in float64 (:mod:`iscse.reference`'s ops, composed as :func:`iscse.reference.iscse_step`
    does): ``(L_cl, L_s, pushed buffer)``. ``before``/``after``: the checked buffer's rows (oldest first) before and
    after its step; the neighbours are searched in ``after`` with the rows the backend stored as the queries."""
    B = r1.shape[0]
    q2 = F.normalize(r2, dim=-1)
    pushed = R.push(before, q2)
    ranks = R.knn(after[-B:], after, k)
    z_star = R.aggregate(q2, after, ranks, ATTN_TEMPERATURE, "attn" if aggregation == "attention" else "mean")
    return R.cos_sim_ce(r1, r2, TEMPERATURE), R.cos_sim_ce(r1, z_star, TEMPERATURE), pushed


def _check_step(name, inp, shape, label, aggregation):
    B, M, D, k = shape
    buf = inp.full_buffer(M, D)
    before = buf.rows().double().cpu()
    z1, z2 = (inp.normal(B, D, dtype=DTYPES[label]).requires_grad_() for _ in range(2))
    r1, r2 = (t.detach().double().cpu().requires_grad_() for t in (z1, z2))
    out = iscse.iscse_loss(z1, z2, buf, k=k, temperature=TEMPERATURE, attn_temperature=ATTN_TEMPERATURE,
                           alpha=ALPHA, backend=name, aggregation=aggregation, return_components=True)
    g_cl, g_s = inp.scalar(), inp.scalar()
    grads = torch.autograd.grad(g_cl * out.contrastive + g_s * out.smooth, (z1, z2))
    l_cl, l_s, pushed = _reference_step(r1, r2, before, buf.rows().double().cpu(), k, aggregation)
    want = torch.autograd.grad(g_cl * l_cl + g_s * l_s, (r1, r2))
    return {"L_cl": _rel(out.contrastive, l_cl), "L_s": _rel(out.smooth, l_s),
            "loss": _rel(out.loss, l_cl + ALPHA * l_s), "grad z1": _rel(grads[0], want[0]),
            "grad z2": _rel(grads[1], want[1]), "buffer": _rel(buf.rows(), pushed)}


_KIND = {"sims": "sims", "vals": "vals", "own slot returned": "vals", "vals not sorted": "sims", "buffer": "buffer"}


def _tolerance(label: str, quantity: str) -> float:
    kind = _KIND.get(quantity, "grad" if quantity.startswith("grad") else "value")
    return TOLERANCES[label][kind]


@contextlib.contextmanager
def _fused_mode(mode: Optional[str]):
    """Force the fused Triton step's way of making its gradients (kernels/iscse_loss.py): ``"held"`` (in backward,
    from what the forward held) or ``"made in forward"``; None leaves the size rule alone."""
    if mode is None:
        yield
        return
    from iscse.kernels import iscse_loss as L

    saved = L.HOLD_MAX_BYTES
    L.HOLD_MAX_BYTES = 2**62 if mode == "held" else -1
    try:
        yield
    finally:
        L.HOLD_MAX_BYTES = saved


def _is_fused_triton(impl) -> bool:
    return type(impl).__module__ == "iscse.backends.triton_fused"


def _interpreted() -> bool:
    try:
        from iscse.backends import triton_fused
    except ImportError:
        return False
    return bool(triton_fused.INTERPRETED)


def plan(impl, device: torch.device, quick: bool) -> List[dict]:
    """The checks of one backend: ``{"op", "shape", "dtype", "aggregation", "mode"}`` each.

    Every op on every shape in fp32 and bf16 (the kNN also with a bf16 buffer), the aggregation ones in both
    aggregations. The fused Triton step also in both of its modes, all (dtype, aggregation, mode) combinations on
    the last (largest) shape; on the other shapes, and everywhere in the interpreter (Triton on CPU, where the
    shapes are :data:`INTERPRETER_SHAPES`), they are spread over the shapes so that each value of each meets every
    value of the others, not all at once (each combination is a kernel specialisation to compile, or a slow
    interpreted step)."""
    fused = _is_fused_triton(impl)
    interp = fused and (device.type == "cpu" or _interpreted())
    shapes = INTERPRETER_SHAPES if interp else (QUICK_SHAPES if quick else FULL_SHAPES)
    modes = ("held", "made in forward") if fused else (None,)
    items = []
    for s, shape in enumerate(shapes):
        combos = [(d, a) for d in DTYPES for a in AGGREGATIONS]
        spread = fused and (interp or s < len(shapes) - 1)
        if spread:
            combos = combos[s % 2::2]  # even shapes: fp32/attention, bf16/attention; odd: the mean pair
        for label in ("fp32", "bf16", "bf16, bf16 buffer"):
            items.append(dict(op="knn_topk", shape=shape, dtype=label, aggregation=None, mode=None))
        if not impl.knn_only:
            for label in DTYPES:
                items.append(dict(op="info_nce", shape=shape, dtype=label, aggregation=None, mode=None))
            for label, aggregation in combos:
                items.append(dict(op="smooth", shape=shape, dtype=label, aggregation=aggregation, mode=None))
        for i, (label, aggregation) in enumerate(combos):
            for mode in ((modes[(i + s) % len(modes)],) if spread else modes):
                items.append(dict(op="step", shape=shape, dtype=label, aggregation=aggregation, mode=mode))
    return items


def verify_backend(name: str, device: torch.device, *, quick: bool, seed: int = 0,
                   records: Optional[List[dict]] = None) -> List[dict]:
    """Run :func:`plan`'s checks of backend ``name`` on ``device``; one record per check: the plan's fields plus
    ``backend``, ``errors`` (``{quantity: [error, tolerance]}``), ``worst`` (the quantity furthest over or nearest
    to its tolerance), ``passed`` and ``exception`` (None, or the error a check raised, which fails it). Each
    record is appended to ``records`` (a new list when None) as soon as it is made, and the list returned."""
    impl = get_backend(name, device)
    records = [] if records is None else records
    for item in plan(impl, device, quick):
        key = f"{name}|{item['op']}|{item['shape']}|{item['dtype']}|{item['aggregation']}|{item['mode']}"
        inp = _Inputs(seed * 1_000_003 + zlib.crc32(key.encode()), device)
        rec = dict(item, backend=name, shape=list(item["shape"]), errors={}, worst=None, passed=False,
                   exception=None)
        try:
            with _fused_mode(item["mode"]):
                if item["op"] == "knn_topk":
                    errors = _check_knn(name, inp, item["shape"], item["dtype"])
                elif item["op"] == "smooth":
                    errors = _check_smooth(name, inp, item["shape"], item["dtype"], item["aggregation"])
                elif item["op"] == "info_nce":
                    errors = _check_info_nce(name, inp, item["shape"], item["dtype"])
                else:
                    errors = _check_step(name, inp, item["shape"], item["dtype"], item["aggregation"])
            rec["errors"] = {q: [err, _tolerance(item["dtype"], q)] for q, err in errors.items()}
            rec["worst"] = max(rec["errors"], key=lambda q: rec["errors"][q][0] / rec["errors"][q][1])
            rec["passed"] = all(err <= tol for err, tol in rec["errors"].values())
        except Exception as exc:  # a check that raises has failed; say why and go on with the others
            rec["exception"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        records.append(rec)
    return records


def graph_replay_check(name: str, device: torch.device, *, seed: int = 0, B: int = 16, M: int = 72, D: int = 64,
                       k: int = 5, warm: int = 2, replays: int = 6) -> dict:
    """One :class:`iscse.ISCSELoss` training step (push + loss + backward) of backend ``name`` captured in a CUDA
    graph after ``warm`` steps, replayed ``replays`` times on new inputs copied into the static ones, each replay
    against an eager criterion fed the same inputs (loss, both components, both gradients, the buffer). With the
    defaults the buffer fills at the third replay, so smoothing switches on mid-replays. Returns a check record
    (``op = "cuda graph"``); tolerance 1e-5 relative."""
    inp = _Inputs(seed * 1_000_003 + zlib.crc32(f"{name}|graph".encode()), device)
    rec = dict(op="cuda graph", backend=name, shape=[B, M, D, k], dtype="fp32", aggregation="attention", mode=None,
               errors={}, worst=None, passed=False, exception=None)
    try:
        crits = [iscse.ISCSELoss(D, buffer_size=M, k=k, alpha=ALPHA, backend=name).to(device) for _ in range(2)]
        eager, graphed = crits
        data = [(inp.normal(B, D), inp.normal(B, D)) for _ in range(warm + replays)]
        static = [torch.zeros(B, D, device=device, requires_grad=True) for _ in range(2)]

        def load(pair):
            with torch.no_grad():
                for s, x in zip(static, pair):
                    s.copy_(x)
                    s.grad = None

        def eager_step(pair):
            leaves = [x.clone().requires_grad_() for x in pair]
            loss = eager(*leaves)
            loss.backward()
            return [loss.detach(), *eager.last_components, leaves[0].grad, leaves[1].grad]

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
            for pair in data[:warm]:
                load(pair)
                graphed(*static).backward()
        torch.cuda.current_stream(device).wait_stream(side)
        for pair in data[:warm]:
            eager_step(pair)
        for s in static:
            s.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = graphed(*static)
            loss.backward()
        outputs = [loss, *graphed.last_components]
        smoothed, agree = [], []
        names = ("loss", "L_cl", "L_s", "grad z1", "grad z2")
        errors = {n: 0.0 for n in names + ("buffer",)}
        for pair in data[warm:]:
            with torch.no_grad():
                for s, x in zip(static, pair):
                    s.copy_(x)
            graph.replay()
            want = eager_step(pair)
            got = outputs + [static[0].grad, static[1].grad]
            for n, g, w in zip(names, got, want):
                errors[n] = max(errors[n], _rel(g, w))
            errors["buffer"] = max(errors["buffer"], _rel(graphed.buffer.storage, eager.buffer.storage))
            smoothed.append(bool(want[2].item() > 0))
            agree.append(bool(outputs[2].item() > 0) == smoothed[-1])
        same_state = (graphed.step, graphed.buffer.ptr, graphed.buffer.written) == \
            (eager.step, eager.buffer.ptr, eager.buffer.written)
        # The replays must cover the switch from filling to full (smoothing off, then on) and agree on it.
        switched = not smoothed[0] and smoothed[-1]
        errors["state (step, pointer, count)"] = 0.0 if same_state and all(agree) and switched else float("inf")
        rec["errors"] = {n: [e, 1e-5] for n, e in errors.items()}
        rec["worst"] = max(rec["errors"], key=lambda n: rec["errors"][n][0])
        rec["passed"] = all(e <= 1e-5 for e in errors.values())
    except Exception as exc:
        rec["exception"] = f"{type(exc).__name__}: {str(exc)[:500]}"
    return rec


def _usable(name: str, device: torch.device) -> Optional[str]:
    """None when backend ``name`` runs a tiny kNN on ``device``, else why not (e.g. a CPU-only FAISS on CUDA)."""
    try:
        storage = F.normalize(torch.ones(4, 8, device=device), dim=1)
        iscse.knn_topk(storage[:1].clone(), storage, 1, self_slots=None, backend=name)
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:300]}"


# ------------------------------------------------------------------------------------------------------ timing

def _step_fn(impl: str, shape, dtype, device, inp: _Inputs):
    """``fn()``: forward + backward of one step on a full buffer (``impl``: ``"reference"`` for the paper's step,
    :func:`iscse.reference.iscse_step`, else a backend name); and the leaves whose gradients to clear."""
    B, M, D, k = shape
    z1, z2 = (inp.normal(B, D, dtype=dtype).requires_grad_() for _ in range(2))
    rows = inp.unit(M, D, dtype)
    if impl == "reference":
        def fn():
            R.iscse_step(z1, z2, rows, k=k).loss.backward()
    else:
        buf = iscse.MemoryBuffer(M, D, dtype=dtype, device=device)
        buf.push(rows)
        del rows

        def fn():
            iscse.iscse_loss(z1, z2, buf, k=k, backend=impl, check_finite=False).backward()
    return fn, (z1, z2)


def time_backends(names: List[str], device: torch.device, shape, dtype_label: str, *, rounds: int,
                  seed: int = 0, rates: Optional[dict] = None) -> List[dict]:
    """Median forward + backward time of one step for the paper's step and each backend in ``names``, timed in
    the same run, interleaved (each round times every one once, in a rotating order, after one warm-up call
    each): wall clock on a CPU, ``triton.testing.do_bench`` medians on a GPU (then the median over the rounds).
    One record per implementation: ``{"impl", "shape", "dtype", "median_ms", "times_ms", "ratio_to_reference"}``,
    on a GPU also ``floor_ms`` and ``x_floor`` (:func:`iscse._roofline.floors_ms`, with ``rates``)."""
    dtype = DTYPES[dtype_label]
    cuda = device.type == "cuda"
    impls = ["reference"] + list(names)
    fns = {}
    for impl in impls:
        inp = _Inputs(seed * 1_000_003 + zlib.crc32(f"time|{shape}".encode()), device)
        fns[impl] = _step_fn(impl, shape, dtype, device, inp)
    times: Dict[str, list] = {impl: [] for impl in impls}
    errors: Dict[str, str] = {}

    def one(impl):
        fn, leaves = fns[impl]
        for t in leaves:
            t.grad = None
        if cuda:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=10, rep=50, grad_to_none=list(leaves), return_mode="median"))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    for r in range(rounds + 1):
        order = impls[r % len(impls):] + impls[:r % len(impls)]
        for impl in order:
            if impl in errors:
                continue
            try:
                ms = one(impl)
            except Exception as exc:
                errors[impl] = f"{type(exc).__name__}: {str(exc)[:300]}"
                continue
            if r:  # round 0 warms every one up (thread pools, caches, Triton's compiles)
                times[impl].append(ms)
    fns.clear()
    ref = statistics.median(times["reference"]) if times["reference"] else None
    out = []
    for impl in impls:
        rec = {"impl": impl, "shape": list(shape), "dtype": dtype_label, "device": str(device)}
        if impl in errors:
            rec["exception"] = errors[impl]
        else:
            med = statistics.median(times[impl])
            rec.update(median_ms=med, times_ms=[round(t, 4) for t in times[impl]],
                       ratio_to_reference=med / ref if ref else None)
            if rates:
                from iscse._roofline import floors_ms

                floor = floors_ms(*shape, torch.finfo(dtype).bits // 8, rates)["fwd+bwd"]
                rec.update(floor_ms=floor, x_floor=med / floor)
        out.append(rec)
    return out


# ------------------------------------------------------------------------------------------------------ output

def _fmt_err(rec: dict) -> Tuple[str, str, str]:
    if rec["exception"]:
        return "raised", "", rec["exception"]
    err, tol = rec["errors"][rec["worst"]]
    return f"{err:.2e}", f"{tol:.0e}", rec["worst"]


def format_report(doc: dict) -> str:
    """The readable report of a result document (what :func:`main` writes as JSON)."""
    env = doc["environment"]
    cpu = env["cpu"]
    flags = cpu["flags"]
    flag_text = "unknown (no /proc/cpuinfo)" if flags is None else \
        " ".join(f"{k}{'+' if v else '-'}" for k, v in flags.items())
    lines = ["iscse.check " + ("--quick" if doc["quick"] else "(full)") + f" on {doc['device']}, {env['date']}",
             "",
             "== environment",
             f"python {env['python']} | {env['platform']}",
             f"iscse {env['iscse']} ({env['iscse_path']}, git {env['iscse_git_commit'] or '-'})",
             f"torch {env['torch']} (CUDA {env['torch_cuda'] or '-'}, {env['torch_threads']} threads) | "
             f"triton {env['triton'] or 'not installed'} | faiss {env['faiss'] or 'not installed'} | "
             f"TRITON_INTERPRET={env['TRITON_INTERPRET'] or '-'}",
             f"CPU: {cpu['name']}, {cpu['cores']} cores, torch capability {cpu['torch_capability']}, load average "
             f"{' '.join(map(str, env['load_average'] or ['unknown']))} (1, 5, 15 min)",
             f"CPU flags: {flag_text}"]
    gpu = env.get("gpu")
    lines.append("GPU: " + (f"{gpu['name']}, {gpu['memory_gib']} GiB, {gpu['capability']}, {gpu['sms']} SMs, "
                            f"driver {env.get('driver') or 'unknown'}" if gpu else "none"))
    lines += ["", "== backends"]
    lines += [f"{name:10s} {status}" for name, status in doc["backends"].items()]
    lines += ["", "== verification against iscse.reference in float64 (worst error / tolerance per check)"]
    head = ("backend", "op", "B,M,D,k", "dtype", "aggregation", "mode", "worst", "tol", "quantity", "")
    rows = [head]
    for rec in doc["checks"]:
        err, tol, what = _fmt_err(rec)
        rows.append((rec["backend"], rec["op"], ",".join(map(str, rec["shape"])), rec["dtype"],
                     rec["aggregation"] or "", rec["mode"] or "", err, tol, what[:60],
                     "ok" if rec["passed"] else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if doc.get("timings") is not None:
        lines += ["", "== timing: forward + backward of one step, median ms (ratio to the paper's step, "
                      "iscse.reference.iscse_step, timed in the same run)"]
        if doc.get("rates"):
            r = doc["rates"]
            lines.append(f"card rates: copy {r['copy_bytes_per_s'] / 1e9:.0f} GB/s, "
                         f"bf16 matmul {r['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s")
        rows = [("impl", "B,M,D,k", "dtype", "median ms", "x reference", "floor ms", "x floor")]
        for rec in doc["timings"]:
            if "note" in rec or "exception" in rec:
                rows.append((rec["impl"], ",".join(map(str, rec["shape"])), rec["dtype"],
                             rec.get("note") or "raised: " + rec["exception"][:60], "", "", ""))
                continue
            ratio = rec.get("ratio_to_reference")
            rows.append((rec["impl"], ",".join(map(str, rec["shape"])), rec["dtype"], f"{rec['median_ms']:.3f}",
                         f"{ratio:.3f}" if ratio is not None else "-",
                         f"{rec['floor_ms']:.4g}" if "floor_ms" in rec else "-",
                         f"{rec['x_floor']:.1f}" if "x_floor" in rec else "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    s = doc["summary"]
    if doc.get("interrupted"):
        lines += ["", "INTERRUPTED before the end: the checks and timings above are those that ran"]
    if s["unusable_backends"]:
        lines += ["", f"not verified, listed as available but unusable here: {', '.join(s['unusable_backends'])} "
                      "(see == backends)"]
    lines += ["", f"{s['checks']} checks, {s['failed']} failed" + (f" ({', '.join(s['failed_backends'])})"
                                                                  if s["failed"] else "")
              + f"; {s['seconds']:.0f} s. " + ("PASSED" if doc["passed"] else "INCOMPLETE" if s["failed"] == 0 else
                                               "FAILED: please report it with this output (or --json) attached")]
    return "\n".join(lines)


class _OneLineParser(argparse.ArgumentParser):
    """Errors are one line (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def _parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="python -m iscse.check",
                       description="Environment, verification of every available backend against the float64 "
                                   "reference, and timings; attach the output to a bug report. Exit status 1 when "
                                   "a verification fails.")
    p.add_argument("--quick", action="store_true", help="fewer shapes; timing at the paper's shape only")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available, else cpu)")
    p.add_argument("--backends", default=None, help="comma-separated subset of the available backends")
    p.add_argument("--no-timing", action="store_true", help="verification only")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: %(default)s)")
    return p


def _log(msg: str) -> None:
    print(f"[iscse.check] {msg}", file=sys.stderr, flush=True)


def _run(doc: dict, wanted: List[str], device: torch.device, args) -> None:
    """Verify, then time, filling ``doc`` as it goes (so an interruption keeps what was done)."""
    verified = []
    for name in wanted:
        why = _usable(name, device)
        if why:
            doc["backends"][name] = f"unusable on {device}: {why}"
            _log(f"{name}: unusable on {device} ({why}); not verified")
            continue
        t = time.time()
        _log(f"verifying {name} on {device}")
        doc["backends"][name] = "interrupted while being verified"  # until its checks are all done
        start = len(doc["checks"])
        verify_backend(name, device, quick=args.quick, seed=args.seed, records=doc["checks"])
        impl = get_backend(name, device)
        if device.type == "cuda" and not impl.knn_only and not impl.syncs_host:
            doc["checks"].append(graph_replay_check(name, device, seed=args.seed))
        recs = doc["checks"][start:]
        failed = sum(not r["passed"] for r in recs)
        doc["backends"][name] = f"verified: {len(recs)} checks, {failed} failed"
        verified.append(name)
        _log(f"verified {name}: {len(recs)} checks, {failed} failed ({time.time() - t:.1f} s)")
    if not args.no_timing:
        doc["timings"] = []
        timed = [n for n in verified if n != "reference"]
        if "triton" in timed and _interpreted():
            timed.remove("triton")
            for shape in TIMING_SHAPES[device.type][:1 if args.quick else None]:
                doc["timings"].append({"impl": "triton", "shape": list(shape), "dtype": "fp32",
                                       "note": "interpreter: not timed"})
        if device.type == "cuda":
            from iscse._roofline import measure_rates
            from triton.testing import do_bench

            _log("card rates (copy bandwidth, bf16 matmul)")
            doc["rates"] = measure_rates(lambda fn: float(do_bench(fn, warmup=25, rep=100,
                                                                  return_mode="median")), device)
        shapes = TIMING_SHAPES[device.type][:1 if args.quick else None]
        dtypes = ("fp32", "bf16") if device.type == "cuda" and not args.quick else ("fp32",)
        for shape in shapes:
            for label in dtypes:
                t = time.time()
                doc["timings"] += time_backends(timed, device, shape, label, rounds=3 if args.quick else 5,
                                                seed=args.seed, rates=doc["rates"])
                _log(f"timed {', '.join(['reference'] + timed)} at {shape} {label} ({time.time() - t:.1f} s)")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the check (see the module docstring); returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        parser.error(f"--device: {args.device!r} is not a device (cpu, cuda, cuda:1, ...)")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: {args.device!r}: only cpu and cuda are checked")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible to torch (torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
        if device.index is not None:
            torch.cuda.set_device(device)
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            parser.error(f"--json {args.json}: the folder {folder} does not exist")
    t0 = time.time()
    available = available_backends(device)
    if args.backends is not None:
        wanted = [n.strip() for n in args.backends.split(",") if n.strip()]
        bad = [n for n in wanted if not available.get(n)]
        if not wanted or bad:
            parser.error(f"--backends: {', '.join(bad) or 'empty list'} not available on {device}; available: "
                         f"{', '.join(n for n, ok in available.items() if ok)}")
    else:
        wanted = [n for n, ok in available.items() if ok]
    _log(f"environment ({device})")
    doc = {"format": 1, "quick": args.quick, "device": str(device), "seed": args.seed, "interrupted": False,
           "environment": environment(device), "backends": {}, "checks": [], "timings": None, "rates": None}
    for name, ok in available.items():
        doc["backends"][name] = "not selected" if ok and name not in wanted else \
            ("available" if ok else "not available (not installed, or not for this device)")
    try:
        _run(doc, wanted, device, args)
    except KeyboardInterrupt:  # e.g. `timeout -s INT` (bench/device_check.sh): keep what was measured
        doc["interrupted"] = True
        _log("interrupted: writing what was checked so far")
    failed = [r for r in doc["checks"] if not r["passed"]]
    doc["summary"] = {"checks": len(doc["checks"]), "failed": len(failed),
                      "failed_backends": sorted({r["backend"] for r in failed}),
                      "unusable_backends": sorted(n for n, v in doc["backends"].items() if v.startswith("unusable")),
                      "seconds": time.time() - t0}
    doc["passed"] = not failed and not doc.get("interrupted")
    if args.json:
        write_json_atomic(args.json, doc, default=str)  # default=str: dtypes, devices, paths
    print(format_report(doc))
    return 1 if failed else (3 if doc.get("interrupted") else 0)


if __name__ == "__main__":
    sys.exit(main())
