"""``python -m iscse.evaluate``: STS and SentEval transfer evaluation of a sentence encoder (``--help`` lists the
flags). The functions live in :mod:`iscse.evaluation.evaluate` (:func:`~iscse.evaluation.evaluate.evaluate_sts`,
:func:`~iscse.evaluation.evaluate.evaluate_transfer`); this module is the entry point and re-exports them lazily."""
from __future__ import annotations

import sys
from typing import Any

__all__ = ["main", "evaluate_sts", "evaluate_transfer", "format_table"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from .evaluation import evaluate as _evaluate

        return getattr(_evaluate, name)
    raise AttributeError(f"module 'iscse.evaluate' has no attribute {name!r}")


if __name__ == "__main__":
    from iscse.evaluation.evaluate import main as _main

    sys.exit(_main())
