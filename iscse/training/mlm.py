"""The masked-language-model auxiliary objective of SimCSE / IS-CSE (``--do_mlm --mlm_weight --mlm_probability``).

What the released code does (SimCSE's ``cl_forward``, kept by IS-CSE): every view of every sentence in the batch is
masked independently as BERT pre-training masks (``mlm_probability`` of the non-special tokens are chosen; of those
80% become the mask token, 10% a random token, 10% stay), the masked copy is encoded *separately* by the same
encoder (same attention mask, its own dropout), a masked-LM head predicts the chosen tokens, and
``L = L_cl + alpha * L_s + mlm_weight * L_mlm`` with ``L_mlm`` the cross-entropy averaged over the chosen tokens.

- :class:`TokenMasker` draws the masks with ``transformers``' own ``DataCollatorForLanguageModeling.torch_mask_tokens``
  on CPU, from a generator seeded by the position in the run (:func:`mask_seed`: seed, process, optimizer step,
  micro-batch), not from the global RNG: the masks of a step are then the same in a run that never stopped and in
  one resumed from a checkpoint, whatever the data loader prefetched or the evaluation drew.
- :class:`MaskedLMHead` is the head of the checkpoint's ``AutoModelForMaskedLM`` (BERT's ``cls``, RoBERTa's
  ``lm_head``, DistilBERT's ``vocab_*``, ModernBERT's ``head`` + ``decoder``, ...) placed on top of the encoder's own
  backbone, so the masked copy runs through the very weights being trained, and with the output embedding tied to
  the backbone's input embedding where the config ties them (as in pre-training). When the checkpoint holds no
  trained head (a plain ``AutoModel`` save, a sentence-transformers model) the head is initialised and a warning
  says so. (The released code builds ``BertLMPredictionHead`` under a name the BERT checkpoints do not use, so for
  BERT it always starts fresh and untied; RoBERTa's ``lm_head`` is loaded. Here a head is loaded wherever the
  checkpoint has one.)
- The head is a training-only part, like the MLP pooler of ``--mlp_only_train``: the saved model (``model/``, what
  ``AutoModel`` and ``SentenceTransformer`` load) stays the encoder; each checkpoint carries the head's own weights
  in :data:`MLM_HEAD_FILE` so that a resumed run continues exactly.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

__all__ = ["MLM_HEAD_FILE", "IGNORE_INDEX", "check_mlm_tokenizer", "mask_seed", "TokenMasker", "MaskedLMHead",
           "mlm_loss", "scale_for_gradient_sum"]

logger = logging.getLogger("iscse.train")

#: The head's weights (tied ones left out) in a checkpoint folder; ``SentenceEncoder`` and ``AutoModel`` ignore it.
MLM_HEAD_FILE = "iscse_mlm_head.safetensors"
#: Label of the tokens that are not predicted (``torch.nn.CrossEntropyLoss``'s default ``ignore_index``).
IGNORE_INDEX = -100


def check_mlm_tokenizer(tokenizer: Any, vocab_size: int) -> None:
    """Raise ``ValueError`` (one sentence) unless ``tokenizer`` can make masked-LM inputs for a model with
    ``vocab_size`` output tokens: it needs a mask token, and every id it produces (the random replacements are drawn
    from ``len(tokenizer)``) must be a row of the model's embedding."""
    if getattr(tokenizer, "mask_token", None) is None or getattr(tokenizer, "mask_token_id", None) is None:
        raise ValueError("its tokenizer has no mask token, which the masked-LM objective needs; use a model family "
                         "with one (BERT's [MASK], RoBERTa's <mask>, ...) or leave --do_mlm out")
    if len(tokenizer) > int(vocab_size):
        raise ValueError(f"its tokenizer has {len(tokenizer)} tokens but the model's vocabulary only {vocab_size}; "
                         "resize the token embeddings (model.resize_token_embeddings) and save it again")


