"""Sentence encoder: a Hugging Face BERT/RoBERTa-like backbone plus a SimCSE/IS-CSE pooler.

What is supported and tested: any checkpoint name or local folder that ``transformers.AutoModel`` /
``AutoTokenizer`` load as an encoder returning ``last_hidden_state`` and ``hidden_states`` (tested on tiny
random configs of BERT, RoBERTa, DistilBERT, ALBERT, ELECTRA, MPNet, DeBERTa-v2, XLM-RoBERTa and ModernBERT:
``tests/test_families.py``); the five poolers of SimCSE (Gao et al., 2021, ``simcse/models.py`` and
``evaluation.py``), which IS-CSE (He et al., 2023) uses unchanged:

- ``cls``: the [CLS] (first token) hidden state followed by the MLP head (dense hidden->hidden, then tanh). The
  MLP is applied in training, and at evaluation too unless ``mlp_only_train`` (SimCSE's unsupervised setting).
- ``cls_before_pooler``: the [CLS] hidden state, no MLP.
- ``avg``: mean of the last layer over the tokens of the attention mask.
- ``avg_top2``: the same masked mean of ``(hidden_states[-1] + hidden_states[-2]) / 2``.
- ``avg_first_last``: the same masked mean of ``(hidden_states[0] + hidden_states[-1]) / 2``, where
  ``hidden_states[0]`` is the embedding layer's output (as in SimCSE's ``Pooler``).

Where the MLP lives. SimCSE's converted checkpoints (``simcse_to_huggingface.py``) store the trained MLP as the
Hugging Face pooling layer (``pooler.dense``), so ``AutoModel(...).pooler_output`` is SimCSE's ``cls`` embedding.
This module follows that convention both ways: when the backbone has such a pooling layer (dense + tanh on the
first token, as ``BertPooler`` / ``RobertaPooler`` / ``MPNetPooler``, or ALBERT's ``pooler`` Linear with its
``pooler_activation`` Tanh), its ``dense`` layer *is* the MLP (loaded from the checkpoint, trained, and written
back by ``save_pretrained``); the backbone itself runs without it. SimCSE's training code
instead starts from a freshly initialised MLP (``BertForCL`` has no pooling layer): pass ``reinit_mlp=True`` to
``from_pretrained`` for that. Backbones without such a pooling layer get a fresh MLP, saved beside the weights in
``iscse_mlp.safetensors``.

Not supported: decoder-only or encoder-decoder models, and tokenizers without a padding token.

Why the model being trained lives in ``evaluation``: training depends on evaluation anyway (it evaluates STS-B dev
while it trains), never the other way round, so ``iscse.training`` importing :class:`SentenceEncoder` from here is
an import down the layers (``tests/test_layout.py``), and an evaluation-only install (no ``datasets`` or
``accelerate``) still loads and saves encoders. A package of its own would move the class and its imports without
changing that graph. The file helpers both layers use (atomic writes, umask) live in :mod:`iscse._io`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import apply_umask, first_line, replace_dir, write_json

__all__ = ["POOLERS", "MLPLayer", "SentenceEncoder", "pool", "check_encoder", "looks_local"]

logger = logging.getLogger(__name__)

#: The pooler names SimCSE's ``--pooler_type`` / ``--pooler`` accept.
POOLERS: tuple[str, ...] = ("cls", "cls_before_pooler", "avg", "avg_top2", "avg_first_last")

_ISCSE_CONFIG = "iscse_config.json"
_ISCSE_MLP = "iscse_mlp.safetensors"
# Keys of from_pretrained's **hf_kwargs that also locate the tokenizer.
_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "trust_remote_code", "subfolder")
# Model types whose position ids start after the padding index: 514 position embeddings hold 512 tokens.
_OFFSET_POSITION_MODELS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm",
                           "data2vec-text", "longformer", "mpnet")
# ... of which these take a fixed padding index whatever config.pad_token_id says (transformers' MPNetEmbeddings
# sets padding_idx = 1), so a checkpoint paired with another tokenizer still loses those slots.
_FIXED_PADDING_INDEX = {"mpnet": 1}


def looks_local(name_or_path: str | os.PathLike) -> bool:
    """True when ``name_or_path`` can only be a folder, never a Hub id: absolute, starting with ``.`` or ``~``,
    holding a backslash, or more than one ``/`` (Hub ids are ``name`` or ``owner/name``)."""
    text = str(name_or_path)
    return (os.path.isabs(text) or text.startswith((".", "~")) or "\\" in text or text.count("/") > 1
            or os.path.exists(text))


def check_encoder(name_or_path: str | os.PathLike, **hub_kwargs: Any) -> Any:
    """Check that ``name_or_path`` names a BERT- or RoBERTa-like encoder before any weights are loaded; returns
    its ``transformers`` config.

    A path that :func:`looks_local` must exist (no Hub look-up, hence no network retries, for it), be a folder and
    hold ``config.json``. The model type must be one with a masked-language-model head in ``transformers`` (BERT,
    RoBERTa, DistilBERT, MPNet, ModernBERT, ...: bidirectional encoders with a first ``[CLS]``-like token) and not
    an encoder-decoder; decoder-only models (GPT-2, Llama, ...) and vision or audio models are refused.
    ``hub_kwargs`` go to ``AutoConfig.from_pretrained`` (``revision``, ``cache_dir``, ``token``, ...).

    Raises ``ValueError`` with one sentence starting with the name and saying what to pass instead; ``OSError``
    (from ``transformers``) when a Hub id cannot be fetched.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    text = str(name_or_path)
    if text == "":
        raise ValueError("the model name is empty; pass a Hugging Face model name or a local folder")
    path = Path(text).expanduser()
    if looks_local(text) or path.exists():
        if not path.exists():
            raise ValueError(f"{text!r} does not exist; pass a local model folder (holding config.json) or a "
                             "Hugging Face model name such as bert-base-uncased")
        if not path.is_dir():
            raise ValueError(f"{text!r} is a file; pass the folder that holds config.json and the weights")
        if not os.access(path, os.R_OK | os.X_OK):
            raise ValueError(f"{text!r} cannot be read (permission denied)")
        if not (path / "config.json").is_file():
            raise ValueError(f"{text!r} holds no config.json: it is not a Hugging Face model folder (pass the "
                             "folder that save_pretrained or the trainer wrote)")
        try:
            config = AutoConfig.from_pretrained(str(path), **hub_kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{text!r}: config.json cannot be read ({first_line(exc)})") from None
    else:
        config = AutoConfig.from_pretrained(text, **hub_kwargs)
    model_type = getattr(config, "model_type", None)
    if (model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False)
            or getattr(config, "is_decoder", False)):
        raise ValueError(f"{text!r} is a {model_type or 'model of unknown type'} model, not a BERT- or RoBERTa-like "
                         "encoder; IS-CSE trains bidirectional encoders (bert, roberta, distilbert, mpnet, "
                         "modernbert, ...): pass one of those")
    return config


