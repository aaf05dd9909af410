"""``ISCSETrainer``: IS-CSE / SimCSE on ``transformers.Trainer``.

The Hugging Face trainer runs the loop: AdamW with weight decay off for biases and LayerNorm, the linear schedule
with warm-up, gradient clipping, mixed precision, gradient accumulation, DDP / FSDP / DeepSpeed through
``accelerate``, ``torch.compile``, seeding, the RNG states of every process, checkpoints of model, optimizer,
scheduler and scaler, their rotation, resuming (including skipping the batches already seen), logging to
``--report_to``, and the progress bar. This subclass adds what IS-CSE needs and the library cannot know:

- :meth:`compute_loss`: one forward pass over the batch with every sentence twice (dropout makes the two views),
  ``z1, z2`` all-gathered across processes with the local slice kept differentiable (as the reference code), and
  ``L = L_cl + alpha * L_s`` by :class:`iscse.ISCSELoss`, whose memory buffer sees the global batch on every rank;
  with ``--do_mlm``, ``+ mlm_weight * L_mlm`` over a masked copy of the batch encoded separately
  (:mod:`iscse.training.mlm`; ``L_mlm`` is each process's own).
  ``--ddp_gradient sum`` scales the loss by the world size so DDP's averaged gradient is the global batch's.
  For a CSV / JSONL file the forward pass takes each example's ``sent0``, ``sent1`` (and ``hard_neg``) instead of
  two copies: ``z1``, ``z2`` (and ``z3``, all-gathered too); a step with hard negatives runs
  :mod:`iscse.hard_negatives` (:meth:`_contrastive_loss`), and ``--iscse_hard_negatives released`` encodes them
  and drops them, as the released IS-CSE code does.
- :meth:`get_train_dataloader`: each epoch a permutation seeded with ``seed + epoch``, cut into global batches of
  which rank ``r`` reads the ``r``-th slice; so the data order is the same for any number of processes with the
  same global batch, and a data position is just (epoch, batch), which the library's resume skips to.
- :meth:`evaluate`: STS-B dev (and SICK-R dev when present) with the SentEval protocol, on the main process, under
  a forked RNG (evaluation never changes the training trajectory); the best model by STS-B dev goes to
  ``output_dir/model``.
- :meth:`save_checkpoint` / :meth:`load_checkpoint`: the memory buffer saved and restored with each checkpoint;
  checkpoints written atomically (:mod:`iscse.training.checkpoints`); replicas checked to hold the same buffer
  before a save. The library reaches them through :class:`~iscse.training._hf_adapter.CheckpointHooks`, the one
  place that overrides ``transformers.Trainer``'s private methods (and says why).
- :meth:`save_model`: the model as a ``SentenceEncoder`` folder.
- callbacks (:mod:`iscse.training.callbacks`): ``metrics.jsonl`` and the log line, ``curves.png`` (with
  matplotlib), Ctrl-C, and per-rank dropout seeds (``seed + rank``; the library seeds every rank alike).
"""
from __future__ import annotations

import functools
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.distributed as dist
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .. import __version__
from .._io import write_json
from .data import EpochBatchSampler, collate_sentences
from .distributed import gather_with_grad, is_distributed
from ..evaluation.encoder import SentenceEncoder
from ._hf_adapter import CheckpointHooks, rotate_checkpoints, signature_problems
from .arguments import ISCSETrainingArguments, settings_of
from .callbacks import CurvesPlot, MetricsLog, QuietProgress, RankSeed, StopOnSignal
from .checkpoints import publish, write_manifest
from .mlm import MLM_HEAD_FILE, TokenMasker, mask_seed, mlm_loss, scale_for_gradient_sum
from .model import ISCSEModel, StepAlpha

__all__ = ["ISCSETrainer", "EpochDataLoader"]

logger = logging.getLogger("iscse.train")

LOSS_STATE = "iscse_loss.pt"


class EpochDataLoader(torch.utils.data.DataLoader):
    """A ``DataLoader`` over an :class:`~iscse.training.data.EpochBatchSampler` whose ``set_epoch`` reaches the sampler
    (``transformers.Trainer`` calls it at every epoch)."""

    def set_epoch(self, epoch: int) -> None:
        """Iterate over epoch ``epoch``."""
        self.batch_sampler.set_epoch(epoch)


