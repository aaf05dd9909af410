"""Training-step throughput: the paper's recipe against ours, on the same card in the same run.

    python bench/train_step_bench.py --out "$OUT"     # CUDA: BERT-base (BertConfig(), random init), B = 64, L = 32
    python bench/train_step_bench.py --dry-run        # CPU: a tiny BERT and a few steps (a check of the script)

One step as SimCSE and IS-CSE train (docs/concepts.md: The computation): the ``B`` sentences are duplicated row by row and encoded in one
forward pass of ``2B`` rows (dropout makes the two views differ), CLS pooling with SimCSE's MLP head
(:class:`iscse.SentenceEncoder`, ``pooler="cls"``: the MLP is applied in training), ``L_cl + 0.1 L_s`` with a full
1024-row buffer and ``k = 16`` (:class:`iscse.ISCSELoss`), backward, gradient-norm clip at 1.0, AdamW (lr 3e-5) and a
linear decay. The two recipes differ only in the settings gathered in :func:`paper_recipe` and :func:`ours_recipe`:

- paper: fp32, ``backend="reference"`` (the released code's ops), ``torch.optim.AdamW`` with its defaults;
- ours: what iscse's trainer does by default on CUDA (:func:`ours_recipe` is the one place to keep in step with
  it): bf16 autocast, ``backend="auto"`` (the fused Triton ops on CUDA tensors), fused AdamW (the default of
  transformers' Trainer on torch >= 2.8), no NaN check inside the loss.

Both encoders start from the same random weights. After warm-up (Triton compiles, allocator, cuBLAS heuristics) the
recipes alternate in rounds of ``--steps`` steps, each step synchronised and timed on the wall clock; the paper's
first round is measured before our recipe is built, so a failure of ours cannot lose it. Reports the median step
time with 20th/80th percentiles, steps/s and sentences/s, the peak memory of a step over the weights and
optimizer states held (activations, temporaries), and ours' speedup; writes ``train_step.json``
into ``--out`` (default ``$OUT``, else ``./out``) after every round, with the card, driver, versions and date.
``--budget`` bounds the timed rounds; Ctrl-C (SIGINT) stops, writes the JSON and prints what was measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchlib, also under PYTHONSAFEPATH=1
import benchlib  # noqa: E402


@dataclasses.dataclass
class Recipe:
    """The settings that differ between the two recipes.

    ``autocast``: autocast dtype name (``"bf16"``, ``"fp16"``) or None for fp32; ``loss_backend``: the
    ``ISCSELoss`` backend; ``adamw``: extra keyword arguments of ``torch.optim.AdamW`` (``fused``, ``foreach``);
    ``check_finite``: ``ISCSELoss``'s NaN check (a device read each step)."""

    name: str
    autocast: Optional[str]
    loss_backend: str
    adamw: dict = dataclasses.field(default_factory=dict)
    check_finite: bool = False


def paper_recipe() -> Recipe:
    """The released IS-CSE / SimCSE recipe (BERT-base script): fp32 throughout, the paper's loss ops
    (``backend="reference"``: full argsort, ``cat``-shifted buffer, gather + bmm), ``torch.optim.AdamW`` with its
    defaults (transformers' Trainer of SimCSE's time used its own AdamW; torch's is its successor), no NaN check."""
    return Recipe("paper", autocast=None, loss_backend="reference", adamw={}, check_finite=False)


def ours_recipe() -> Recipe:
    """What iscse's trainer does by default on CUDA. Keep in step with the trainer (iscse/train.py): bf16 autocast
    of the encoder (the loss gets fp32 embeddings), ``backend="auto"`` (the fused Triton ops on CUDA tensors, the
    torch backend on CPU), fused AdamW (transformers' Trainer default ``optim="adamw_torch_fused"`` on torch >= 2.8),
    ``check_finite=False`` (no device read inside the step)."""
    return Recipe("ours", autocast="bf16", loss_backend="auto", adamw={"fused": True}, check_finite=False)


_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _versions() -> dict:
    return benchlib.environment(("transformers", "triton"))