def _check_pooler(pooler: Any) -> str:
    if not isinstance(pooler, str) or pooler not in POOLERS:
        raise ValueError(f"pooler must be one of {', '.join(POOLERS)}, got {pooler!r}")
    return pooler


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class MLPLayer(nn.Module):
    """SimCSE's MLP head over the [CLS] representation: ``tanh(x W^T + b)`` with ``W`` of shape ``(H, H)``.

    Input ``(B, H)`` float, output ``(B, H)`` of the same dtype. ``dense`` may be an existing ``nn.Linear`` (it is
    then shared, not copied: this is how a backbone's ``BertPooler.dense`` becomes the MLP). A new one is
    initialised like Hugging Face BERT weights: normal with std ``initializer_range``, zero bias.
    """

    def __init__(self, hidden_size: int, dense: nn.Linear | None = None, initializer_range: float = 0.02):
        super().__init__()
        _check_positive_int("hidden_size", hidden_size)
        if dense is None:
            dense = nn.Linear(hidden_size, hidden_size)
            nn.init.normal_(dense.weight, mean=0.0, std=initializer_range)
            nn.init.zeros_(dense.bias)
        elif not isinstance(dense, nn.Linear) or dense.in_features != hidden_size or dense.out_features != hidden_size:
            raise ValueError(f"dense must be an nn.Linear({hidden_size}, {hidden_size}), got {dense!r}")
        self.dense = dense
        self.activation = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the head to ``x`` of shape ``(B, H)``; returns ``(B, H)``."""
        return self.activation(self.dense(x))


def pool(
    pooler: str,
    last_hidden_state: torch.Tensor,
    attention_mask: torch.Tensor,
    hidden_states: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Pool token states into sentence embeddings, before any MLP, exactly as SimCSE's ``Pooler``.

    ``last_hidden_state`` is ``(B, L, H)``, ``attention_mask`` ``(B, L)`` of 0/1, ``hidden_states`` the backbone's
    ``L_layers + 1`` tensors of ``(B, L, H)`` (index 0 the embedding output; needed for ``avg_top2`` and
    ``avg_first_last``). Returns ``(B, H)`` in the dtype of the hidden states. ``cls`` and
    ``cls_before_pooler`` both give the first token's state here; the MLP is the encoder's business.
    """
    _check_pooler(pooler)
    if pooler in ("cls", "cls_before_pooler"):
        return last_hidden_state[:, 0]
    if pooler == "avg":
        tokens = last_hidden_state
    else:
        if hidden_states is None or len(hidden_states) < 2:
            raise ValueError(f"hidden_states: pooler {pooler!r} needs the backbone's hidden states of every layer "
                             "(run it with output_hidden_states=True)")
        if pooler == "avg_top2":
            tokens = (hidden_states[-1] + hidden_states[-2]) / 2.0
        else:  # avg_first_last: hidden_states[0] is the embedding layer, as in SimCSE's models.py
            tokens = (hidden_states[0] + hidden_states[-1]) / 2.0
    mask = attention_mask.unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
    # clamp only guards an all-padding row (never produced by a tokenizer) against 0/0
    return (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)  # (B, H)