def mask_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """A 64-bit seed for the masks of micro-batch ``micro`` of optimizer step ``step`` on process ``rank``, from the
    run's ``seed``: ``numpy.random.SeedSequence`` mixes the four numbers, so neighbouring positions get unrelated
    streams."""
    import numpy as np

    for name, value in (("seed", seed), ("rank", rank), ("step", step), ("micro", micro)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(np.random.SeedSequence([seed, rank, step, micro]).generate_state(1, dtype=np.uint64)[0])


class TokenMasker:
    """BERT's token masking for the MLM objective, by ``transformers.DataCollatorForLanguageModeling``.

    Args:
        tokenizer: the encoder's tokenizer (must have a mask token: :func:`check_mlm_tokenizer`).
        mlm_probability: share of the non-special tokens chosen for prediction, in ``(0, 1)``.

    ``masker(input_ids, seed)`` takes ``(N, L)`` int64 ids (any device; padding is a special token and never chosen)
    and returns ``(masked_ids, labels, num_masked)``: two ``(N, L)`` int64 tensors on the ids' device, in which the
    chosen tokens are replaced by the mask token (80%), a random token (10%) or kept (10%), and ``labels`` holds their
    original id there and :data:`IGNORE_INDEX` everywhere else; and the number of chosen tokens, a Python int (known
    on the host, so no device sync is needed to use it). The draws come from a CPU generator seeded with ``seed``
    only. ``transformers``' masking works on CPU tensors, so ids on a GPU are copied to the host first: one small
    device-to-host copy (a sync) per micro-batch, of ``N x L`` int64 (32 KB at the paper's shape).
    """

    def __init__(self, tokenizer: Any, mlm_probability: float = 0.15) -> None:
        from transformers import DataCollatorForLanguageModeling

        if isinstance(mlm_probability, bool) or not isinstance(mlm_probability, (int, float)) \
                or not 0.0 < float(mlm_probability) < 1.0:
            raise ValueError(f"mlm_probability must be a number in (0, 1), got {mlm_probability!r}")
        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=float(mlm_probability))
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)

    @property
    def mlm_probability(self) -> float:
        """The share of non-special tokens chosen."""
        return float(self.collator.mlm_probability)

    def __call__(self, input_ids: torch.Tensor, seed: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be a 2-D int64 tensor, got {getattr(input_ids, 'shape', input_ids)!r}")
        ids = input_ids.detach().to("cpu", copy=True)  # torch_mask_tokens works on CPU tensors, in place
        special = torch.isin(ids, self.special_ids)  # (N, L) bool: never chosen (padding included)
        # The library draws from collator.generator (None: the global RNG); a generator per call makes the masks a
        # function of `seed` alone.
        self.collator.generator = torch.Generator().manual_seed(seed)
        try:
            masked, labels = self.collator.torch_mask_tokens(ids, special_tokens_mask=special)
        finally:
            self.collator.generator = None
        num_masked = int(labels.ne(IGNORE_INDEX).sum())
        device = input_ids.device
        return masked.to(device, non_blocking=True), labels.to(device, non_blocking=True), num_masked


class MaskedLMHead(nn.Module):
    """The masked-LM head of an ``AutoModelForMaskedLM`` on top of a ``SentenceEncoder``'s backbone.

    Built with :meth:`from_pretrained` (the checkpoint's head, or an initialised one with a warning) or
    :meth:`from_config` (initialised; for a resumed run, whose checkpoint then supplies the weights). ``forward(
    input_ids, attention_mask, token_type_ids=None)`` runs the backbone on ``(N, L)`` ids and returns the ``(N, L,
    V)`` vocabulary logits, in the backbone's dtype (under autocast, its dtype).

    Only the head's modules are registered here (``state_dict`` keys such as ``heads.cls.predictions.transform.dense
    .weight``); the backbone belongs to the encoder. Where the config ties the output embedding to the input
    embedding, the two are one parameter (:meth:`head_state_dict` leaves it out).
    """

    def __init__(self, masked_lm: nn.Module, backbone: nn.Module) -> None:
        super().__init__()
        prefix = getattr(masked_lm, "base_model_prefix", "")
        if not prefix or not isinstance(getattr(masked_lm, prefix, None), nn.Module):
            raise TypeError(f"masked_lm must be a transformers masked-LM model, got {type(masked_lm).__name__}")
        if type(getattr(masked_lm, prefix)) is not type(backbone):
            raise TypeError(f"backbone is a {type(backbone).__name__} but {type(masked_lm).__name__} runs a "
                            f"{type(getattr(masked_lm, prefix)).__name__}")
        setattr(masked_lm, prefix, backbone)  # the masked copy runs through the encoder's own weights
        masked_lm.tie_weights()  # re-point the tied output embedding at the backbone's input embedding
        dtype = next(backbone.parameters()).dtype
        self.heads = nn.ModuleDict({name: module.to(dtype=dtype) for name, module in masked_lm.named_children()
                                    if name != prefix})
        # Not registered: its only parameters beyond the heads' are the backbone's, which the encoder owns.
        object.__setattr__(self, "_masked_lm", masked_lm)
        object.__setattr__(self, "_backbone", backbone)
        out = masked_lm.get_output_embeddings() if hasattr(masked_lm, "get_output_embeddings") else None
        self.tied = out is not None and out.weight is backbone.get_input_embeddings().weight
        self.initialised = False  # True when the head did not come from a checkpoint

    @classmethod
    def from_pretrained(cls, backbone: nn.Module, name_or_path: str, **hf_kwargs: Any) -> "MaskedLMHead":
        """The head stored in ``name_or_path`` (``AutoModelForMaskedLM``), on ``backbone``; a head the checkpoint
        does not hold (all or part of it) is initialised from the global RNG, and a warning names the missing
        weights. The checkpoint's own backbone weights are read and dropped. ``hf_kwargs`` go to
        ``from_pretrained``. Raises ``OSError`` (from ``transformers``) when the checkpoint cannot be read."""
        from transformers import AutoModelForMaskedLM
        from transformers.utils import logging as hf_logging

        # transformers prints a table of the missing head weights and their initialisation; one warning of ours
        # says it instead.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            masked_lm, info = AutoModelForMaskedLM.from_pretrained(str(name_or_path), output_loading_info=True,
                                                                   **hf_kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
        prefix = masked_lm.base_model_prefix
        missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(prefix + "."))
        head = cls(masked_lm, backbone)
        if missing:
            logger.warning("--do_mlm: %s holds no trained masked-LM head (%s missing); it starts initialised, as "
                           "the released SimCSE code's BERT head does", name_or_path, ", ".join(missing[:4])
                           + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))
        else:
            logger.info("--do_mlm: masked-LM head loaded from %s", name_or_path)
        head.initialised = bool(missing)
        return head

    @classmethod
    def from_config(cls, backbone: nn.Module) -> "MaskedLMHead":
        """An initialised head for ``backbone``'s config (``AutoModelForMaskedLM.from_config``); a resumed run loads
        the checkpoint's head weights into it with :meth:`load_head_state_dict`."""
        from transformers import AutoModelForMaskedLM

        head = cls(AutoModelForMaskedLM.from_config(backbone.config), backbone)
        head.initialised = True
        return head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(N, L)`` ids (masked) and attention mask -> ``(N, L, V)`` logits."""
        inputs: Dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        return self._masked_lm(**inputs, return_dict=True).logits

    def train(self, mode: bool = True) -> "MaskedLMHead":
        """Set train/eval mode on the heads and on the unregistered masked-LM wrapper alike."""
        super().train(mode)
        self._masked_lm.training = mode
        return self

    def _own_tensors(self) -> Tuple[Dict[str, torch.Tensor], set]:
        """The heads' state tensors, each once: ``(name -> tensor, names left out)``; left out are the aliases of a
        tensor already taken (BERT's ``decoder.bias`` is ``predictions.bias``) and the backbone's tied embedding."""
        seen = {id(p) for p in self._backbone.parameters()}
        own: Dict[str, torch.Tensor] = {}
        skipped = set()
        for name, value in self.heads.state_dict(keep_vars=True).items():
            if id(value) in seen:
                skipped.add(name)
                continue
            seen.add(id(value))
            own[name] = value
        return own, skipped

    def head_state_dict(self) -> Dict[str, torch.Tensor]:
        """The head's own tensors (CPU, contiguous, each stored once), without those tied to the backbone: what a
        checkpoint stores."""
        own, _ = self._own_tensors()
        return {k: v.detach().contiguous().cpu() for k, v in own.items()}

    def load_head_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Load :meth:`head_state_dict` output; raises ``ValueError`` naming keys that are missing or unexpected."""
        _, skipped = self._own_tensors()
        result = self.heads.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k not in skipped]
        if missing or result.unexpected_keys:
            raise ValueError(f"the saved masked-LM head does not fit this model (missing {missing[:4]}, unexpected "
                             f"{list(result.unexpected_keys)[:4]})")


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, num_masked: Optional[int] = None) -> torch.Tensor:
    """Cross-entropy of ``(N, L, V)`` logits against ``(N, L)`` labels over the tokens whose label is not
    :data:`IGNORE_INDEX`, averaged over them, in float32 (outside autocast). ``num_masked`` (that count, when the
    caller knows it on the host) makes a batch with no chosen token give 0 rather than NaN without a device sync."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        total = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                            ignore_index=IGNORE_INDEX, reduction="sum")
    if num_masked is None:
        num_masked = labels.ne(IGNORE_INDEX).sum()
        return total / num_masked.clamp_min(1)
    return total / max(int(num_masked), 1)



def scale_for_gradient_sum(loss: torch.Tensor, l_mlm: Optional[torch.Tensor], mlm_weight: float,
                           world_size: int) -> torch.Tensor:
    """The loss one process backpropagates under ``--ddp_gradient sum``, where DDP averages gradients over
    ``world_size`` processes: ``loss = L_cl + alpha L_s (+ mlm_weight L_mlm)`` is scaled by ``world_size`` in value,
    so the contrastive part, a global loss of which each process differentiates its own slice, sums to the
    global-batch gradient; but ``L_mlm`` is each process's own loss, whose averaged gradient already is the mean over
    processes, so its gradient keeps weight ``mlm_weight`` (its value is scaled with the rest, because the trainer
    divides the reported loss back by ``world_size``). Scalars in, scalar out."""
    scaled = loss * world_size
    if l_mlm is None:
        return scaled
    return scaled - (world_size - 1) * mlm_weight * (l_mlm - l_mlm.detach())
