"""IS-CSE as a sentence-transformers loss, and the callback that keeps its memory buffer in checkpoints.

:class:`ISCSELoss` follows sentence-transformers' loss contract (the model first; ``forward(sentence_features,
labels)``; ``compute_loss_from_embeddings``; ``get_config_dict``; ``citation``), so it goes wherever
``MultipleNegativesRankingLoss`` goes: ``SentenceTransformerTrainer(model=model, loss=loss, ...)``. The computation is
:class:`iscse.ISCSELoss` (composed, not reimplemented): this module only embeds the two text columns, gathers them
across ranks when asked, and reports the two parts of the loss to the trainer's logs.

The memory buffer is training state that no model file holds. :class:`ISCSECheckpointCallback` (from
:meth:`ISCSELoss.checkpoint_callback`) writes it into every checkpoint the trainer saves and reads it back on
``trainer.train(resume_from_checkpoint=...)``, so a resumed run continues with the same buffer, step and alpha.

Supported: sentence-transformers 3.x to 6.x (tested with 3.4.1 and 5.1.2 on transformers 4.57, 6.0.0 and 6.2.0 on
transformers 5.24). sentence-transformers itself is imported only when a loss is first called, and ``import iscse``
loads neither it nor this module.
"""
from __future__ import annotations

import functools
import math
import numbers
import os
import re
import warnings
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from transformers import TrainerCallback

from ..loss import AlphaSchedule
from ..loss import ISCSELoss as _ISCSECriterion

__all__ = ["ISCSELoss", "ISCSECheckpointCallback", "STATE_FILE"]

# The file each checkpoint gets, beside the trainer's rng_state.pth (one per process when there are several, named
# the way transformers names its per-process RNG files).
STATE_FILE = "iscse_loss_state.pt"

# The criteria (iscse.ISCSELoss) whose ISCSECheckpointCallback has seen a trainer start: a loss whose criterion is not
# here warns at its first training call. Weak, so a finished run's loss is not kept alive by it.
_CHECKPOINTED: "weakref.WeakSet[_ISCSECriterion]" = weakref.WeakSet()

CITATION = """
@inproceedings{he2023instance,
    title = {Instance Smoothed Contrastive Learning for Unsupervised Sentence Embedding},
    author = {He, Hongliang and Zhang, Junlei and Lan, Zhenzhong and Zhang, Yue},
    booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
    volume = {37},
    number = {11},
    pages = {12863--12871},
    year = {2023},
    doi = {10.1609/aaai.v37i11.26512},
}
"""


@functools.lru_cache(maxsize=None)
def _trainer_logs_loss_dicts() -> bool:
    """True when the installed SentenceTransformerTrainer accepts a dict of loss parts, sums it and logs each part
    (its ``track_loss_components``; sentence-transformers 3.x before that only takes a tensor)."""
    try:
        from sentence_transformers import SentenceTransformerTrainer
    except ImportError:  # pragma: no cover - only without sentence-transformers
        return False
    return hasattr(SentenceTransformerTrainer, "track_loss_components")


def _embedding_dim(model) -> int:
    for name in ("get_embedding_dimension", "get_sentence_embedding_dimension"):  # 6.x, and 3.x-6.x
        getter = getattr(model, name, None)
        if callable(getter):
            dim = getter()
            if isinstance(dim, int) and dim > 0:
                return dim
    raise ValueError("could not read the embedding width from model (get_sentence_embedding_dimension() gave none); "
                     "pass dim=")


def _world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _batch_sizes(rows: int, device: torch.device) -> List[int]:
    """Every rank's batch size, in rank order: one small all-gather and one host read (the sizes are shapes, which
    the host needs to trim the padded rows; under NCCL the tensor must live on the rank's CUDA device)."""
    mine = torch.tensor([rows], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, mine)
    return [int(n) for n in torch.cat(sizes).tolist()]