def _hf_dense_tanh_pooler(backbone: nn.Module, hidden_size: int) -> tuple[nn.Module, nn.Linear] | None:
    """``(backbone.pooler, its dense layer)`` if the backbone's pooling layer is BERT's dense + tanh over the first
    token, else None. Two layouts have it: ``pooler`` a module of exactly ``dense`` and ``activation`` (BERT,
    RoBERTa, XLM-R, MPNet, ...), and ALBERT's ``pooler`` Linear beside a ``pooler_activation`` Tanh."""
    pooler = getattr(backbone, "pooler", None)
    if isinstance(pooler, nn.Linear):  # ALBERT: the activation is a sibling, applied only when pooler is set
        dense, activation = pooler, getattr(backbone, "pooler_activation", None)
    else:
        dense, activation = getattr(pooler, "dense", None), getattr(pooler, "activation", None)
        if not isinstance(pooler, nn.Module) or set(dict(pooler.named_children())) != {"dense", "activation"}:
            return None
    if (isinstance(dense, nn.Linear) and isinstance(activation, nn.Tanh) and dense.in_features == hidden_size
            and dense.out_features == hidden_size):
        return pooler, dense
    return None


class SentenceEncoder(nn.Module):
    """A transformer backbone with a SimCSE/IS-CSE pooler, mapping token ids to sentence embeddings.

    ``forward(input_ids, attention_mask, token_type_ids=None)`` takes ``(B, L)`` int64 tensors and returns
    ``(B, H)`` embeddings in the backbone's dtype; with ``pooler="cls"`` the MLP head is applied in training mode
    and, unless ``mlp_only_train``, in eval mode too. ``encode(sentences)`` is the batched, no-grad path for
    evaluation. Build one with ``SentenceEncoder.from_pretrained(name_or_path, pooler=...)``; save with
    ``save_pretrained(dir)``, which ``AutoModel``, ``SentenceTransformer`` and ``from_pretrained`` all load.

    Args:
        backbone: a loaded ``transformers`` encoder model (``AutoModel``). If it has a BERT-style pooling layer,
            that layer's dense weights become the MLP and the backbone runs without it (see the module docstring).
        tokenizer: its tokenizer (``AutoTokenizer``); required by ``encode`` and ``save_pretrained``.
        pooler: one of ``POOLERS``.
        mlp_only_train: apply the ``cls`` MLP only in training (SimCSE's ``--mlp_only_train``).
    """

    def __init__(self, backbone: nn.Module, tokenizer: Any = None, pooler: str = "cls",
                 mlp_only_train: bool = False):
        super().__init__()
        _check_pooler(pooler)
        _check_bool("mlp_only_train", mlp_only_train)
        config = getattr(backbone, "config", None)
        hidden_size = getattr(config, "hidden_size", None)
        if not isinstance(backbone, nn.Module) or not isinstance(hidden_size, int):
            raise TypeError("backbone must be a transformers model (an nn.Module with config.hidden_size), "
                            f"got {type(backbone).__name__}")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self._pooler = pooler
        self.mlp_only_train = mlp_only_train

        found = _hf_dense_tanh_pooler(backbone, hidden_size)
        hf_pooler = None if found is None else found[0]
        if found is not None:
            # The backbone's pooling layer is SimCSE's MLP: share its Linear, and run the backbone without it so
            # no parameter goes unused (DDP) and no work is wasted. save_pretrained puts it back.
            backbone.pooler = None
            self.mlp: MLPLayer | None = MLPLayer(hidden_size, dense=found[1])
        elif pooler == "cls":
            self.mlp = MLPLayer(hidden_size, initializer_range=getattr(config, "initializer_range", 0.02))
        else:
            self.mlp = None
        # Not a registered submodule: its only parameters are mlp.dense's, already registered.
        object.__setattr__(self, "_hf_pooler", hf_pooler)
        if self.mlp is not None and pooler != "cls":
            # Unused by this pooler; kept only so save_pretrained writes the checkpoint's pooling layer back.
            self.mlp.requires_grad_(False)

    # ------------------------------------------------------------------ construction and properties

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        pooler: str | None = None,
        mlp_only_train: bool | None = None,
        *,
        reinit_mlp: bool = False,
        tokenizer_kwargs: dict | None = None,
        **hf_kwargs: Any,
    ) -> "SentenceEncoder":
        """Load backbone and tokenizer with ``AutoModel`` / ``AutoTokenizer`` and wrap them.

        ``name_or_path`` is a Hub name or a local folder (for example one written by ``save_pretrained``).
        ``pooler`` and ``mlp_only_train`` default to what a folder from ``save_pretrained`` recorded, else to
        ``"cls"`` and ``False``. ``reinit_mlp=True`` discards the checkpoint's pooling-layer weights and starts
        the MLP fresh, as SimCSE/IS-CSE training does. ``hf_kwargs`` go to ``AutoModel.from_pretrained`` (e.g.
        ``torch_dtype``, ``attn_implementation``, ``hidden_dropout_prob``); the hub-location keys among them
        (``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``trust_remote_code``, ``subfolder``) go to
        the tokenizer too, and ``tokenizer_kwargs`` only to the tokenizer.
        """
        from transformers import AutoModel, AutoTokenizer

        if not isinstance(name_or_path, (str, os.PathLike)) or str(name_or_path) == "":
            raise ValueError(f"name_or_path must be a model name or a folder, got {name_or_path!r}")
        if pooler is not None:
            _check_pooler(pooler)
        if mlp_only_train is not None:
            _check_bool("mlp_only_train", mlp_only_train)
        _check_bool("reinit_mlp", reinit_mlp)
        if tokenizer_kwargs is not None and not isinstance(tokenizer_kwargs, dict):
            raise TypeError(f"tokenizer_kwargs must be a dict, got {type(tokenizer_kwargs).__name__}")

        local = Path(name_or_path)
        saved: dict = {}
        if (local / _ISCSE_CONFIG).is_file():
            saved = json.loads((local / _ISCSE_CONFIG).read_text(encoding="utf-8"))
        pooler = pooler if pooler is not None else saved.get("pooler", "cls")
        mlp_only_train = mlp_only_train if mlp_only_train is not None else bool(saved.get("mlp_only_train", False))

        tok_kwargs = {key: hf_kwargs[key] for key in _HUB_KWARGS if key in hf_kwargs}
        tok_kwargs.update(tokenizer_kwargs or {})
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), **tok_kwargs)
        backbone = AutoModel.from_pretrained(str(name_or_path), **hf_kwargs)
        encoder = cls(backbone, tokenizer, pooler=pooler, mlp_only_train=mlp_only_train)

        mlp_file = local / _ISCSE_MLP
        if encoder.mlp is not None and mlp_file.is_file():
            # written when the saved backbone had no pooling layer; a fresh one AutoModel may have added is not it
            from safetensors.torch import load_file

            encoder.mlp.load_state_dict(load_file(str(mlp_file), device="cpu"))
        if reinit_mlp and encoder.mlp is not None:
            with torch.no_grad():
                std = getattr(backbone.config, "initializer_range", 0.02)
                nn.init.normal_(encoder.mlp.dense.weight, mean=0.0, std=std)
                nn.init.zeros_(encoder.mlp.dense.bias)
        return encoder

    @property
    def pooler(self) -> str:
        """The pooler name (one of ``POOLERS``); fixed at construction."""
        return self._pooler

    @property
    def config(self) -> Any:
        """The backbone's ``transformers`` config."""
        return self.backbone.config

    @property
    def hidden_size(self) -> int:
        """Embedding width ``H`` (the backbone's hidden size)."""
        return int(self.backbone.config.hidden_size)

    @property
    def device(self) -> torch.device:
        """Device of the backbone's parameters."""
        return next(self.backbone.parameters()).device

    @property
    def max_seq_length(self) -> int:
        """Longest input in tokens the model accepts: the tokenizer's ``model_max_length`` capped by the
        position embeddings (RoBERTa-like models lose the ``pad_token_id + 1`` offset slots); 512 if neither
        is known. ``encode`` truncates to it by default, which leaves SentEval's STS sentences untouched."""
        limits = []
        tml = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tml, int) and 0 < tml < 1_000_000:  # unknown limits are stored as ~1e30
            limits.append(tml)
        config = self.backbone.config
        positions = getattr(config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            model_type = getattr(config, "model_type", None)
            if model_type in _OFFSET_POSITION_MODELS:
                pad = _FIXED_PADDING_INDEX.get(model_type, getattr(config, "pad_token_id", None))
                positions -= (1 if pad is None else pad) + 1
            limits.append(positions)
        return min(limits) if limits else 512

    def extra_repr(self) -> str:
        """Pooler settings, shown by ``repr``."""
        return f"pooler={self._pooler!r}, mlp_only_train={self.mlp_only_train}"

    # ------------------------------------------------------------------ computation

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embed a batch: ``(B, L)`` int64 ``input_ids`` / ``attention_mask`` (0/1; None means all ones) /
        optional ``token_type_ids`` -> ``(B, H)`` embeddings in the backbone's dtype, differentiable.

        For ``cls`` the MLP is applied when ``self.training`` or when ``mlp_only_train`` is False.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a 2-D (batch, length) tensor, got {_describe(input_ids)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                             f"{_describe(attention_mask)}")
        if token_type_ids is not None and (not isinstance(token_type_ids, torch.Tensor)
                                           or token_type_ids.shape != input_ids.shape):
            raise ValueError(f"token_type_ids must be None or have the shape of input_ids {tuple(input_ids.shape)}")

        need_layers = self._pooler in ("avg_top2", "avg_first_last")
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        outputs = self.backbone(**inputs, output_hidden_states=need_layers, return_dict=True)
        embeddings = pool(self._pooler, outputs.last_hidden_state, attention_mask,
                          outputs.hidden_states if need_layers else None)  # (B, H)
        if self._pooler == "cls" and (self.training or not self.mlp_only_train):
            embeddings = self.mlp(embeddings)
        return embeddings

    def encode(self, sentences: Sequence[str], batch_size: int = 64, max_length: int | None = None,
               show_progress: bool = True, device: str | torch.device | None = None) -> torch.Tensor:
        """Embed ``N`` sentences as evaluation does; returns a float32 ``(N, H)`` CPU tensor in input order.

        Sentences are sorted by length (longest first), tokenized in batches of ``batch_size`` with padding to
        the longest in the batch and truncation at ``max_length`` tokens (None: ``max_seq_length``, the model's
        limit), and run in eval mode under ``torch.inference_mode()``; the module's train/eval mode is restored
        afterwards. ``device`` moves the model there first (None: stay where it is). A tqdm bar shows progress
        unless ``show_progress`` is False.
        """
        from tqdm.auto import tqdm

        if isinstance(sentences, str) or not isinstance(sentences, Sequence):
            raise TypeError("sentences must be a list of strings (wrap a single sentence in a list), got "
                            f"{type(sentences).__name__}")
        bad = next((i for i, s in enumerate(sentences) if not isinstance(s, str)), None)
        if bad is not None:
            raise TypeError(f"sentences[{bad}] must be a str, got {type(sentences[bad]).__name__}")
        _check_positive_int("batch_size", batch_size)
        if max_length is not None:
            _check_positive_int("max_length", max_length)
        if self.tokenizer is None:
            raise ValueError("tokenizer: this SentenceEncoder was built without a tokenizer; encode needs one")
        if device is not None:
            self.to(device)
        max_length = max_length if max_length is not None else self.max_seq_length
        run_device = self.device

        out = torch.empty(len(sentences), self.hidden_size, dtype=torch.float32)
        if len(sentences) == 0:
            return out
        # longest first: padding waste stays small, and an out-of-memory shows up in the first batch
        order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode(), tqdm(total=len(sentences), desc="Encoding", unit="sent",
                                              disable=not show_progress) as bar:
                for start in range(0, len(order), batch_size):
                    idx = order[start:start + batch_size]
                    batch = self.tokenizer([sentences[i] for i in idx], padding=True, truncation=True,
                                           max_length=max_length, return_tensors="pt")
                    emb = self(batch["input_ids"].to(run_device), batch["attention_mask"].to(run_device),
                               batch["token_type_ids"].to(run_device) if "token_type_ids" in batch else None)
                    out[torch.tensor(idx)] = emb.float().cpu()
                    bar.update(len(idx))
        finally:
            self.train(was_training)
        return out

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, save_directory: str | os.PathLike, atomic: bool = True) -> None:
        """Write a checkpoint folder that ``AutoModel``, ``SentenceTransformer`` and ``from_pretrained`` load.

        Contents: the backbone in Hugging Face format with safetensors weights (the MLP, when the backbone has a
        BERT-style pooling layer, as its ``pooler.dense``, SimCSE's convention, so ``AutoModel(...).pooler_output``
        is the ``cls`` embedding), the tokenizer, ``iscse_config.json`` (pooler and ``mlp_only_train``), and, where
        sentence-transformers is installed, the pipeline (written by its own ``save``) computing this encoder's eval-mode embedding: ``modules.json``,
        ``sentence_bert_config.json`` and ``1_Pooling`` (CLS or mean), plus ``2_Dense`` (the MLP with tanh) for
        ``cls`` without ``mlp_only_train``; ``avg_top2`` / ``avg_first_last`` use a ``WeightedLayerPooling``
        stage and set ``output_hidden_states`` in ``config.json``.

        The save is atomic: everything is written to a temporary folder beside the target, which then replaces
        the target in one rename (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames, so a crash between
        them leaves the previous checkpoint complete under ``.<name>.old-*`` beside the target). The target is
        replaced as a whole: it must be missing, empty, or an earlier ``save_pretrained`` folder, otherwise
        ``ValueError`` (so a folder holding other files, such as logs, is never deleted). ``atomic=False`` writes
        straight into ``save_directory`` (created if missing) and keeps other files there: for a caller that
        publishes the folder atomically itself, as the trainer does with its checkpoints. Files and folders get
        the permissions of the user's umask.
        """
        if self.tokenizer is None:
            raise ValueError("tokenizer: this SentenceEncoder was built without a tokenizer; save_pretrained needs one")
        if not isinstance(save_directory, (str, os.PathLike)) or str(save_directory) == "":
            raise ValueError(f"save_directory must be a folder path, got {save_directory!r}")
        target = Path(save_directory).expanduser().absolute()
        if not atomic:
            target.mkdir(parents=True, exist_ok=True)
            self._write_checkpoint(target)
            return
        if target.exists():
            if not target.is_dir():
                raise ValueError(f"save_directory {str(target)!r} exists and is not a folder")
            if any(target.iterdir()) and not (target / _ISCSE_CONFIG).is_file():
                raise ValueError(
                    f"save_directory {str(target)!r} is not empty and was not written by save_pretrained (no "
                    f"{_ISCSE_CONFIG}); the folder is replaced as a whole, so choose an empty or new folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))  # 0700: apply_umask fixes it
        try:
            self._write_checkpoint(tmp)
            replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _write_checkpoint(self, folder: Path) -> None:
        from transformers.utils import logging as hf_logging

        # Saving is not a long task of its own: no "Writing model shards" / "Loading weights" bars in the middle
        # of a training run's progress bar.
        bars_were_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self._write_checkpoint_files(folder)
        finally:
            if bars_were_on:
                hf_logging.enable_progress_bar()

    def _write_checkpoint_files(self, folder: Path) -> None:
        from safetensors.torch import save_file

        hf_pooler = self._hf_pooler
        if hf_pooler is not None:
            self.backbone.pooler = hf_pooler  # the MLP goes out as the HF pooling layer (SimCSE's convention)
        try:
            self.backbone.save_pretrained(str(folder))
        finally:
            if hf_pooler is not None:
                self.backbone.pooler = None
        self.tokenizer.save_pretrained(str(folder))
        if self.mlp is not None and hf_pooler is None:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.mlp.state_dict().items()},
                      str(folder / _ISCSE_MLP), metadata={"format": "pt"})
        write_json(folder / _ISCSE_CONFIG, {"pooler": self._pooler, "mlp_only_train": self.mlp_only_train})
        self._write_sentence_transformers_config(folder)
        apply_umask(folder)

    def _write_sentence_transformers_config(self, folder: Path) -> None:
        """The sentence-transformers pipeline files, written by sentence-transformers itself (its module classes and
        ``SentenceTransformer.save``, so the files follow the installed version's format). Without
        sentence-transformers, or should its save fail (an API change there must not lose a training checkpoint),
        the folder gets none of them and still loads with ``AutoModel`` and :meth:`from_pretrained`; a warning
        says so."""
        try:
            import sentence_transformers  # noqa: F401
        except ImportError:
            logger.warning("sentence-transformers is not installed: the saved model gets no sentence-transformers "
                           "pipeline files (pip install sentence-transformers, then save again, to load it with "
                           "SentenceTransformer)")
            return
        try:
            self._save_with_sentence_transformers(folder)
        except Exception as exc:  # noqa: BLE001 - an API change there must not lose the checkpoint
            _remove_sentence_transformers_files(folder)
            # (folder may be a temporary one, renamed into place afterwards: not worth naming)
            logger.warning("sentence-transformers could not write its pipeline files (%s: %s); the saved model has "
                           "none of them and loads with AutoModel and SentenceEncoder.from_pretrained",
                           type(exc).__name__, first_line(exc))

    def _weighted_layers(self) -> tuple[int, list[float]] | None:
        """``(layer_start, weights)`` of the layer average ``avg_top2`` / ``avg_first_last`` compute (over
        ``hidden_states[layer_start:]``), None for the other poolers."""
        if self._pooler not in ("avg_top2", "avg_first_last"):
            return None
        layers = int(self.backbone.config.num_hidden_layers)
        if self._pooler == "avg_top2":
            return layers - 1, [1.0, 1.0]
        return 0, [1.0] + [0.0] * (layers - 1) + [1.0]

    def _save_with_sentence_transformers(self, folder: Path) -> None:
        import importlib

        from sentence_transformers import SentenceTransformer

        try:
            mods = importlib.import_module("sentence_transformers.sentence_transformer.modules")  # >= 6
        except ImportError:
            mods = importlib.import_module("sentence_transformers.models")
        hidden = self.hidden_size
        weighted = self._weighted_layers()
        if weighted is not None:
            # SentenceTransformer's Transformer module returns all layers only when config.output_hidden_states
            # is set.
            config_path = folder / "config.json"
            config = json.loads(config_path.read_text(encoding="utf-8"))
            config["output_hidden_states"] = True
            write_json(config_path, config)
        modules = [mods.Transformer(str(folder), max_seq_length=self.max_seq_length)]
        if weighted is not None:
            layer_start, weights = weighted
            modules.append(mods.WeightedLayerPooling(hidden, int(self.backbone.config.num_hidden_layers),
                                                     layer_start,
                                                     # a Parameter, or it is left out of the saved weights
                                                     nn.Parameter(torch.tensor(weights, dtype=torch.float32))))
        modules.append(mods.Pooling(hidden, pooling_mode="cls" if self._pooler.startswith("cls") else "mean"))
        if self._pooler == "cls" and not self.mlp_only_train:
            dense = mods.Dense(hidden, hidden, bias=True, activation_function=nn.Tanh())
            with torch.no_grad():
                dense.linear.weight.copy_(self.mlp.dense.weight.detach().float().cpu())
                dense.linear.bias.copy_(self.mlp.dense.bias.detach().float().cpu())
            modules.append(dense)
        pipeline = SentenceTransformer(modules=modules, device="cpu", similarity_fn_name="cosine")
        pipeline.save(str(folder), create_model_card=False)


def _remove_sentence_transformers_files(folder: Path) -> None:
    """Delete what a failed ``SentenceTransformer.save`` may have left: its JSON files and its ``<idx>_<Module>``
    folders (the backbone and tokenizer files it rewrote in the root are the ones just saved)."""
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        (folder / name).unlink(missing_ok=True)
    for child in folder.iterdir():
        if child.is_dir() and child.name.split("_", 1)[0].isdigit():
            shutil.rmtree(child)


def _describe(x: Any) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
