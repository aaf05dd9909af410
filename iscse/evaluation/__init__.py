"""Evaluation: the sentence encoder and its poolers, and SentEval's STS and transfer tasks (``python -m
iscse.evaluate``).

- :mod:`iscse.evaluation.encoder`: :class:`~iscse.evaluation.encoder.SentenceEncoder` (a Hugging Face backbone with
  SimCSE's poolers; saves a folder that loads in ``AutoModel`` and ``SentenceTransformer``).
- :mod:`iscse.evaluation.senteval`: reading SentEval's data layout (STS12-16, STS-B, SICK-R, the transfer tasks).
- :mod:`iscse.evaluation.transfer`: the transfer tasks' protocol (SentEval's scikit-learn path) on arrays.
- :mod:`iscse.evaluation.evaluate`: :func:`~iscse.evaluation.evaluate.evaluate_sts`,
  :func:`~iscse.evaluation.evaluate.evaluate_transfer` and the command line.

``import iscse`` does not import this package; ``iscse.SentenceEncoder`` and ``iscse.evaluate_sts`` load it on first
use.
"""
