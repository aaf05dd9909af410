"""Training: the IS-CSE / SimCSE trainer on ``transformers.Trainer`` (``python -m iscse.train``).

Modules (each imports ``transformers`` only when it is imported itself; ``import iscse`` never loads this package):

- :mod:`iscse.training.arguments`: :class:`~iscse.training.arguments.ISCSETrainingArguments` (every flag, declared
  once, on top of ``transformers.TrainingArguments``), the presets, and :func:`~iscse.training.arguments.parse_args`.
- :mod:`iscse.training.model`: :class:`~iscse.training.model.ISCSEModel`, the encoder with its pooler and the
  ``ISCSELoss`` that owns the memory buffer.
- :mod:`iscse.training.trainer`: :class:`~iscse.training.trainer.ISCSETrainer`, the ``transformers.Trainer``
  subclass (two views, all-gather and loss in ``compute_loss``; STS-B dev evaluation; atomic checkpoints).
- :mod:`iscse.training.mlm`: the masked-LM auxiliary objective (``--do_mlm``): token masking, the masked-LM head
  on the encoder's backbone, its loss.
- :mod:`iscse.training.callbacks`: metrics JSONL and log lines, Ctrl-C handling, the progress bar.
- :mod:`iscse.training.checkpoints`: finding and checking checkpoints, atomic publishing.
- :mod:`iscse.training.cli`: the command line.
"""
