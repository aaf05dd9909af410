"""``transformers.TrainerCallback`` s of the IS-CSE trainer.

- :class:`MetricsLog`: ``metrics.jsonl`` (one JSON object a line: every step's ``loss``, ``L_cl``, ``L_s``,
  ``L_mlm`` (with ``--do_mlm``: the masked-LM loss, rank 0's under DDP), ``alpha``, ``lr``, ``epoch``, and
  ``grad_norm`` at logging steps; every evaluation; the test scores) and the
  human-readable log line every ``--logging_steps``. Per-step values stay on the device until a logging step (or a
  checkpoint), when they are read back with one sync.
- :class:`StopOnSignal`: Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint and stops; a
  second Ctrl-C stops at once. Under DDP the ranks agree at logging steps.
- :class:`QuietProgress`: a progress bar of the optimizer steps showing the loss, in place of the Hugging Face bar
  and the dict it prints at every log (the log line of :class:`MetricsLog` says the same, readably).
- :class:`CurvesPlot`: ``curves.png`` next to ``metrics.jsonl`` (:mod:`iscse.plot`), drawn at evaluations and at
  the end of training when matplotlib is installed.
- :class:`RankSeed`: process ``r`` draws its dropout masks from ``seed + r`` (the library seeds every process
  alike), so the processes of a data-parallel run do not share masks.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from transformers import TrainerCallback

from .distributed import any_flag

__all__ = ["MetricsLog", "StopOnSignal", "QuietProgress", "CurvesPlot", "RankSeed"]

logger = logging.getLogger("iscse.train")


class MetricsLog(TrainerCallback):
    """Writes ``metrics.jsonl`` and the log lines (see the module docstring).

    Args:
        path: ``output_dir/metrics.jsonl`` on the main process, None on the others (they keep the records in
            :attr:`history` but write nothing).

    The trainer calls :meth:`add` once per micro-batch with the detached loss components; gradient-accumulation
    micro-batches of one optimizer step are averaged into that step's record.
    """

    def __init__(self, path: Optional[Path]) -> None:
        self.path = path
        self.history: List[Dict[str, Any]] = []
        self._pending: Dict[int, Dict[str, Any]] = {}
        self._last_time = time.perf_counter()
        self._last_step: Optional[int] = None

    # ------------------------------------------------------------------ called by the trainer

    def add(self, step: int, loss: torch.Tensor, l_cl: torch.Tensor, l_s: torch.Tensor, alpha: float,
            lr: float, l_mlm: Optional[torch.Tensor] = None) -> None:
        """Record one micro-batch of optimizer step ``step`` (1-based): device scalars, no sync. ``l_mlm``: the
        masked-LM loss (``--do_mlm``), recorded as ``L_mlm``."""
        parts = [loss, l_cl, l_s] + ([] if l_mlm is None else [l_mlm])
        values = torch.stack([v.detach().float() for v in parts])
        entry = self._pending.get(step)
        if entry is None:
            self._pending[step] = {"values": values, "n": 1, "alpha": float(alpha), "lr": float(lr)}
        else:
            entry["values"] = entry["values"] + values
            entry["n"] += 1

    def write(self, record: Dict[str, Any]) -> None:
        """Append one record (an evaluation, the test scores) to ``metrics.jsonl``."""
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def flush(self, grad_norm: Optional[float] = None) -> Optional[Dict[str, Any]]:
        """Read the pending steps back (one sync), append them to ``metrics.jsonl``; returns the newest record.
        ``grad_norm`` goes into the newest record."""
        if not self._pending:
            return None
        steps = sorted(self._pending)
        means = [self._pending[s]["values"] / self._pending[s]["n"] for s in steps]
        width = max(len(m) for m in means)  # 4 when L_mlm is recorded
        stacked = torch.stack([torch.nn.functional.pad(m, (0, width - len(m)), value=float("nan"))
                               for m in means]).double().cpu()
        records = []
        for step, row in zip(steps, stacked.tolist()):
            entry = self._pending[step]
            loss, l_cl, l_s = row[:3]
            rec = {"event": "train", "step": step, "epoch": entry.get("epoch"), "loss": loss, "L_cl": l_cl,
                   "L_s": l_s, "alpha": entry["alpha"], "lr": entry["lr"]}
            if len(self._pending[step]["values"]) > 3:
                rec["L_mlm"] = row[3]
            records.append(rec)
            if not math.isfinite(loss):
                logger.warning("step %d: the loss is %s", step, loss)
        if grad_norm is not None:
            records[-1]["grad_norm"] = float(grad_norm)
        self._pending.clear()
        self.history.extend(records)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write("".join(json.dumps(r) + "\n" for r in records))
        return records[-1]

    # ------------------------------------------------------------------ TrainerCallback events

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time, self._last_step = time.perf_counter(), state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        entry = self._pending.get(state.global_step)
        if entry is not None:
            entry["epoch"] = round(float(state.epoch), 6)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        last = self.flush(logs.get("grad_norm"))
        if last is None:
            return
        now = time.perf_counter()
        rate = (now - self._last_time) / max(1, state.global_step - (self._last_step or 0))
        self._last_time, self._last_step = now, state.global_step
        logger.info("step %d/%d | loss %.4f (L_cl %.4f, L_s %.4f, alpha %.4g%s) | lr %.3g%s | %.2f s/step",
                    last["step"], state.max_steps, last["loss"], last["L_cl"], last["L_s"], last["alpha"],
                    f", L_mlm {last['L_mlm']:.4f}" if "L_mlm" in last else "", last["lr"],
                    f" | grad_norm {last['grad_norm']:.3g}" if "grad_norm" in last else "", rate)

    def on_train_end(self, args, state, control, **kwargs):
        self.flush()


class StopOnSignal(TrainerCallback):
    """SIGINT / SIGTERM: checkpoint and stop at the next step boundary; a second SIGINT interrupts at once.
    Handlers are installed (main thread only) for the duration of ``train()``. :attr:`stopped` tells whether the
    run ended this way."""

    def __init__(self) -> None:
        self.requested = False
        self.stopped = False
        self._old: Dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            return
        if args.world_size > 1:  # the ranks must agree: ask at logging steps only (a collective)
            every = max(1, int(state.logging_steps or 1))
            if state.global_step % every:
                return
            requested = any_flag(self.requested, args.device)
        else:
            requested = self.requested
        if requested:
            control.should_save = True
            control.should_training_stop = True
            self.stopped = True
            logger.warning("stopping at step %d on request; continue with --resume_from %s", state.global_step,
                           args.output_dir)

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()


class QuietProgress(TrainerCallback):
    """A ``tqdm`` bar of the optimizer steps on the main process (a resumed run's bar starts at its step), showing
    the loss of each log; the library's own bar would print every log dict as well. Built from public callback
    events only (the library's ``ProgressCallback`` keeps its bar in an undocumented attribute)."""

    def __init__(self) -> None:
        self.bar = None
        self._shown = 0  # the step the bar shows

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, dynamic_ncols=True)
            self._shown = 0

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self._shown)
            self._shown = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class CurvesPlot(TrainerCallback):
    """Draws ``output_dir/curves.png`` from ``output_dir/metrics.jsonl`` with :func:`iscse.plot.write_curves`: at an
    evaluation (unless the start of training or the previous drawing is less than :attr:`min_interval_s` seconds
    old, so that the evaluation before the first step and frequent evaluations of a fast run do not spend their time
    drawing) and always at the end of training. Main process only.

    Without matplotlib it draws nothing and says so once, at debug level. A drawing that fails is logged in one
    warning line (later failures at debug level) and never stops the run.

    Args:
        output_dir: the run's ``--output_dir`` (holding ``metrics.jsonl``).
        min_interval_s: the least time between two drawings at evaluations, in seconds.
    """

    def __init__(self, output_dir: Path, min_interval_s: float = 30.0) -> None:
        self.output_dir = Path(output_dir)
        self.min_interval_s = min_interval_s
        self.enabled = True
        self.drawn = 0  # how many times curves.png was written
        self._last: Optional[float] = None
        self._warned = False

    def draw(self) -> None:
        """Write ``curves.png`` now; never raises."""
        if not self.enabled:
            return
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            self.enabled = False
            logger.debug("matplotlib is not installed: no curves.png (pip install matplotlib)")
            return
        try:
            from ..plot import write_curves

            write_curves(self.output_dir)
            self.drawn += 1
        except Exception as exc:  # a figure is never worth a training run
            from .._io import first_line

            (logger.debug if self._warned else logger.warning)(
                "could not draw %s: %s: %s", self.output_dir / "curves.png", type(exc).__name__, first_line(exc))
            self._warned = True
        self._last = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        """The clock of :attr:`min_interval_s` starts with training."""
        self._last = time.perf_counter()

    def on_evaluate(self, args, state, control, **kwargs):
        """After an evaluation (its record is in ``metrics.jsonl``): draw, unless the last drawing is recent."""
        if state.is_world_process_zero and (self._last is None
                                            or time.perf_counter() - self._last >= self.min_interval_s):
            self.draw()

    def on_train_end(self, args, state, control, **kwargs):
        """At the end of training (after :class:`MetricsLog` flushed the last steps): draw."""
        if state.is_world_process_zero:
            self.draw()


class RankSeed(TrainerCallback):
    """At the start of training, seed Python, NumPy and torch with ``seed + process_index`` (dropout is the
    augmentation: ranks must not draw the same masks). A resumed run then restores each rank's saved RNG state
    before its first step, as the library does."""

    def on_train_begin(self, args, state, control, **kwargs):
        from transformers import set_seed

        set_seed(args.seed + args.process_index)