class Run:
    """One recipe's encoder, loss, optimizer and schedule, and its step."""

    def __init__(self, recipe: Recipe, config, device: torch.device, batch: int, buffer_size: int, k: int,
                 seed: int):
        from transformers import BertModel

        import iscse

        self.recipe, self.device = recipe, device
        torch.manual_seed(seed)  # the same initial weights for both recipes (built on the CPU, then moved)
        backbone = BertModel(config)  # its pooling layer's dense becomes SimCSE's MLP head
        self.encoder = iscse.SentenceEncoder(backbone, pooler="cls", mlp_only_train=True).to(device).train()
        self.criterion = iscse.ISCSELoss(config.hidden_size, buffer_size=buffer_size, k=k, alpha=0.1,
                                         backend=recipe.loss_backend, check_finite=recipe.check_finite).to(device)
        # A full buffer, so every timed step smooths (the paper's steady state after its first 16 steps).
        self.criterion.buffer.push(F.normalize(torch.randn(buffer_size, config.hidden_size, device=device), dim=1))
        self.params = [p for p in self.encoder.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=3e-5, weight_decay=0.0, **recipe.adamw)
        total = 10_000
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: max(0.0, 1.0 - s / total))
        self.attn_implementation = getattr(backbone.config, "_attn_implementation", None)
        self.times_ms: list = []
        self.peak_bytes: Optional[int] = None
        self.last = None

    def step(self, inputs: dict) -> torch.Tensor:
        """Encode the ``2B`` rows, loss, backward, clip, AdamW and schedule steps; returns the detached loss."""
        dtype = _AUTOCAST.get(self.recipe.autocast)
        with torch.autocast(device_type=self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            emb = self.encoder(**inputs)  # (2B, H): rows 2i and 2i + 1 are two dropout views of sentence i
        z = emb.float().reshape(-1, 2, emb.shape[-1])  # (B, 2, H); the loss runs in fp32
        loss = self.criterion(z[:, 0], z[:, 1])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def timed(self, batches: list, steps: int, sync) -> None:
        """Run ``steps`` steps, each synchronised and timed; appends to :attr:`times_ms`."""
        for s in range(steps):
            sync()
            t0 = time.perf_counter()
            self.last = self.step(batches[s % len(batches)])
            sync()
            self.times_ms.append((time.perf_counter() - t0) * 1e3)

    def summary(self, batch: int) -> dict:
        """Median step time (ms), percentiles, steps/s, sentences/s, peak memory and the last losses."""
        out = {"settings": dataclasses.asdict(self.recipe), "attn_implementation": self.attn_implementation,
               "steps_timed": len(self.times_ms), "peak_extra_bytes": self.peak_bytes}
        if self.times_ms:
            t = sorted(self.times_ms)
            med = statistics.median(t)
            out.update(median_ms=med, p20_ms=t[int(0.2 * (len(t) - 1))], p80_ms=t[int(0.8 * (len(t) - 1))],
                       steps_per_s=1e3 / med, sentences_per_s=batch * 1e3 / med)
        if self.last is not None:
            l_cl, l_s = self.criterion.last_components
            out.update(loss=float(self.last), L_cl=float(l_cl), L_s=float(l_s))
        return out


def _write(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))


def _print(doc: dict) -> None:
    for name, r in doc["results"].items():
        if "median_ms" not in r:
            print(f"{name:6s} not measured")
            continue
        peak = r["peak_extra_bytes"]
        print(f"{name:6s} median {r['median_ms']:8.2f} ms/step (p20 {r['p20_ms']:.2f}, p80 {r['p80_ms']:.2f}) "
              f"= {r['steps_per_s']:6.2f} steps/s, {r['sentences_per_s']:8.1f} sentences/s over {r['steps_timed']} "
              f"steps; peak extra {'-' if peak is None else f'{peak / 2**30:.2f} GiB'}; "
              f"loss {r.get('loss', float('nan')):.4f} (L_s {r.get('L_s', float('nan')):.4f})")
    if doc.get("speedup") is not None:
        print(f"ours / paper: {doc['speedup']:.2f}x steps/s")
    for note in doc["notes"]:
        print("note:", note)


