"""Trainer tests on a tiny random BERT (hidden 32, 2 layers, 2 heads) with a word-level tokenizer built in a temp
folder, a small generated corpus and a generated STS-B/SICK dev set, so they run in seconds on a CPU.

- ops equivalence: 20 steps with ``--ops reference`` and ``--ops torch`` (fp32, same seed) log the same per-step
  losses within 1e-5 relative; the buffer fills at step 4, so 17 of them include the smoothing loss. ``--ops triton``
  (in Triton's CPU interpreter) matches ``--ops torch`` likewise over 6 steps.
- exact resume: a run interrupted after step 7 (a simulated crash) and resumed from its step-6 checkpoint logs the
  same per-step losses, evaluations and best checkpoint as a run that never stopped (dropout on: the RNG replays).
- atomic checkpoints: a crash in the middle of writing a checkpoint leaves the previous one complete and resumable.
- flags: presets and overrides, bad values rejected naming the flag before anything is written, missing data
  with no network says which flag to pass.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from iscse import train as T  # noqa: E402

WORDS = [f"w{i}" for i in range(120)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tiny_setup(root: Path, *, dropout: float = 0.1, n_sentences: int = 240, seed: int = 0,
                    init_range: float = 0.2) -> Dict[str, str]:
    """Write a tiny BERT + tokenizer (``model/``), a corpus (``corpus.txt``) and a SentEval-layout dev set
    (``senteval/``) under ``root``; returns their paths. Everything is derived from ``seed``."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    rnd = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS) + "\n", encoding="utf-8")
    model_dir = root / "model"
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True, model_max_length=64)
    tokenizer.save_pretrained(str(model_dir))
    config = BertConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, initializer_range=init_range)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(str(model_dir))

    def sentence(lo: int = 3, hi: int = 14) -> List[str]:
        return [rnd.choice(WORDS) for _ in range(rnd.randint(lo, hi))]

    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(sentence()) for _ in range(n_sentences)) + "\n", encoding="utf-8")

    # A SentEval-layout evaluation set (STS12-16, STS-B dev/test, SICK trial/test): pairs that share a prefix, the
    # gold score the shared fraction, so the scores mean something.
    from iscse.senteval import STS_SUBSETS

    senteval = root / "senteval"

    def pairs(n: int) -> List[tuple]:
        out = []
        for _ in range(n):
            a = sentence(4, 10)
            keep = rnd.randint(0, len(a))
            b = a[:keep] + sentence(1, len(a) - keep) if keep < len(a) else list(a)
            out.append((" ".join(a), " ".join(b), keep / len(a)))
        return out

    def write(path: Path, lines: List[str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    for task, subsets in STS_SUBSETS.items():
        for subset in subsets:
            rows = pairs(12)
            folder = senteval / "STS" / f"{task}-en-test"
            write(folder / f"STS.input.{subset}.txt", [f"{a}\t{b}" for a, b, _ in rows])
            write(folder / f"STS.gs.{subset}.txt", [f"{5 * f:.3f}" for _, _, f in rows])
    for split, n in (("dev", 60), ("test", 40)):
        write(senteval / "STS" / "STSBenchmark" / f"sts-{split}.csv",
              [f"main\tx\t2012\t{i:04d}\t{5 * f:.3f}\t{a}\t{b}" for i, (a, b, f) in enumerate(pairs(n))])
    for name, n in (("SICK_trial.txt", 60), ("SICK_test_annotated.txt", 40)):
        write(senteval / "SICK" / name, ["pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment"]
              + [f"{i}\t{a}\t{b}\t{1 + 4 * f:.2f}\tNEUTRAL" for i, (a, b, f) in enumerate(pairs(n))])
    return {"model": str(model_dir), "corpus": str(corpus), "data_dir": str(senteval), "cache": str(root / "cache")}


def tiny_args(setup: Dict[str, str], output_dir: Path, **overrides) -> List[str]:
    """Flags for a short tiny run: batch 8, buffer 32 (full after 4 steps), k 4, fp32, no progress bars."""
    flags = {
        "model_name_or_path": setup["model"], "train_file": setup["corpus"], "output_dir": str(output_dir),
        "cache_dir": setup["cache"], "per_device_train_batch_size": 8, "buffer_size": 32, "k": 4,
        "learning_rate": 1e-3, "max_seq_length": 16, "max_steps": 12, "pooler_type": "cls", "mlp_only_train": True,
        "eval_steps": 0, "save_steps": 0, "logging_steps": 5, "skip_test_eval": True, "seed": 7,
        "disable_tqdm": True, "device": "cpu",
    }
    flags.update(overrides)
    argv: List[str] = []
    for key, value in flags.items():
        if value is None:
            continue
        if value is True:
            argv.append(f"--{key}")
        elif value is False:
            argv.append(f"--no-{key}")
        else:
            argv += [f"--{key}", str(value)]
    return argv


def read_metrics(output_dir: Path, event: str = "train") -> List[dict]:
    """The ``event`` records of ``output_dir/metrics.jsonl`` in file order."""
    lines = (Path(output_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def assert_losses_close(a: List[dict], b: List[dict], rtol: float) -> None:
    """Same steps, and every logged loss component equal within ``rtol`` relative (first mismatch reported)."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "L_cl", "L_s"):
            x, y = ra[key], rb[key]
            assert abs(x - y) <= rtol * max(abs(x), abs(y), 1e-12), f"step {ra['step']} {key}: {x!r} vs {y!r}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Dict[str, str]:
    """A tiny model with dropout 0.1, corpus and dev set, shared by the tests of this module."""
    return make_tiny_setup(tmp_path_factory.mktemp("tiny"))


# ------------------------------------------------------------------------------------------------ (c) ops


def test_ops_reference_and_torch_give_the_same_losses(tiny, tmp_path):
    runs = {}
    for ops in ("reference", "torch"):
        out = tmp_path / ops
        assert T.main(tiny_args(tiny, out, ops=ops, max_steps=20)) == 0
        runs[ops] = read_metrics(out)
    ref, tor = runs["reference"], runs["torch"]
    assert [r["step"] for r in ref] == list(range(1, 21))
    assert all(r["L_s"] == 0 for r in ref[:3]) and all(r["L_s"] > 0 for r in ref[3:])  # the buffer fills at step 4
    assert_losses_close(tor, ref, rtol=1e-5)


@pytest.mark.slow
def test_ops_triton_in_the_interpreter_matches_torch(tiny, tmp_path):
    pytest.importorskip("triton")
    import subprocess
    import sys

    # TRITON_INTERPRET must be set before triton is imported, hence a fresh process.
    env = dict(os.environ, TRITON_INTERPRET="1")
    repo = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(repo) + os.pathsep + env.get("PYTHONPATH", "")
    argv = tiny_args(tiny, tmp_path / "triton", ops="triton", max_steps=6)
    proc = subprocess.run([sys.executable, "-m", "iscse.train", *argv], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert T.main(tiny_args(tiny, tmp_path / "torch", ops="torch", max_steps=6)) == 0
    assert_losses_close(read_metrics(tmp_path / "triton"), read_metrics(tmp_path / "torch"), rtol=1e-5)


# ------------------------------------------------------------------------------------------------ (d) resume


class _Crash(RuntimeError):
    pass


def test_resume_replays_the_uninterrupted_run(tiny, tmp_path, monkeypatch):
    common = dict(max_steps=12, save_steps=3, save_total_limit=2, eval_steps=4, data_dir=tiny["data_dir"],
                  eval_at_start=True)
    full = tmp_path / "full"
    assert T.main(tiny_args(tiny, full, **common)) == 0
    reference = read_metrics(full)
    assert len(reference) == 12
    # keeps the last two checkpoints
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["step-12", "step-9"]

    # The same run, crashing right after step 7 (its last checkpoint is step 6).
    broken = tmp_path / "broken"
    real_step = T.Trainer._train_step

    def crashing_step(self, inputs):
        if self.step == 7:
            raise _Crash("simulated crash")
        return real_step(self, inputs)

    monkeypatch.setattr(T.Trainer, "_train_step", crashing_step)
    with pytest.raises(_Crash):
        T.main(tiny_args(tiny, broken, **common))
    monkeypatch.setattr(T.Trainer, "_train_step", real_step)
    assert sorted(p.name for p in (broken / "checkpoints").iterdir()) == ["step-3", "step-6"]
    assert [r["step"] for r in read_metrics(broken)] == list(range(1, 8))

    # Resume by naming the output folder (its newest checkpoint is taken); no other flag is needed.
    assert T.main(["--resume_from", str(broken), "--disable_tqdm"]) == 0
    resumed = read_metrics(broken)
    assert_losses_close(resumed, reference, rtol=1e-6)
    assert [r["lr"] for r in resumed] == [r["lr"] for r in reference]
    evals_full, evals_resumed = read_metrics(full, "eval"), read_metrics(broken, "eval")
    assert [e["step"] for e in evals_resumed] == [0, 4, 8, 12]
    for a, b in zip(evals_full, evals_resumed):
        assert a["step"] == b["step"] and a["best"] == b["best"]
        assert a["eval_stsb_spearman"] == pytest.approx(b["eval_stsb_spearman"], abs=1e-6)
    a, b = (json.loads((d / "train_results.json").read_text()) for d in (full, broken))
    assert a["best_step"] == b["best_step"] and a["best_metric"] == pytest.approx(b["best_metric"], abs=1e-6)
    # the best models are the same weights
    from safetensors.torch import load_file

    wa, wb = (load_file(str(d / "model" / "model.safetensors")) for d in (full, broken))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)


def test_resume_from_a_checkpoint_into_a_new_folder(tiny, tmp_path):
    full = tmp_path / "full"
    assert T.main(tiny_args(tiny, full, max_steps=8, save_steps=4, objective="iscse", alpha_mode_dynamic=True,
                            alpha_start=0.01, alpha_end=0.2)) == 0
    reference = read_metrics(full)
    out = tmp_path / "continued"
    assert T.main(["--resume_from", str(full / "checkpoints" / "step-4"), "--output_dir", str(out),
                   "--disable_tqdm"]) == 0
    continued = read_metrics(out)
    assert [r["step"] for r in continued] == [5, 6, 7, 8]
    assert_losses_close(continued, reference[4:], rtol=1e-6)
    assert [r["alpha"] for r in continued] == [r["alpha"] for r in reference[4:]]  # the cosine schedule continues


def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes(tiny, tmp_path, monkeypatch):
    full = tmp_path / "full"
    assert T.main(tiny_args(tiny, full, max_steps=8)) == 0
    out = tmp_path / "stopped"
    real_step = T.Trainer._train_step

    def interrupted_step(self, inputs):
        if self.step == 2:  # Ctrl-C arrives during step 3
            signal.raise_signal(signal.SIGINT)
        return real_step(self, inputs)

    monkeypatch.setattr(T.Trainer, "_train_step", interrupted_step)
    assert T.main(tiny_args(tiny, out, max_steps=8)) == 130  # no --save_steps: the stop itself saves
    monkeypatch.setattr(T.Trainer, "_train_step", real_step)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-3"]
    assert T.main(["--resume_from", str(out), "--disable_tqdm"]) == 0
    assert_losses_close(read_metrics(out), read_metrics(full), rtol=1e-6)


def test_resume_refuses_a_changed_trajectory_setting(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert T.main(tiny_args(tiny, out, max_steps=4, save_steps=4)) == 0
    before = (out / "metrics.jsonl").read_text()
    assert T.main(["--resume_from", str(out), "--learning_rate", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--learning_rate" in err and "checkpoint" in err
    assert (out / "metrics.jsonl").read_text() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert T.main(["--resume_from", str(out), "--output_dir", str(other)]) == 2
    assert "--output_dir" in capsys.readouterr().err


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *args, **kwargs):
        if str(f).endswith("training_state.pt") and ".step-8.tmp" in str(f):
            calls["n"] += 1
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        T.main(tiny_args(tiny, out, max_steps=12, save_steps=4))
    monkeypatch.setattr(torch, "save", real_save)
    assert calls["n"] == 1
    ckpts = out / "checkpoints"
    assert [p.name for p in ckpts.iterdir() if not p.name.startswith(".")] == ["step-4"]
    assert (ckpts / "step-4" / "trainer_state.json").is_file()
    # the half-written folder is never taken for a checkpoint, and resuming works
    assert T.find_checkpoint(out) == ckpts / "step-4"
    assert T.main(["--resume_from", str(out), "--disable_tqdm"]) == 0
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 13))
    assert not any(p.name.startswith(".step-") for p in ckpts.iterdir())


# ------------------------------------------------------------------------------------------------ outputs


def test_outputs_load_with_automodel_and_sentence_transformers(tiny, tmp_path):
    out = tmp_path / "run"
    assert T.main(tiny_args(tiny, out, max_steps=6, eval_steps=3, data_dir=tiny["data_dir"])) == 0
    for name in ("train.log", "metrics.jsonl", "train_config.json", "train_results.json"):
        assert (out / name).is_file(), name
    log = (out / "train.log").read_text()
    assert "STS-B dev" in log and "step 5/6" in log
    rec = read_metrics(out)[-1]
    assert set(rec) >= {"step", "loss", "L_cl", "L_s", "alpha", "lr", "epoch", "grad_norm"}
    assert (out / "model" / "model.safetensors").is_file()

    from transformers import AutoModel, AutoTokenizer

    from iscse.models import SentenceEncoder

    enc = SentenceEncoder.from_pretrained(str(out / "model"))
    assert enc.pooler == "cls" and enc.mlp_only_train
    AutoModel.from_pretrained(str(out / "model"))
    AutoTokenizer.from_pretrained(str(out / "model"))
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(out / "model"), device="cpu")
    sentences = ["w1 w2 w3", "w4 w5"]
    torch.testing.assert_close(torch.as_tensor(st.encode(sentences)), enc.encode(sentences, show_progress=False),
                               rtol=1e-4, atol=1e-5)


def test_simcse_objective_and_bf16_run(tiny, tmp_path):
    out = tmp_path / "simcse"
    assert T.main(tiny_args(tiny, out, objective="simcse", max_steps=3, bf16=True)) == 0
    recs = read_metrics(out)
    assert all(r["L_s"] == 0 and r["alpha"] == 0 for r in recs)


def test_sts_test_table_of_the_best_checkpoint(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert T.main(tiny_args(tiny, out, max_steps=4, eval_steps=2, data_dir=tiny["data_dir"],
                            skip_test_eval=False)) == 0
    printed = capsys.readouterr().out
    assert "STSBenchmark" in printed and "Avg." in printed
    scores = json.loads((out / "sts_test.json").read_text())
    assert set(scores) == {"STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness", "avg"}
    test = read_metrics(out, "test")
    summary = json.loads((out / "train_results.json").read_text())
    assert len(test) == 1 and test[0]["step"] == summary["best_step"]
    assert summary["test"]["avg"] == pytest.approx(scores["avg"])
    # the evaluator's own command agrees with the table the trainer printed
    from iscse import evaluate

    assert evaluate.main(["--model_name_or_path", str(out / "model"), "--data_dir", tiny["data_dir"],
                          "--output_json", str(tmp_path / "again.json"), "--no_progress"]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again == pytest.approx(scores)


# ------------------------------------------------------------------------------------------------ flags


def test_presets_carry_the_run_scripts_and_flags_override(tmp_path):
    cfg = T.parse_args(["--preset", "bert-base", "--output_dir", str(tmp_path / "a")])
    assert (cfg.model_name_or_path, cfg.per_device_train_batch_size, cfg.learning_rate, cfg.alpha,
            cfg.alpha_mode_dynamic, cfg.fp16) == ("bert-base-uncased", 64, 3e-5, 0.1, False, False)
    assert (cfg.max_seq_length, cfg.eval_steps, cfg.pooler_type, cfg.mlp_only_train, cfg.temp,
            cfg.num_train_epochs) == (32, 125, "cls", True, 0.05, 1.0)
    large = T.parse_args(["--preset", "roberta-large", "--output_dir", str(tmp_path / "b")])
    assert (large.model_name_or_path, large.per_device_train_batch_size, large.learning_rate,
            large.alpha_mode_dynamic, large.alpha_start, large.alpha_end, large.fp16) == (
        "roberta-large", 512, 3e-5, True, 0.005, 0.05, True)
    assert T.parse_args(["--preset", "bert-large", "--output_dir", str(tmp_path / "c")]).learning_rate == 1e-5
    assert T.parse_args(["--preset", "roberta-base", "--output_dir", str(tmp_path / "d")]).learning_rate == 1e-5
    over = T.parse_args(["--preset", "bert-large", "--learning_rate", "2e-5", "--no-fp16", "--bf16",
                         "--output_dir", str(tmp_path / "e")])
    assert (over.learning_rate, over.fp16, over.bf16, over.per_device_train_batch_size) == (2e-5, False, True, 64)
    assert T.parse_args(["--preset", "bert-base"]).output_dir == "result/iscse-bert-base-constant-alpha-0.1"


@pytest.mark.parametrize("flags, named", [
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size"),
    (["--k", "40"], "--k"),
    (["--fp16", "--bf16"], "--fp16"),
    (["--learning_rate", "-1"], "--learning_rate"),
    (["--alpha", "nan"], "--alpha"),
    (["--max_steps", "0"], "--max_steps"),
    (["--train_file", "/nonexistent/corpus.txt"], "--train_file"),
    (["--data_dir", "/nonexistent/senteval"], "--data_dir"),
    (["--ops", "triton"], "--ops triton"),
    (["--per_device_train_batch_size", "64"], "--buffer_size"),
])
def test_bad_flags_fail_naming_the_flag_before_writing(tiny, tmp_path, capsys, monkeypatch, flags, named):
    if "triton" in flags:
        # conftest may run Triton in its interpreter (where --ops triton on CPU is valid); make it compiled-only
        try:
            import iscse.backends.triton_fused as triton_ops
        except ImportError:
            pass  # no triton at all: the error path is the same
        else:
            monkeypatch.setattr(triton_ops, "INTERPRETED", False)
    out = tmp_path / "never"
    argv = tiny_args(tiny, out) + flags
    assert T.main(argv) == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_missing_model_name_and_non_empty_output_dir(tiny, tmp_path, capsys):
    assert T.main(["--output_dir", str(tmp_path / "x")]) == 2
    assert "--model_name_or_path" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    assert T.main(tiny_args(tiny, busy)) == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert (busy / "notes.txt").read_text() == "keep me"


def test_without_network_the_error_names_the_flag(tiny, tmp_path, monkeypatch, capsys):
    from iscse import download

    # Nothing listens on port 9 (discard) of the loopback: the connection is refused at once.
    monkeypatch.setattr(download, "WIKI1M_URL", "http://127.0.0.1:9/wiki1m_for_simcse.txt")
    monkeypatch.setattr(download, "SENTEVAL_URL", "http://127.0.0.1:9/senteval.tar")
    monkeypatch.delenv("ISCSE_DATA_DIR", raising=False)
    out = tmp_path / "run"
    argv = tiny_args(tiny, out, train_file=None, cache_dir=str(tmp_path / "cache"))
    assert T.main(argv) == 2
    err = capsys.readouterr().err
    assert "--train_file" in err and "127.0.0.1:9" in err
    argv = tiny_args(tiny, out, cache_dir=str(tmp_path / "cache"), eval_steps=5)
    assert T.main(argv) == 2
    assert "--data_dir" in capsys.readouterr().err
    assert not out.exists()
    assert not any(p.name.endswith(".part") for p in (tmp_path / "cache").rglob("*"))
    with pytest.raises(download.DownloadError, match="--data_dir"):
        download.ensure_senteval(tmp_path / "cache2")


def test_shuffled_batches_partition_the_global_batch():
    from iscse.data import ShuffledBatches

    one = ShuffledBatches(50, 8, seed=3)
    two = [ShuffledBatches(50, 4, seed=3, world_size=2, rank=r) for r in range(2)]
    assert one.batches_per_epoch == two[0].batches_per_epoch == 7
    for epoch in range(2):
        seen = []
        for b in range(one.batches_per_epoch - 1):
            rows = one.local_indices(epoch, b)
            assert rows == two[0].local_indices(epoch, b) + two[1].local_indices(epoch, b)
            seen += rows
        seen += one.local_indices(epoch, one.batches_per_epoch - 1)
        assert sorted(seen) == list(range(50))  # every row once per epoch
    assert one.local_indices(0, 0) != one.local_indices(1, 0)  # reshuffled each epoch
    assert len(two[0].local_indices(0, 6)) == len(two[1].local_indices(0, 6)) == 1  # last batch split evenly


def test_collate_duplicates_each_sentence():
    from iscse.data import collate_two_views

    batch = collate_two_views({"input_ids": [[2, 5, 3], [2, 6, 7, 8, 3]], "attention_mask": [[1] * 3, [1] * 5]},
                              pad_token_id=0)
    assert batch["input_ids"].tolist() == [[2, 5, 3, 0, 0], [2, 5, 3, 0, 0], [2, 6, 7, 8, 3], [2, 6, 7, 8, 3]]
    assert batch["attention_mask"].tolist()[0] == [1, 1, 1, 0, 0]
