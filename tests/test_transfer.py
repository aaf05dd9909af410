"""SentEval's transfer tasks: the classifier protocol on synthetic data (folds, C selection, MRPC features, split
handling), the data loaders on SentEval's files, and the command line end to end on a subsample."""

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from iscse import transfer
from iscse.evaluate import evaluate_transfer, main
from iscse.senteval import TRANSFER_FOLDERS, TRANSFER_TASKS, load_transfer_task, resolve_data_dir

sklearn = pytest.importorskip("sklearn")
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import StratifiedKFold  # noqa: E402


def _data_dir() -> Path:
    env = os.environ.get("ISCSE_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared/data/downstream"


DATA_DIR = _data_dir()
needs_data = pytest.mark.skipif(
    not all((DATA_DIR / folder).is_dir() for folder in TRANSFER_FOLDERS.values()),
    reason=f"SentEval transfer data not found at {DATA_DIR} (set ISCSE_DATA_DIR to SentEval's data/downstream "
           "folder with MR, CR, SUBJ, MPQA, SST/binary, TREC, MRPC)")


def blobs(n, d, n_classes=2, separation=1.0, seed=0):
    """Gaussian classes around random centres: (n, d) float64 features and int64 labels, classes of unequal size."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n) if n_classes > 2 else (rng.random(n) < 0.35).astype(np.int64)
    centres = rng.normal(size=(n_classes, d)) * separation
    return centres[y] + rng.normal(size=(n, d)), y.astype(np.int64)


@pytest.fixture(autouse=True)
def one_blas_thread():
    """The independent scans below run with one BLAS thread, as iscse.transfer does (much faster on a busy CPU)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def senteval_lr(c):
    """SentEval's classifier on the scikit-learn path, as this module configures it."""
    return LogisticRegression(C=c, random_state=1111, max_iter=transfer.MAX_ITER)


# ----------------------------------------------------------------------------- protocol pieces


def test_grids_are_senteval_sklearn_grids():
    assert transfer.INNER_C_GRID == (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # InnerKFoldClassifier: 2^-2 .. 2^3
    assert transfer.SPLIT_C_GRID == (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # SplitClassifier: 2^-2 .. 2^3
    assert transfer.KFOLD_C_GRID == (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # KFoldClassifier: 2^-1 .. 2^5
    assert transfer.SEED == 1111


@pytest.mark.parametrize("n, k", [(103, 10), (40, 5), (11, 2)])
def test_folds_partition_stratify_and_repeat(n, k):
    y = np.array([0] * (n // 3) + [1] * (n - n // 3))
    folds = transfer.stratified_folds(y, k)
    assert len(folds) == k
    tests = np.concatenate([test for _, test in folds])
    assert sorted(tests.tolist()) == list(range(n))  # the test folds partition the examples
    for train, test in folds:
        assert set(train.tolist()) == set(range(n)) - set(test.tolist())
        for cls in (0, 1):  # each class spread as evenly as its count allows
            share = (y == cls).sum() / k
            assert np.floor(share) <= (y[test] == cls).sum() <= np.ceil(share)
    again = transfer.stratified_folds(y, k)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))  # same seed, same folds
    other = transfer.stratified_folds(y, k, seed=7)
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(folds, other))  # shuffled with the seed
    # the folds are SentEval's: StratifiedKFold(shuffle=True, random_state=1111) on the examples in order
    expected = StratifiedKFold(n_splits=k, shuffle=True, random_state=1111).split(np.zeros((n, 1)), y)
    assert all(np.array_equal(t, e) for (_, t), (_, e) in zip(folds, expected))


def test_select_c_rounds_to_two_decimals_and_takes_the_first_best():
    grid = (0.25, 0.5, 1.0)
    assert transfer.select_c([70.0, 80.0, 75.0], grid) == (0.5, 80.0)
    assert transfer.select_c([80.004, 80.001, 79.0], grid) == (0.25, 80.0)  # equal after rounding: first wins
    assert transfer.select_c([79.0, 80.004, 80.006], grid) == (1.0, 80.01)  # 80.01 beats 80.0
    with pytest.raises(ValueError, match="equal length"):
        transfer.select_c([1.0], grid)


def test_pair_features_are_abs_difference_then_product():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    f = transfer.pair_features(a, b)
    assert f.shape == (5, 14)
    np.testing.assert_array_equal(f[:, :7], np.abs(a - b))
    np.testing.assert_array_equal(f[:, 7:], a * b)
    np.testing.assert_array_equal(transfer.pair_features(b, a), f)  # symmetric in the two sentences
    with pytest.raises(ValueError, match="same shape"):
        transfer.pair_features(a, b[:, :6])


def _cv_scores(x, y, folds, grid):
    """Each C's mean accuracy x100 over the folds, computed independently of iscse.transfer."""
    return [100 * np.mean([senteval_lr(c).fit(x[tr], y[tr]).score(x[te], y[te]) for tr, te in folds])
            for c in grid]


@pytest.mark.parametrize("d, n_classes, separation, scale", [(6, 3, 0.6, 0.02), (30, 2, 0.4, 0.1)])
def test_kfold_eval_picks_the_c_with_the_best_cross_validation_accuracy(d, n_classes, separation, scale):
    """TREC/MRPC protocol: C chosen on train folds only, then one fit on all of train scored on test.

    Small feature scales make strong regularisation (small C) underfit, so the best C is not the first one (and
    on these data the two largest C tie, so the first of them must win); the test checks the choice against an
    independent scan over the same folds."""
    x, y = blobs(150 if n_classes == 3 else 80, d, n_classes=n_classes, separation=separation, seed=3)
    x = x * scale
    x_train, y_train, x_test, y_test = x[::2], y[::2], x[1::2], y[1::2]
    out = transfer.kfold_eval(x_train, y_train, x_test, y_test, k=4)
    folds = StratifiedKFold(n_splits=4, shuffle=True, random_state=1111).split(x_train, y_train)
    scores = np.round(_cv_scores(x_train, y_train, list(folds), transfer.KFOLD_C_GRID), 2)
    assert len(set(scores.tolist())) > 1  # the grid matters on this data
    best = transfer.KFOLD_C_GRID[int(np.argmax(scores))]
    assert out["C"] == best and out["devacc"] == scores.max()
    final = senteval_lr(best).fit(x_train, y_train)
    assert out["acc"] == round(100 * final.score(x_test, y_test), 2)
    np.testing.assert_array_equal(out["predictions"], final.predict(x_test))
    assert out["C"] > transfer.KFOLD_C_GRID[0]


def test_kfold_eval_never_looks_at_the_test_labels():
    x, y = blobs(120, 5, seed=4)
    x_train, y_train, x_test, y_test = x[:80], y[:80], x[80:], y[80:]
    a = transfer.kfold_eval(x_train, y_train, x_test, y_test, k=3)
    b = transfer.kfold_eval(x_train, y_train, x_test, 1 - y_test, k=3)
    assert a["C"] == b["C"] and a["devacc"] == b["devacc"]
    np.testing.assert_array_equal(a["predictions"], b["predictions"])
    assert a["acc"] + b["acc"] == pytest.approx(100.0)


def test_split_eval_selects_on_dev_and_scores_test_once():
    """SST2 protocol: each C fitted on train and scored on dev; the best one scores test."""
    x, y = blobs(300, 8, separation=0.5, seed=5)
    x = x * 0.03
    tr, dev, te = slice(0, 200), slice(200, 250), slice(250, 300)
    out = transfer.split_eval(x[tr], y[tr], x[dev], y[dev], x[te], y[te])
    dev_scores = np.round([100 * senteval_lr(c).fit(x[tr], y[tr]).score(x[dev], y[dev])
                           for c in transfer.SPLIT_C_GRID], 2)
    best = transfer.SPLIT_C_GRID[int(np.argmax(dev_scores))]
    assert len(set(dev_scores.tolist())) > 1
    assert out["C"] == best and out["devacc"] == dev_scores.max()
    assert out["acc"] == round(100 * senteval_lr(best).fit(x[tr], y[tr]).score(x[te], y[te]), 2)
    flipped = transfer.split_eval(x[tr], y[tr], x[dev], y[dev], x[te], 1 - y[te])
    assert flipped["C"] == out["C"] and flipped["acc"] == pytest.approx(100 - out["acc"])


def test_inner_kfold_eval_matches_senteval_inner_kfold_loop():
    """MR/CR/SUBJ/MPQA protocol, checked against a literal transcription of SentEval's InnerKFoldClassifier.run
    (scikit-learn path): outer and inner StratifiedKFold with the same seed, C by rounded inner accuracy."""
    x, y = blobs(90, 20, separation=0.3, seed=6)
    x = x * 0.2  # on these data the folds choose different C
    k = 3
    out = transfer.inner_kfold_eval(x, y, k=k)

    dev_results, test_results, chosen = [], [], []
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=1111)
    innerskf = StratifiedKFold(n_splits=k, shuffle=True, random_state=1111)
    for train_idx, test_idx in skf.split(x, y):
        x_train, x_test, y_train, y_test = x[train_idx], x[test_idx], y[train_idx], y[test_idx]
        scores = []
        for reg in [2 ** t for t in range(-2, 4, 1)]:
            regscores = [senteval_lr(reg).fit(x_train[a], y_train[a]).score(x_train[b], y_train[b])
                         for a, b in innerskf.split(x_train, y_train)]
            scores.append(round(100 * np.mean(regscores), 2))
        optreg = [2 ** t for t in range(-2, 4, 1)][int(np.argmax(scores))]
        chosen.append(optreg)
        dev_results.append(np.max(scores))
        test_results.append(round(100 * senteval_lr(optreg).fit(x_train, y_train).score(x_test, y_test), 2))
    assert out["C"] == chosen
    assert out["fold_acc"] == test_results
    assert out["acc"] == round(np.mean(test_results), 2)
    assert out["devacc"] == round(np.mean(dev_results), 2)
    assert len(set(chosen)) > 1  # the selection did something on this data


def test_progress_counts_every_fit():
    x, y = blobs(40, 3, seed=7)
    calls = []
    transfer.inner_kfold_eval(x, y, k=2, progress=calls.append)
    assert len(calls) == 2 * (2 * len(transfer.INNER_C_GRID) + 1)
    calls.clear()
    transfer.kfold_eval(x[:30], y[:30], x[30:], y[30:], k=2, progress=calls.append)
    assert len(calls) == 2 * len(transfer.KFOLD_C_GRID) + 1
    calls.clear()
    transfer.split_eval(x[:20], y[:20], x[20:30], y[20:30], x[30:], y[30:], progress=calls.append)
    assert len(calls) == len(transfer.SPLIT_C_GRID) + 1


def test_bad_protocol_input_is_rejected():
    x, y = blobs(20, 3, seed=8)
    with pytest.raises(ValueError, match="k"):
        transfer.inner_kfold_eval(x, y, k=1)
    with pytest.raises(ValueError, match="one row per label"):
        transfer.inner_kfold_eval(x[:10], y, k=2)
    with pytest.raises(ValueError, match="integer class labels"):
        transfer.inner_kfold_eval(x, y.astype(float), k=2)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        transfer.kfold_eval(bad, y, x, y, k=2)
    with pytest.raises(ValueError, match="same width"):
        transfer.split_eval(x, y, x[:, :2], y, x, y)


def test_import_iscse_does_not_import_sklearn():
    code = "import sys, iscse, iscse.evaluate, iscse.transfer; print(any(m.split('.')[0] == 'sklearn' for m in sys.modules))"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"