def run(args) -> dict:
    """Build both recipes, warm up, time alternating rounds; returns the JSON document (also written to disk)."""
    from transformers import BertConfig

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if args.dry_run:
        config = BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64)
        model = "tiny BERT (2 layers, hidden 32), random init"
    else:
        config = BertConfig()
        model = "BERT-base (transformers.BertConfig()), random init"
    doc = dict(_versions(), script="bench/train_step_bench.py", argv=sys.argv[1:], model=model,
               batch=args.batch, seq_len=args.seq_len, rows_per_forward=2 * args.batch, buffer_size=args.buffer_size,
               k=args.k, warmup=args.warmup, steps_per_round=args.steps, rounds=args.rounds,
               float32_matmul_precision=torch.get_float32_matmul_precision(), results={}, speedup=None, notes=[])
    path = Path(args.json) if args.json else Path(args.out) / ("train_step_dry_run.json" if args.dry_run
                                                              else "train_step.json")
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    batches = []
    for _ in range(4):
        ids = torch.randint(999, config.vocab_size, (args.batch, args.seq_len), generator=g)
        ids = ids.repeat_interleave(2, dim=0).to(device)  # (2B, L): one forward pass for both dropout views
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "token_type_ids": torch.zeros_like(ids)})
    deadline = time.time() + args.budget
    runs = {}

    def start(recipe: Recipe) -> None:
        t0 = time.perf_counter()
        try:
            r = Run(recipe, config, device, args.batch, args.buffer_size, args.k, args.seed)
            for s in range(args.warmup):
                r.step(batches[s % len(batches)])
            sync()
        except Exception as exc:  # keep the other recipe's figures
            doc["notes"].append(f"{recipe.name}: failed while building or warming up: {type(exc).__name__}: "
                                f"{str(exc)[:400]}")
            print(f"{recipe.name}: FAILED: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
            return
        runs[recipe.name] = r
        doc[f"warmup_s_{recipe.name}"] = round(time.perf_counter() - t0, 2)
        if recipe.loss_backend == "auto":  # what "auto" verified and chose on the first warm-up step (full buffer)
            import iscse.backends

            doc[f"auto_decisions_{recipe.name}"] = {" ".join(map(str, key)): name for key, name in
                                                    iscse.backends.auto_decisions().items()}
        print(f"{recipe.name}: built and warmed up ({args.warmup} steps) in {time.perf_counter() - t0:.1f}s",
              flush=True)

    def timed_round(name: str) -> None:
        r = runs.get(name)
        if r is None:
            return
        try:
            if cuda:
                sync()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            r.timed(batches, args.steps, sync)
            if cuda:  # activations and temporaries of one step, over the weights and optimizer states held
                r.peak_bytes = max(r.peak_bytes or 0, torch.cuda.max_memory_allocated() - before)
        except Exception as exc:
            doc["notes"].append(f"{name}: a timed round failed: {type(exc).__name__}: {str(exc)[:400]}")
            print(f"{name}: FAILED in a timed round: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
            runs.pop(name)
        doc["results"][name] = r.summary(args.batch)
        res = {n: doc["results"][n] for n in ("paper", "ours") if "median_ms" in doc["results"].get(n, {})}
        if len(res) == 2:
            doc["speedup"] = res["paper"]["median_ms"] / res["ours"]["median_ms"]
        _write(doc, path)
        m = doc["results"][name].get("median_ms")
        print(f"{name}: {len(r.times_ms)} steps timed" + (f", median {m:.2f} ms/step" if m else ""), flush=True)

    try:
        start(paper_recipe())
        timed_round("paper")
        start(ours_recipe())
        timed_round("ours")
        for _ in range(args.rounds - 1):
            if time.time() > deadline:
                doc["notes"].append(f"stopped after the time budget of {args.budget:.0f}s")
                break
            timed_round("paper")
            timed_round("ours")
    except KeyboardInterrupt:
        doc["notes"].append("interrupted (SIGINT): rounds measured before are kept")
        for name, r in runs.items():
            doc["results"][name] = r.summary(args.batch)
    _write(doc, path)
    _print(doc)
    print(f"wrote {path}", flush=True)
    return doc


#: Sizes whose default depends on --dry-run: flag -> (help, full run, dry run). --help is written from this table and
#: main() applies it, so the two cannot disagree.
SIZES = {
    "batch": ("sentences per step B", 64, 4),
    "seq_len": ("tokens per sentence L", 32, 8),
    "buffer_size": ("IS-CSE buffer rows", 1024, 16),
    "k": ("neighbours", 16, 3),
    "warmup": ("untimed steps per recipe", 5, 1),
    "steps": ("timed steps per round", 10, 3),
    "rounds": ("alternating rounds", 3, 2),
}


def main(argv=None) -> int:
    """Command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "out",
                    help="directory for train_step.json (default: $OUT, else ./out; here %(default)s)")
    ap.add_argument("--json", default=None, help="result file (default OUT/train_step.json)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, a tiny BERT, B = 4, L = 8, a few steps")
    ap.add_argument("--device", default=None, help="default: cuda when available (cpu with --dry-run)")
    for name, (what, full, tiny) in SIZES.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                        help=f"{what} (default: {full}; {tiny} with --dry-run)")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds after which no new round starts (default: %(default)g)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = ap.parse_args(argv)
    dry = args.dry_run
    for name, (_, full, tiny) in SIZES.items():
        value = getattr(args, name)
        if value is None:
            setattr(args, name, tiny if dry else full)
        elif value < (0 if name == "warmup" else 1):
            print(f"train_step_bench.py: error: --{name.replace('_', '-')} must be a positive int, got {value}",
                  file=sys.stderr)
            return 2
    if args.batch > args.buffer_size or args.k > args.buffer_size - 1:
        print("train_step_bench.py: error: need --batch <= --buffer-size and --k <= --buffer-size - 1",
              file=sys.stderr)
        return 2
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not dry else "cpu"
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        print("train_step_bench.py: error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.device == "cpu" and not dry:
        print("train_step_bench.py: no CUDA device: timing BERT-base on the CPU (slow); --dry-run checks the "
              "script quickly", flush=True)
    doc = run(args)
    return 0 if {"paper", "ours"} <= {n for n, r in doc["results"].items() if "median_ms" in r} else 1


if __name__ == "__main__":
    sys.exit(main())
