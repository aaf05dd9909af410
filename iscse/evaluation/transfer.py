"""SentEval's transfer-task classifier protocol on precomputed features (scikit-learn logistic regression).

This is SentEval's scikit-learn path (``usepytorch=False``; ``senteval/tools/validation.py``), on arrays:

- ``inner_kfold_eval`` (SentEval's ``InnerKFoldClassifier``; MR, CR, SUBJ, MPQA): ``k``-fold stratified
  cross-validation over all examples; inside each outer training part a second ``k``-fold stratified
  cross-validation picks ``C`` from ``2^-2 .. 2^3``; the classifier refitted on the outer training part with that
  ``C`` is scored on the outer test fold. Reported: mean test accuracy over the outer folds (``acc``) and mean
  best inner accuracy (``devacc``).
- ``kfold_eval`` (SentEval's ``KFoldClassifier``; TREC, MRPC): ``k``-fold stratified cross-validation on the
  train split picks ``C`` from ``2^-1 .. 2^5`` (SentEval's grid for this classifier is not the inner one); the
  classifier refitted on all of train is scored once on the test split. MRPC's features are
  ``pair_features(u, v) = [|u - v|, u * v]`` and its F1 is that of the test predictions, class 1 positive.
- ``split_eval`` (SentEval's ``SplitClassifier``; SST2): ``C`` from ``2^-2 .. 2^3`` by accuracy on the dev split;
  the classifier fitted on train with that ``C`` is scored once on test.

Folds are ``StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)`` with SentEval's seed 1111, built on the
examples in SentEval's order (``iscse.evaluation.senteval.load_transfer_task`` keeps it), so they are SentEval's folds. As in
SentEval each candidate's validation accuracy is rounded to two decimals (x100) before the arg-max, and ties go to
the smaller ``C`` (the first in the grid). Features are used as they are (no scaling), as in SentEval.

One departure, on purpose: ``LogisticRegression(C=C, random_state=seed, max_iter=max_iter)`` with ``max_iter``
1000 instead of scikit-learn's default of 100, so that lbfgs reaches the regularised optimum on unscaled
sentence embeddings instead of stopping early with a ``ConvergenceWarning`` (the score would then depend on the
solver's iteration budget rather than on ``C``). SentEval itself was written for scikit-learn 0.18-0.19, whose
default solver was liblinear (one-vs-rest, regularised intercept); today's default is lbfgs (multinomial). SimCSE
and IS-CSE report transfer numbers from SentEval's PyTorch path (``usepytorch=True``: a linear layer trained with
Adam and early stopping, l2 in ``10^-5 .. 10^-2``), which this module does not implement: numbers from here are
SentEval numbers, but not those papers' exact protocol.

The fits run with one BLAS thread (``threadpoolctl``, a scikit-learn dependency): the matrices are small, and
OpenBLAS's threads cost far more than they give on a busy machine (one TREC fit: 15.6 s with two threads, 1.1 s
with one, on the 2-core AMD EPYC this was written on); it also removes the thread count as a source of
run-to-run differences in floating-point summation order.

scikit-learn is imported when a function here runs, never by ``import iscse``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np

__all__ = [
    "INNER_C_GRID",
    "KFOLD_C_GRID",
    "SEED",
    "SPLIT_C_GRID",
    "inner_kfold_eval",
    "kfold_eval",
    "pair_features",
    "select_c",
    "split_eval",
    "stratified_folds",
]

#: SentEval's classifier seed (``params.seed``), used for the folds and the classifier.
SEED = 1111
#: ``InnerKFoldClassifier``'s C grid on the scikit-learn path: ``[2**t for t in range(-2, 4)]``.
INNER_C_GRID: tuple[float, ...] = tuple(2.0 ** t for t in range(-2, 4))
#: ``KFoldClassifier``'s C grid on the scikit-learn path: ``[2**t for t in range(-1, 6)]``.
KFOLD_C_GRID: tuple[float, ...] = tuple(2.0 ** t for t in range(-1, 6))
#: ``SplitClassifier``'s C grid on the scikit-learn path: ``[2**t for t in range(-2, 4)]``.
SPLIT_C_GRID: tuple[float, ...] = INNER_C_GRID

#: lbfgs iterations allowed per fit (scikit-learn's default, 100, stops short of the optimum on these features).
MAX_ITER = 1000

Progress = Callable[[int], object]


def pair_features(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SentEval's MRPC features of sentence pairs: ``[|a - b|, a * b]``, an ``(n, 2D)`` array from two ``(n, D)``."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must be (n, D) arrays of the same shape, got {a.shape} and {b.shape}")
    return np.concatenate([np.abs(a - b), a * b], axis=1)


def stratified_folds(y: Sequence[int] | np.ndarray, k: int, seed: int = SEED) -> list[tuple[np.ndarray, np.ndarray]]:
    """SentEval's folds: ``StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split`` of labels ``y``.

    Returns ``k`` pairs ``(train_index, test_index)`` of int arrays; the test parts partition ``range(len(y))``
    and every class is spread over them as evenly as its count allows. Raises ``ValueError`` when ``k < 2`` or
    there are fewer examples than folds (scikit-learn only warns when a class has fewer than ``k`` members).
    """
    from sklearn.model_selection import StratifiedKFold

    _check_k(k)
    y = _check_labels(y, "y")
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(train, test) for train, test in splitter.split(np.zeros((len(y), 1)), y)]


def select_c(scores: Sequence[float], grid: Sequence[float]) -> tuple[float, float]:
    """SentEval's choice of ``C``: the grid value with the best validation accuracy; returns ``(C, accuracy)``.

    ``scores[i]`` is the validation accuracy (x100) of ``grid[i]``. As SentEval does, each score is rounded to
    two decimals before the arg-max, and among equal rounded scores the first grid value wins.
    """
    if len(scores) != len(grid) or len(grid) == 0:
        raise ValueError(f"scores and grid must be non-empty and of equal length, got {len(scores)} and {len(grid)}")
    rounded = [round(float(s), 2) for s in scores]
    best = int(np.argmax(rounded))
    return float(grid[best]), rounded[best]


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _classifier(c: float, seed: int, max_iter: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, random_state=seed, max_iter=max_iter)


def _cv_accuracy(x: np.ndarray, y: np.ndarray, folds, c: float, seed: int, max_iter: int,
                 progress: Progress | None) -> float:
    """Mean accuracy x100 of ``C`` over ``folds`` (each fit on the fold's train part, scored on its test part)."""
    accuracies = []
    for train, test in folds:
        clf = _classifier(c, seed, max_iter).fit(x[train], y[train])
        accuracies.append(clf.score(x[test], y[test]))
        if progress is not None:
            progress(1)
    return 100.0 * float(np.mean(accuracies))


def inner_kfold_eval(x: np.ndarray, y: Sequence[int] | np.ndarray, k: int = 10, seed: int = SEED,
                     grid: Sequence[float] = INNER_C_GRID, max_iter: int = MAX_ITER,
                     progress: Progress | None = None) -> dict:
    """SentEval's ``InnerKFoldClassifier`` (MR, CR, SUBJ, MPQA) on features ``x`` ``(n, D)`` and labels ``y``.

    For each of the ``k`` outer stratified folds, ``C`` is chosen by a ``k``-fold stratified cross-validation
    inside the outer training part (same seed, as in SentEval), then the classifier refitted on the whole outer
    training part is scored on the outer test fold. Returns ``{"acc": mean outer test accuracy x100, "devacc":
    mean best inner accuracy x100, "C": [chosen C per outer fold], "fold_acc": [test accuracy x100 per outer
    fold]}``; like SentEval, per-fold values are rounded to 2 decimals and so are the two means. ``progress`` (if
    given) is called with 1 after every fit: ``k * (k * len(grid) + 1)`` calls in all.
    """
    x, y = _check_xy(x, y)
    _check_k(k)
    dev_scores, test_scores, chosen = [], [], []
    with _one_blas_thread():
        for train, test in stratified_folds(y, k, seed):
            x_train, y_train = x[train], y[train]
            inner = stratified_folds(y_train, k, seed)
            scores = [_cv_accuracy(x_train, y_train, inner, c, seed, max_iter, progress) for c in grid]
            c, dev = select_c(scores, grid)
            clf = _classifier(c, seed, max_iter).fit(x_train, y_train)
            if progress is not None:
                progress(1)
            chosen.append(c)
            dev_scores.append(dev)
            test_scores.append(round(100.0 * clf.score(x[test], y[test]), 2))
    return {"acc": round(float(np.mean(test_scores)), 2), "devacc": round(float(np.mean(dev_scores)), 2),
            "C": chosen, "fold_acc": test_scores}


def kfold_eval(x_train: np.ndarray, y_train: Sequence[int] | np.ndarray, x_test: np.ndarray,
               y_test: Sequence[int] | np.ndarray, k: int = 10, seed: int = SEED,
               grid: Sequence[float] = KFOLD_C_GRID, max_iter: int = MAX_ITER,
               progress: Progress | None = None) -> dict:
    """SentEval's ``KFoldClassifier`` (TREC, MRPC): ``C`` by ``k``-fold cross-validation on train, one test score.

    Returns ``{"acc": test accuracy x100, "devacc": best cross-validation accuracy x100, "C": chosen C,
    "cv_acc": {C: cross-validation accuracy x100}, "predictions": test predictions (int array)}``; accuracies
    rounded to 2 decimals as in SentEval. The test split is used only once, after ``C`` is fixed. ``progress``
    is called with 1 after every fit (``k * len(grid) + 1`` calls).
    """
    x_train, y_train = _check_xy(x_train, y_train, "x_train", "y_train")
    x_test, y_test = _check_xy(x_test, y_test, "x_test", "y_test")
    _check_same_width(x_train, x_test)
    _check_k(k)
    folds = stratified_folds(y_train, k, seed)
    with _one_blas_thread():
        scores = [_cv_accuracy(x_train, y_train, folds, c, seed, max_iter, progress) for c in grid]
        c, dev = select_c(scores, grid)
        clf = _classifier(c, seed, max_iter).fit(x_train, y_train)
        if progress is not None:
            progress(1)
        predictions = clf.predict(x_test)
    return {"acc": round(100.0 * float(np.mean(predictions == y_test)), 2), "devacc": dev, "C": c,
            "cv_acc": {g: round(s, 2) for g, s in zip(grid, scores)}, "predictions": predictions}


def split_eval(x_train: np.ndarray, y_train: Sequence[int] | np.ndarray, x_dev: np.ndarray,
               y_dev: Sequence[int] | np.ndarray, x_test: np.ndarray, y_test: Sequence[int] | np.ndarray,
               seed: int = SEED, grid: Sequence[float] = SPLIT_C_GRID, max_iter: int = MAX_ITER,
               progress: Progress | None = None) -> dict:
    """SentEval's ``SplitClassifier`` (SST2): ``C`` by dev accuracy, then one test score.

    Each ``C`` of ``grid`` is fitted on train and scored on dev; the best (rounded, first on ties) is refitted on
    train and scored on test. Returns ``{"acc": test accuracy x100, "devacc": best dev accuracy x100, "C": chosen
    C, "dev_acc": {C: dev accuracy x100}}``. ``progress`` is called with 1 after every fit (``len(grid) + 1``).
    """
    x_train, y_train = _check_xy(x_train, y_train, "x_train", "y_train")
    x_dev, y_dev = _check_xy(x_dev, y_dev, "x_dev", "y_dev")
    x_test, y_test = _check_xy(x_test, y_test, "x_test", "y_test")
    _check_same_width(x_train, x_dev, x_test)
    scores = []
    with _one_blas_thread():
        for c in grid:
            clf = _classifier(c, seed, max_iter).fit(x_train, y_train)
            scores.append(100.0 * clf.score(x_dev, y_dev))
            if progress is not None:
                progress(1)
        c, dev = select_c(scores, grid)
        # SentEval refits with the chosen C; lbfgs is deterministic, so this is the same model as in the scan.
        clf = _classifier(c, seed, max_iter).fit(x_train, y_train)
        if progress is not None:
            progress(1)
        test_acc = round(100.0 * clf.score(x_test, y_test), 2)
    return {"acc": test_acc, "devacc": dev, "C": c, "dev_acc": {g: round(s, 2) for g, s in zip(grid, scores)}}


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ValueError(f"k (folds) must be an int >= 2, got {k!r}")


def _check_labels(y, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D array of integer class labels, got shape {y.shape} dtype {y.dtype}")
    return y


def _check_xy(x, y, x_name: str = "x", y_name: str = "y") -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    y = _check_labels(y, y_name)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{x_name} must be an (n, D) array with one row per label of {y_name}, got {x.shape} "
                         f"for {y.shape[0]} labels")
    if not np.isfinite(x).all():
        raise ValueError(f"{x_name} has NaN or infinite values")
    return x, y


def _check_same_width(*arrays: np.ndarray) -> None:
    if len({a.shape[1] for a in arrays}) != 1:
        raise ValueError(f"train, dev and test features must have the same width, got "
                         f"{[a.shape[1] for a in arrays]}")
