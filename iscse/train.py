"""The IS-CSE / SimCSE trainer: ``python -m iscse.train`` (``--help`` lists every flag).

Unsupervised contrastive training of a BERT/RoBERTa-like encoder on one sentence a line (He et al., AAAI 2023, on
SimCSE's recipe, Gao et al. 2021; docs/concepts.md: The computation), on ``transformers.Trainer``: see
:mod:`iscse.training.trainer` for what the library does and what this package adds, :mod:`iscse.training.arguments`
for the flags and presets, and :mod:`iscse.training.cli` for what a run writes. This module is the entry point and
re-exports the names a script needs; it imports ``transformers`` only when one of them is used.
"""
from __future__ import annotations

import sys
from typing import Any

__all__ = ["main", "train", "parse_args", "ConfigError", "ISCSETrainingArguments", "ISCSETrainer", "PRESETS",
           "find_checkpoint"]

_WHERE = {
    "main": "cli", "train": "cli", "parse_args": "arguments", "ConfigError": "arguments",
    "ISCSETrainingArguments": "arguments", "PRESETS": "arguments", "ISCSETrainer": "trainer",
    "find_checkpoint": "checkpoints",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"iscse.training.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'iscse.train' has no attribute {name!r}")


if __name__ == "__main__":
    from iscse.training.cli import main as _main

    sys.exit(_main())