class ISCSETrainer(CheckpointHooks):
    """``transformers.Trainer`` for IS-CSE / SimCSE (see the module docstring).

    Args:
        model: an :class:`~iscse.training.model.ISCSEModel`.
        args: :class:`~iscse.training.arguments.ISCSETrainingArguments`.
        train_dataset: the tokenized corpus (``iscse.training.data.load_train_dataset``).
        data_dir: SentEval's ``data/downstream`` folder for the dev evaluation (None: no evaluation).
        alpha: the loss's alpha: a number, or the ``StepAlpha`` given to the loss (ignored for ``--objective
            simcse``).
        callbacks: more ``TrainerCallback`` s.

    After :meth:`train`: :attr:`metrics` (the :class:`MetricsLog`, whose ``history`` holds every step),
    :attr:`curves` (the :class:`CurvesPlot` that draws ``curves.png``), :attr:`best_metric` / :attr:`best_step` (STS-B dev Spearman x100 and its step), :attr:`stopped`.
    """

    def __init__(self, model: ISCSEModel, args: ISCSETrainingArguments, train_dataset, data_dir: Optional[str],
                 alpha: Union[float, StepAlpha] = 0.1, callbacks: Optional[Sequence[Any]] = None,
                 num_examples: Optional[int] = None) -> None:
        for problem in signature_problems():  # a transformers version the trainer was not tested with
            logger.warning("%s", problem)
        self.data_dir = data_dir
        self.alpha = alpha
        self.out = Path(args.output_dir)
        self.metrics = MetricsLog(self.out / "metrics.jsonl" if args.process_index == 0 else None)
        self.stop = StopOnSignal()
        self.curves = CurvesPlot(self.out)
        self.best_metric: Optional[float] = None
        self.best_step: Optional[int] = None
        self.first_eval: Optional[Dict[str, float]] = None  # the first STS-B dev score of this run: {"step", "score"}
        self.evaluated = False
        self._num_examples = num_examples if num_examples is not None else len(train_dataset)
        self._mlm_masker: Optional[TokenMasker] = None
        self._mlm_micro = (0, 0)  # (optimizer step, micro-batch index) of the last masked micro-batch
        self.sentences_per_example = _sentences_per_example(train_dataset)
        tokenizer = model.encoder.tokenizer
        super().__init__(
            model=model, args=args, train_dataset=train_dataset,
            # The library refuses eval_strategy "steps" without an eval_dataset, and its evaluation loop is not used:
            # evaluate() (overridden, public) scores the SentEval folder named here.
            eval_dataset=[data_dir] if data_dir else None,
            data_collator=functools.partial(collate_sentences, pad_token_id=tokenizer.pad_token_id,
                                            padding_side=tokenizer.padding_side),
            # CurvesPlot after MetricsLog: at the end of training it draws what MetricsLog has just flushed
            callbacks=[RankSeed(), self.metrics, self.stop, self.curves, *(callbacks or [])],
        )
        # The Hugging Face progress bar prints every log dict; MetricsLog writes a readable line instead.
        self.remove_callback(PrinterCallback)
        self.remove_callback(ProgressCallback)
        if not args.disable_tqdm:
            self.add_callback(QuietProgress)

    @property
    def stopped(self) -> bool:
        """True when the run was stopped by a signal (a checkpoint was saved)."""
        return self.stop.stopped

    @property
    def encoder(self) -> SentenceEncoder:
        """The :class:`~iscse.evaluation.encoder.SentenceEncoder` being trained."""
        return self.model.encoder

    # ------------------------------------------------------------------ data

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """Batches of this rank's slice of each global batch, an epoch a fresh permutation (``seed + epoch``; the
        seed is ``--data_seed`` when given, else ``--seed``)."""
        args = self.args
        seed = args.data_seed if args.data_seed is not None else args.seed
        sampler = EpochBatchSampler(len(self.train_dataset), args.per_device_train_batch_size, seed,
                                    args.world_size, args.process_index)
        return EpochDataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                               num_workers=args.dataloader_num_workers,
                               pin_memory=args.dataloader_pin_memory and args.device.type == "cuda")

    # ------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs: Dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch=None):
        """Two dropout views (or an example's sentences), all-gather, IS-CSE (or SimCSE) loss; see the module
        docstring."""
        args = self.args
        n = self.sentences_per_example
        mlm = getattr(self.model, "mlm", None) if model.training else None
        if mlm is not None:
            mlm_ids, mlm_labels, num_masked = self._mask_for_mlm(inputs["input_ids"])
            emb, mlm_logits = model(**inputs, mlm_input_ids=mlm_ids)  # the masked copy is encoded separately
        else:
            emb = model(**inputs)  # (nB, H): rows n i .. n i + n - 1 are example i's views / sentences
        emb = emb.float()  # the loss runs in fp32, outside autocast
        z = emb.reshape(-1, n, emb.shape[-1])  # (B, n, H)
        z1, z2 = gather_with_grad(z[:, 0]), gather_with_grad(z[:, 1])  # (global B, H)
        # The hard negatives are gathered like z1 and z2 (SimCSE); the released IS-CSE code encodes them and then
        # drops them, gathering nothing (--iscse_hard_negatives released).
        z3 = gather_with_grad(z[:, 2]) if n == 3 and self.uses_hard_negatives else None
        step = self.state.global_step + 1
        with torch.autocast(device_type=emb.device.type, enabled=False):
            loss, l_cl, l_s, alpha = self._contrastive_loss(z1, z2, z3)
        l_mlm = None
        if mlm is not None:
            l_mlm = mlm_loss(mlm_logits, mlm_labels, num_masked)  # this process's masked tokens
            loss = loss + args.mlm_weight * l_mlm
        if model.training:
            self.metrics.add(step, loss, l_cl, l_s, alpha, self.optimizer.param_groups[0]["lr"], l_mlm=l_mlm)
        # Every rank holds the same global loss; DDP averages the per-rank gradients ("mean", the reference) or,
        # scaled by the world size, sums them into exactly the global-batch gradient ("sum").
        if args.ddp_gradient == "sum" and is_distributed():
            loss = scale_for_gradient_sum(loss, l_mlm, args.mlm_weight, dist.get_world_size())
        return (loss, emb) if return_outputs else loss

    def _mask_for_mlm(self, input_ids: torch.Tensor):
        """``--do_mlm``: the masked copy of this micro-batch's ``(N, L)`` ids, its labels and the number of masked
        tokens. The masks are drawn from a seed fixed by (seed, process, optimizer step, micro-batch), so a resumed
        run draws the ones the uninterrupted run drew."""
        if self._mlm_masker is None:
            self._mlm_masker = TokenMasker(self.encoder.tokenizer, self.args.mlm_probability)
        step = self.state.global_step + 1
        micro = self._mlm_micro[1] + 1 if self._mlm_micro[0] == step else 0
        self._mlm_micro = (step, micro)
        return self._mlm_masker(input_ids, mask_seed(self.args.seed, self.args.process_index, step, micro))

    @property
    def uses_hard_negatives(self) -> bool:
        """True when the examples carry a hard negative that the objective uses: always for ``--objective simcse``;
        for ``iscse`` with ``--iscse_hard_negatives columns`` (with ``released`` they are encoded and dropped)."""
        return self.sentences_per_example == 3 and (
            self.model.criterion is None or getattr(self.args, "iscse_hard_negatives", "columns") == "columns")

    def _contrastive_loss(self, z1: torch.Tensor, z2: torch.Tensor, z3: Optional[torch.Tensor]):
        """``(loss, L_cl, L_s, alpha)`` of the gathered ``(B, H)`` embeddings; ``z3`` the hard negatives or None.
        With hard negatives the step runs :mod:`iscse.hard_negatives` (torch, whatever ``--ops``)."""
        args = self.args
        criterion = self.model.criterion
        weight = getattr(args, "hard_negative_weight", 0.0)
        if criterion is not None:
            if isinstance(self.alpha, StepAlpha):
                self.alpha.step = self.state.global_step
                alpha = self.alpha(0)
            else:
                alpha = float(self.alpha)
            if z3 is None:
                loss = criterion(z1, z2)
            else:
                from ..hard_negatives import hard_negative_step

                loss = hard_negative_step(criterion, z1, z2, z3, hard_negative_weight=weight)
            l_cl, l_s = criterion.last_components
            return loss, l_cl, l_s, alpha
        if z3 is None:
            from ..functional import info_nce

            loss = info_nce(z1, z2, args.temp, backend=args.ops)
        else:
            from ..hard_negatives import hard_negative_info_nce

            loss = hard_negative_info_nce(z1, z2, z3, args.temp, weight)
        return loss, loss.detach(), torch.zeros((), device=loss.device), 0.0

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """The library's step; the loss it reports is the unscaled global loss under ``--ddp_gradient sum``."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.args.ddp_gradient == "sum" and is_distributed():
            loss = loss / dist.get_world_size()
        return loss

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> Dict[str, float]:
        """Score STS-B dev (and SICK-R dev) on the main process; keep the model in ``output_dir/model`` when STS-B
        dev is the best so far. Returns ``{prefix_stsb_spearman, prefix_sickr_spearman, prefix_avg_sts}``
        (Spearman x100) on every process."""
        from accelerate.utils import broadcast_object_list

        from ..evaluation.evaluate import evaluate_sts

        if self.data_dir is None:
            return {}
        tasks = self.args.dev_tasks
        results = None
        if self.is_world_process_zero():
            device = self.args.device
            devices = [device.index or 0] if device.type == "cuda" else []
            # Evaluation draws no random numbers, but fork the RNG anyway: where and how often the model is
            # evaluated must never change the training trajectory.
            with torch.random.fork_rng(devices=devices):
                results = evaluate_sts(self.encoder, self.data_dir, tasks=list(tasks), mode="dev",
                                       batch_size=self.args.per_device_eval_batch_size, show_progress=False)
        if self.args.world_size > 1:
            results = broadcast_object_list([results])[0]
        stsb = results["STSBenchmark"]
        metrics = {f"{metric_key_prefix}_stsb_spearman": stsb}
        if "SICKRelatedness" in results:
            metrics[f"{metric_key_prefix}_sickr_spearman"] = results["SICKRelatedness"]
        metrics[f"{metric_key_prefix}_avg_sts"] = results["avg"]
        step = self.state.global_step
        if self.first_eval is None:
            self.first_eval = {"step": step, "score": stsb}
        improved = self.best_metric is None or stsb > self.best_metric
        self.evaluated = True
        if improved:
            self.best_metric, self.best_step = stsb, step
            self.state.best_metric = stsb
            if self.is_world_process_zero():
                self.encoder.save_pretrained(self.out / "model")
        self.accelerator.wait_for_everyone()
        sick = metrics.get(f"{metric_key_prefix}_sickr_spearman")
        logger.info("step %d: STS-B dev %.2f%s%s", step, stsb, "" if sick is None else f", SICK-R dev {sick:.2f}",
                    " (best so far: saved to model/)" if improved else
                    f" (best {self.best_metric:.2f} at step {self.best_step})")
        self.metrics.write({"event": "eval", "step": step, **{k.replace(f"{metric_key_prefix}_", "eval_"): v
                                                              for k, v in metrics.items()}, "best": improved})
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """The model as a ``SentenceEncoder`` folder (``AutoModel`` / ``SentenceTransformer`` load it too) and the
        training arguments, in ``output_dir`` (default ``args.output_dir``); written in place (checkpoints are
        published atomically by :meth:`save_checkpoint`). ``_internal_call``: the library's flag for its own calls
        (a checkpoint); nothing is pushed anywhere either way."""
        if not self.args.should_save:  # the library calls this on every process
            return
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        self.encoder.save_pretrained(folder, atomic=False)
        torch.save(self.args, folder / "training_args.bin")

    def save_checkpoint(self, model, trial) -> None:
        """Called on every process at a save step. The library's checkpoint, written into a staging folder,
        completed with the IS-CSE state and a manifest, flushed and renamed into ``output_dir/checkpoint-N`` in one
        step; then older ones are rotated out."""
        self._check_replicas_agree()
        self.metrics.flush()
        step = self.state.global_step
        name = f"checkpoint-{step}"
        staging = self.out / f".staging-{name}"
        if self.is_world_process_zero():
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.library_checkpoint_into(str(staging), model, trial)  # writes staging/checkpoint-N
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            staged = staging / name
            if self.model.criterion is not None:
                torch.save(self.model.criterion.state_dict(), staged / LOSS_STATE)
            if getattr(self.model, "mlm", None) is not None:  # training-only, like the loss state: not in model/
                from safetensors.torch import save_file

                save_file(self.model.mlm.head_state_dict(), str(staged / MLM_HEAD_FILE), metadata={"format": "pt"})
            write_json(staged / "train_config.json", settings_of(self.args))
            write_manifest(staged, {
                "step": step, "num_examples": self._num_examples, "world_size": self.args.world_size,
                "best_metric": self.best_metric, "best_step": self.best_step, "evaluated": self.evaluated,
                "iscse_version": __version__, "saved_at": time.time()})
            publish(staged, self.out / name)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(self.out, self.args.save_total_limit)
            logger.info("saved checkpoint %s", self.out / name)
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self, resume_from_checkpoint: str) -> None:
        """At the start of a resumed ``train()``: load the encoder's weights and the IS-CSE memory buffer from a
        checkpoint (the optimizer, scheduler, scaler, RNG and trainer state are the library's)."""
        import json

        folder = Path(resume_from_checkpoint)
        loaded = SentenceEncoder.from_pretrained(str(folder))
        self.encoder.load_state_dict(loaded.state_dict())
        del loaded
        if self.model.criterion is not None:
            state = torch.load(folder / LOSS_STATE, map_location="cpu", weights_only=True)
            self.model.criterion.load_state_dict(state)
        if getattr(self.model, "mlm", None) is not None:
            from safetensors.torch import load_file

            self.model.mlm.load_head_state_dict(load_file(str(folder / MLM_HEAD_FILE), device="cpu"))
        extra = json.loads((folder / "iscse_state.json").read_text(encoding="utf-8"))
        self.best_metric, self.best_step = extra.get("best_metric"), extra.get("best_step")
        self.evaluated = bool(extra.get("evaluated", self.best_metric is not None))

    def _check_replicas_agree(self) -> None:
        """Under DDP every rank must hold the same memory buffer (it is pushed the same all-gathered batch); a
        checkpoint records rank 0's, so compare a checksum first and refuse to save a state that is not shared."""
        criterion = self.model.criterion
        if not is_distributed() or criterion is None:
            return
        sums = []
        for value in _leaves(criterion.state_dict()):
            t = torch.as_tensor(value).to(self.args.device, torch.float64)
            sums += [t.sum(), t.abs().sum()]
        mine = torch.stack(sums)  # checksums of every number in the loss's state (buffer rows, pointer, counts)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        if any(not torch.equal(every[0], other) for other in every[1:]):
            raise RuntimeError(f"the IS-CSE memory buffers of the {dist.get_world_size()} ranks differ at step "
                               f"{self.state.global_step}; not saving a checkpoint that rank 0 alone describes")


def _sentences_per_example(dataset) -> int:
    """2 for a one-sentence-a-line dataset (two dropout views of each) and for pairs, 3 for triples (rows of
    ``input_ids`` that are lists of 2 or 3 token lists; :func:`~iscse.training.data.load_train_dataset`)."""
    if len(dataset) == 0:
        return 2
    ids = dataset[0]["input_ids"]
    return len(ids) if len(ids) and isinstance(ids[0], (list, tuple)) else 2


def _leaves(obj: Any):
    """Every tensor and number inside a nested state dict, in a fixed order."""
    if isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from _leaves(obj[key])
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _leaves(item)
    elif isinstance(obj, torch.Tensor) or (isinstance(obj, (int, float)) and not isinstance(obj, bool)):
        yield obj