class _GatherGlobalBatch(torch.autograd.Function):
    """All-gather ``(B_r, W)`` rows from every rank ``r`` into the global ``(sum_r B_r, W)`` batch, in rank order.

    ``sizes`` (host ints, :func:`_batch_sizes`) may differ between ranks, e.g. a short last batch with
    ``dataloader_drop_last=False``: ``dist.all_gather`` needs equal shapes, so every rank pads its rows with zeros to
    ``max(sizes)``, gathers, and drops each rank's padding.

    Backward returns this rank's slice of the incoming gradient times ``world``. Every rank computes the same loss on
    the same global batch (and holds the same buffer), so that is exactly what ``torch.distributed.nn.all_gather``'s
    backward (a reduce-scatter sum over ranks) would return, without a collective in the backward pass; after DDP
    averages the ranks' parameter gradients, the update is the gradient of the global-batch loss, the same as one
    process that sees the whole global batch (sentence-transformers' convention for ``gather_across_devices``). The
    factor is ``world`` whatever the sizes: DDP averages over ranks, not over rows.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: List[int]) -> torch.Tensor:
        rank, world = _world()
        ctx.world, ctx.rows, ctx.start = world, x.shape[0], sum(sizes[:rank])
        x = x.contiguous()
        most = max(sizes)
        if x.shape[0] < most:
            x = torch.cat([x, x.new_zeros((most - x.shape[0],) + tuple(x.shape[1:]))])
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        if min(sizes) < most:
            parts = [part[:n] for part, n in zip(parts, sizes)]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[ctx.start:ctx.start + ctx.rows] * ctx.world, None


def gather_global_batch(*tensors: torch.Tensor) -> tuple:
    """Each of ``tensors`` (``(B, D_i)`` with the same ``B`` on this rank) from every rank, concatenated in rank order
    into ``(sum of B over ranks, D_i)``, differentiable (see :class:`_GatherGlobalBatch`); ranks may have different
    ``B``. The tensors travel in one all-gather (joined along dim 1 when they share a dtype), after one small
    all-gather of the batch sizes. Returns ``tensors`` themselves without an initialised process group or with one
    process. Every rank must call it, in the same order."""
    if _world()[1] == 1:
        return tuple(tensors)
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != tensors[0].shape[0]:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"embeddings must be (B, D) tensors with the same B to be gathered across devices; "
                             f"embeddings[{i}] is {got}, embeddings[0] has B = {tensors[0].shape[0]}")
    sizes = _batch_sizes(tensors[0].shape[0], tensors[0].device)
    if len({t.dtype for t in tensors}) == 1 and len({t.device for t in tensors}) == 1:
        joined = _GatherGlobalBatch.apply(torch.cat(tensors, dim=1), sizes)
        return tuple(joined.split([t.shape[1] for t in tensors], dim=1))
    return tuple(_GatherGlobalBatch.apply(t, sizes) for t in tensors)


class ISCSELoss(nn.Module):
    """IS-CSE (instance-smoothed contrastive learning) as a sentence-transformers loss.

    Computes ``L = L_cl + alpha * L_s`` (He et al., AAAI 2023) with :class:`iscse.ISCSELoss`: with ``z1`` the
    embeddings of the **first** column (anchor) and ``z2`` those of the **second** column (positive),
    ``L_cl = CE(scale * cos(z1_i, z2_j), target j = i)`` (in-batch negatives, SimCSE's loss) and
    ``L_s = CE(scale * cos(z1_i, z*_j), target j = i)``, where the smoothed positive ``z*_i`` is ``normalize(z2_i)``
    averaged by attention (logits divided by ``attn_temperature``) with its ``k`` nearest rows in a FIFO memory
    buffer. The buffer holds the **positives'** normalised embeddings ``normalize(z2)``: each training call pushes
    the batch's, and ``L_s`` starts once ``buffer_size`` rows have been pushed (before that ``L = L_cl``).

    - **Unsupervised IS-CSE** (the paper): a dataset with two identical text columns, e.g.
      ``{"anchor": sentences, "positive": sentences}``. The two views differ only by dropout, so the model must be
      in train mode (``SentenceTransformerTrainer`` puts it there; a warning is raised once if the first training
      batch gives identical views).
    - **Supervised**: ``(anchor, positive)`` pairs (e.g. NLI entailment pairs): contrastive training with in-batch
      negatives where the second term pulls each anchor towards its smoothed positive. A third (hard negative)
      column is not supported here; see the README's "sentence-transformers" section for a hard-negative loss
      built from :func:`iscse.knn_topk` and :func:`iscse.smooth`.

    Args:
        model: the ``SentenceTransformer`` being trained.
        buffer_size: buffer rows ``M`` (paper 1024); the (global) batch size may not exceed it.
        k: neighbours per positive (paper 16), ``1 <= k < buffer_size``.
        scale: the logit scale, ``1 / temperature``: ``scale=20.0`` is SimCSE's and IS-CSE's temperature 0.05.
        attn_temperature: the divisor of the attention logits (the paper's code uses 2).
        alpha: weight of ``L_s``: a number (paper 0.1 for base models) or a callable of the step such as
            ``iscse.alpha_schedule("cosine", total_steps=T)`` (the step counts training calls).
        gather_across_devices: under data parallelism, all-gather both columns across ranks first, so the loss,
            its in-batch negatives and the buffer push use the global batch and every rank holds the same buffer;
            the gradient reaches each rank's encoder through its own rows (the update is that of the global-batch
            loss after DDP averages). Ranks may hold batches of different sizes (a short last batch: the trainer
            does not even them out), at the cost of one more small all-gather and host read per step. Without it
            each rank has its own buffer of its own positives.
        dim: embedding width; default ``model.get_sentence_embedding_dimension()``.
        backend: passed to :class:`iscse.ISCSELoss` (``"auto"``: the torch path, or the fused Triton kernels on
            CUDA / FAISS's kNN for large buffers once they have matched it on the first full step; see
            :mod:`iscse.backends`).
        knn_backend: passed to :class:`iscse.ISCSELoss`: a backend for the kNN step only.
        buffer_dtype: passed to :class:`iscse.ISCSELoss`: the buffer's storage dtype.
        grouping: the paper's ablation, passed to :class:`iscse.ISCSELoss`: ``"knn"`` (default) or ``"pddp"``.
        aggregation: the paper's ablation, passed to :class:`iscse.ISCSELoss`: ``"attention"`` (default) or
            ``"mean"``.
        return_components: ``forward`` returns ``{"L_cl": ..., "alpha_L_s": ...}`` (the trainer sums the parts and
            logs each beside ``loss``) when True, the scalar loss when False; None (default): a dict when the
            installed ``SentenceTransformerTrainer`` takes one (sentence-transformers with ``track_loss_components``).

    Checkpoints: the buffer, the step and alpha's schedule are training state outside the model. Pass
    ``callbacks=[loss.checkpoint_callback()]`` to the trainer so that they are saved in each checkpoint and restored
    by ``trainer.train(resume_from_checkpoint=...)`` (:class:`ISCSECheckpointCallback`). Without such a callback
    the first training call warns once (neither the trainer nor the model saves a loss's state, see the callback).

    Inputs: a dataset of two text columns (anchor, positive); labels none.

    Example::

        from datasets import Dataset
        from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
        from iscse.integrations.sentence_transformers import ISCSELoss

        model = SentenceTransformer("path/or/name")
        sentences = ["It's nice weather outside today.", "He drove to work.", ...]
        train_dataset = Dataset.from_dict({"anchor": sentences, "positive": sentences})  # unsupervised IS-CSE
        loss = ISCSELoss(model, buffer_size=1024, k=16, scale=20.0, alpha=0.1)
        trainer = SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss,
                                             callbacks=[loss.checkpoint_callback()])
        trainer.train()
    """

    def __init__(self, model, buffer_size: int = 1024, k: int = 16, scale: float = 20.0,
                 attn_temperature: float = 2.0, alpha: Union[float, Callable[[int], float]] = 0.1,
                 gather_across_devices: bool = False, *, dim: Optional[int] = None, backend: str = "auto",
                 knn_backend: Optional[str] = None, buffer_dtype: torch.dtype = torch.float32,
                 return_components: Optional[bool] = None, grouping: str = "knn",
                 aggregation: str = "attention") -> None:
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a positive finite number (1 / temperature, e.g. 20.0), got {scale!r}")
        if not isinstance(gather_across_devices, bool):
            raise TypeError(f"gather_across_devices must be a bool, got {type(gather_across_devices).__name__}")
        if return_components is not None and not isinstance(return_components, bool):
            raise TypeError(f"return_components must be None or a bool, got {type(return_components).__name__}")
        if dim is None:
            dim = _embedding_dim(model)
        self.scale = float(scale)
        self.gather_across_devices = gather_across_devices
        self.return_components = return_components
        self.criterion = _ISCSECriterion(dim, buffer_size=buffer_size, k=k, temperature=1.0 / self.scale,
                                         attn_temperature=attn_temperature, alpha=alpha, backend=backend,
                                         knn_backend=knn_backend, buffer_dtype=buffer_dtype, grouping=grouping,
                                         aggregation=aggregation)
        # The hyperparameters as given (validated by the criterion above), for get_config_dict.
        self._config = {"buffer_size": buffer_size, "k": k, "scale": self.scale, "attn_temperature": attn_temperature,
                        "alpha": alpha if isinstance(alpha, numbers.Real) else repr(alpha),
                        "gather_across_devices": gather_across_devices, "backend": str(backend),
                        "grouping": grouping, "aggregation": aggregation}
        self.model = model  # set last: a bad argument above leaves no half-built loss holding the model
        self._views_checked = False
        self._checkpoint_warned = False

    @property
    def temperature(self) -> float:
        """``1 / scale``: the InfoNCE temperature (0.05 for scale 20)."""
        return 1.0 / self.scale

    @property
    def last_components(self) -> Optional[tuple]:
        """``(L_cl, L_s)`` of the last call, detached (``L_s`` unweighted), or None before the first call."""
        return self.criterion.last_components

    def forward(self, sentence_features: Iterable[Dict[str, torch.Tensor]],
                labels: Optional[torch.Tensor] = None) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """Embed the two columns (anchor, positive) with the model and return the loss (or its two parts, see
        ``return_components``). ``labels`` are ignored."""
        features = list(sentence_features)
        if len(features) != 2:
            raise ValueError(f"ISCSELoss takes exactly two text columns (anchor, positive), got {len(features)}; "
                             "for hard negatives build a loss from iscse.knn_topk and iscse.smooth (README)")
        # One forward per column, as sentence-transformers' losses did up to 5.x (6.x embeds a two-column batch the
        # same way): each forward draws its own dropout masks, which makes the two views of unsupervised IS-CSE.
        embeddings = [self.model(f)["sentence_embedding"] for f in features]
        return_components = _trainer_logs_loss_dicts() if self.return_components is None else self.return_components
        if not self._checkpoint_warned and torch.is_grad_enabled():
            self._warn_without_checkpoint_callback()
        # The weight this call uses (the step advances in the call), only when the parts are logged, and as a device
        # value: a float() of a scheduled alpha would read the device every step (a sync on CUDA).
        alpha = self.criterion.current_alpha(as_tensor=True) if return_components else None
        loss = self.compute_loss_from_embeddings(embeddings, labels)
        if not return_components:
            return loss
        # The trainer sums the parts (so they must carry the graph) and logs each: L_cl carries the gradient of the
        # whole loss, alpha * L_s is the detached value of the second part.
        l_s = self.criterion.last_components[1]
        alpha_l_s = alpha.to(l_s.dtype) * l_s
        return {"L_cl": loss - alpha_l_s, "alpha_L_s": alpha_l_s}

    def _warn_without_checkpoint_callback(self) -> None:
        """Warn once, at the first training call, when no :class:`ISCSECheckpointCallback` of this loss has seen a
        trainer start (``on_train_begin``): the buffer would then be missing from every checkpoint, and a resumed
        run would silently start with an empty buffer and alpha's schedule at step 0."""
        self._checkpoint_warned = True
        if self.criterion not in _CHECKPOINTED:
            warnings.warn("ISCSELoss: no checkpoint callback is bound to this loss, so the trainer's checkpoints will "
                          "not hold its memory buffer, step and alpha schedule, and a resumed run restarts them "
                          "(L_s off until the buffer fills again); pass callbacks=[loss.checkpoint_callback()] to "
                          "the trainer", UserWarning, stacklevel=2)

    def compute_loss_from_embeddings(self, embeddings: List[torch.Tensor],
                                     labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The scalar loss for ``embeddings = [z1, z2]`` (anchor, positive), each ``(B, D)``; pushes
        ``normalize(z2)`` (gathered across ranks with ``gather_across_devices``) into the buffer."""
        if not isinstance(embeddings, (list, tuple)) or len(embeddings) != 2:
            raise ValueError("embeddings must be a list [z1, z2] of the anchor and positive embeddings")
        z1, z2 = embeddings
        if not self._views_checked and torch.is_grad_enabled() and isinstance(z1, torch.Tensor):
            self._views_checked = True  # once: torch.equal reads a flag back from the device
            if z1.shape == z2.shape and torch.equal(z1, z2):
                warnings.warn("ISCSELoss: the anchor and positive embeddings of the first training batch are "
                              "identical; unsupervised IS-CSE needs dropout to make two views (is the model in "
                              "train mode, with dropout > 0?)", stacklevel=2)
        if self.gather_across_devices:
            z1, z2 = gather_global_batch(z1, z2)
        return self.criterion(z1, z2)

    def checkpoint_callback(self, resume_from_checkpoint: Optional[str] = None, strict: bool = True,
                            name: Optional[str] = None) -> "ISCSECheckpointCallback":
        """A trainer callback that saves this loss's buffer and step in every checkpoint and restores them on
        resume; see :class:`ISCSECheckpointCallback`."""
        return ISCSECheckpointCallback(self, resume_from_checkpoint=resume_from_checkpoint, strict=strict, name=name)

    def get_config_dict(self) -> Dict[str, Any]:
        """The hyperparameters, for the model card."""
        return dict(self._config)

    @property
    def citation(self) -> str:
        """BibTeX of the IS-CSE paper."""
        return CITATION


def _state_file(world_size: int, process_index: int, name: Optional[str] = None) -> str:
    stem, ext = os.path.splitext(STATE_FILE)
    if name:
        stem = f"{stem}-{name}"
    if world_size > 1:
        stem = f"{stem}_{process_index}"
    return stem + ext


def _load_state(path: str) -> Dict[str, Any]:
    """``torch.load`` with ``weights_only=True`` (tensors, numbers, strings, containers), admitting the package's
    ``AlphaSchedule`` in case a loss state carries its schedule object."""
    with torch.serialization.safe_globals([AlphaSchedule]):
        return torch.load(path, map_location="cpu", weights_only=True)


class ISCSECheckpointCallback(TrainerCallback):
    """Keeps an IS-CSE loss's memory buffer, step and alpha schedule in the trainer's checkpoints.

    - ``on_save`` (after the trainer wrote ``checkpoint-<step>``): writes ``loss.criterion.state_dict()`` into that
      folder as ``iscse_loss_state.pt`` (``iscse_loss_state_<rank>.pt`` per process when there are several, like
      transformers' ``rng_state_<rank>.pth``: without ``gather_across_devices`` each rank has its own buffer).
    - ``on_train_begin`` of a resumed run (the trainer has then restored ``global_step`` from the checkpoint):
      reads the file back with ``load_state_dict``. The checkpoint folder is the first of ``resume_from_checkpoint``
      given here, ``args.resume_from_checkpoint``, and ``<output_dir>/checkpoint-<global_step>`` (where
      ``resume_from_checkpoint=True`` and a path inside ``output_dir`` point) that holds a state file of the same
      step. Pass ``resume_from_checkpoint`` here when resuming from a folder outside ``output_dir``.

    ``strict`` (default True): a resumed run without a matching state file raises ``FileNotFoundError`` instead of
    going on with an empty buffer (``L_s`` would then be off until the buffer fills again); False warns instead.
    ``name``: tells the files of several IS-CSE losses apart (e.g. a dict of losses, one per dataset):
    ``iscse_loss_state-<name>.pt``. Under hyperparameter search (checkpoints in per-trial folders that a callback
    cannot see) nothing is saved, with a warning.

    Why a callback: ``on_save`` and ``on_train_begin`` are transformers' public, stable hooks (every
    ``Trainer`` subclass calls them, from transformers 4.x to 5.x), whereas the trainer's private ``_save_checkpoint``
    / ``_load_from_checkpoint`` have changed signatures between versions and are overridden by sentence-transformers;
    and the buffer cannot live in the model's state (it would be saved into the model files). Nothing lets the loss
    add the callback itself: ``SentenceTransformerTrainer`` saves only the model (``_save``: ``save_pretrained``)
    and the optimizer (which holds a loss's parameters, not its buffers), and hands the loss no reference to the
    trainer; hence the one line, and the loss's warning at its first training call when the line is missing.
    """

    def __init__(self, loss: ISCSELoss, resume_from_checkpoint: Optional[str] = None, strict: bool = True,
                 name: Optional[str] = None) -> None:
        criterion = getattr(loss, "criterion", loss)
        if not isinstance(criterion, _ISCSECriterion):
            raise TypeError(f"loss must be an iscse ISCSELoss (sentence-transformers or plain), got "
                            f"{type(loss).__name__}")
        if resume_from_checkpoint is not None and not isinstance(resume_from_checkpoint, (str, os.PathLike)):
            raise TypeError(f"resume_from_checkpoint must be a path or None, got "
                            f"{type(resume_from_checkpoint).__name__}")
        if name is not None and (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.]+", name)):
            raise ValueError(f"name must be None or a non-empty string of letters, digits, '_' and '.', got {name!r}")
        self.criterion = criterion
        self.resume_from_checkpoint = resume_from_checkpoint
        self.strict = bool(strict)
        self.name = name
        self.loaded_from: Optional[str] = None  # the state file the last resume read, for logs and tests

    def on_save(self, args, state, control, **kwargs):
        """Write the loss state into the checkpoint folder the trainer just wrote."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        if getattr(state, "is_hyper_param_search", False):
            warnings.warn("ISCSECheckpointCallback: hyperparameter search writes checkpoints into per-trial folders; "
                          "the IS-CSE loss state is not saved", stacklevel=2)
            return control
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        payload = {"global_step": int(state.global_step), "world_size": int(args.world_size),
                   "process_index": int(args.process_index), "criterion": self.criterion.state_dict()}
        torch.save(payload, os.path.join(folder, _state_file(args.world_size, args.process_index, self.name)))
        return control

    def on_train_begin(self, args, state, control, **kwargs):
        """On a resumed run, restore the loss state saved with the checkpoint."""
        _CHECKPOINTED.add(self.criterion)
        if state.global_step == 0:
            return control
        name = _state_file(args.world_size, args.process_index, self.name)
        candidates = []
        for folder in (self.resume_from_checkpoint, getattr(args, "resume_from_checkpoint", None)):
            if isinstance(folder, (str, os.PathLike)):
                candidates.append(os.fspath(folder))
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
        candidates.append(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        for folder in candidates:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                continue
            payload = _load_state(path)
            if int(payload.get("global_step", -1)) != state.global_step:
                continue
            self.criterion.load_state_dict(payload["criterion"])
            self.loaded_from = path
            return control
        message = (f"resuming at step {state.global_step} but no {name} of that step was found in {candidates}: "
                   "the IS-CSE buffer and step cannot be restored; pass the checkpoint folder as "
                   "loss.checkpoint_callback(resume_from_checkpoint=...)")
        if self.strict:
            raise FileNotFoundError(message)
        warnings.warn(message + "; going on with an empty buffer (strict=False)", stacklevel=2)
        return control
