"""Bad input at both command lines: ``python -m iscse.train`` and ``python -m iscse.evaluate`` each end with exit
status 2 and exactly one line on stderr that names the flag or file and says what to do: no traceback, nothing
written, nothing lost. Most cases call ``main()`` in-process; two run the real commands in a subprocess to check
the whole of stderr."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_train import make_tiny_setup, one_thread, tiny_args  # noqa: F401 (one_thread: an autouse fixture)

from iscse.evaluation import evaluate as E
from iscse import train as T

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny BERT, corpus and SentEval-layout data of test_train."""
    return make_tiny_setup(tmp_path_factory.mktemp("tiny_errors"))


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory) -> str:
    """A (tiny, random) GPT-2: a decoder-only model, not a BERT- or RoBERTa-like encoder."""
    from transformers import GPT2Config, GPT2Model

    folder = tmp_path_factory.mktemp("gpt2") / "model"
    GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(str(folder))
    return str(folder)


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


TRAIN_FILES = [
    ("empty", lambda d: _write(d / "empty.txt", b""), "is empty"),
    ("blank lines", lambda d: _write(d / "blank.txt", b"\n  \n\t\n\n"), "holds only blank lines"),
    ("not UTF-8", lambda d: _write(d / "latin1.txt", "caf\u00e9 au lait\nna\u00efve\n".encode("latin-1")),
     "is not UTF-8 text (line 1"),
    ("a folder", lambda d: str(d), "is a folder, not a file"),
    ("smaller than one global batch", lambda d: _write(d / "one.txt", b"a single sentence .\n"),
     "holds 1 sentence, fewer than one global batch (8"),
    ("missing", lambda d: str(d / "nope.txt"), "does not exist"),
]


@pytest.mark.parametrize("case, make, says", TRAIN_FILES, ids=[c[0] for c in TRAIN_FILES])
def test_train_file(tiny, tmp_path, capsys, case, make, says):
    folder = tmp_path / "files"
    folder.mkdir()
    out = tmp_path / "out"
    assert T.main(tiny_args(tiny, out, train_file=make(folder))) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--train_file" in line and says in line, line
    assert not out.exists()


def _payload_offset(path: Path, member_suffix: str) -> int:
    """Where the bytes of the zip member ending with ``member_suffix`` start in ``path`` (a torch.save archive)."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def test_a_corrupt_checkpoint_file_is_named(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert T.main(tiny_args(tiny, out, max_steps=2, save_steps=2)) == 0
    state = out / "checkpoint-2" / "scheduler.pt"
    data = bytearray(state.read_bytes())
    data[_payload_offset(state, "data.pkl") + 3] ^= 0xFF  # same size, one byte of the pickle flipped
    state.write_bytes(bytes(data))
    capsys.readouterr()
    for target in (out / "checkpoint-2", out):
        assert T.main(["--resume_from", str(target)]) == 2
        line = _one_line(capsys.readouterr().err)
        assert "scheduler.pt is corrupt" in line and "--resume_from" in line, line
    assert (out / "checkpoint-2" / "scheduler.pt").read_bytes() == bytes(data)


def test_train_data_dir_incomplete_or_a_file(tiny, tmp_path, capsys):
    import shutil

    data = tmp_path / "senteval"
    shutil.copytree(tiny["data_dir"], data)
    (data / "STS" / "STSBenchmark" / "sts-dev.csv").unlink()
    out = tmp_path / "out"
    assert T.main(tiny_args(tiny, out, data_dir=str(data), eval_steps=2)) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--data_dir" in line and "STSBenchmark dev" in line and "sts-dev.csv" in line, line
    assert T.main(tiny_args(tiny, out, data_dir=tiny["corpus"], eval_steps=2)) == 2
    assert "is not a folder" in _one_line(capsys.readouterr().err)
    assert not out.exists()


def test_unreadable_data_dir(tiny, tmp_path, capsys, monkeypatch):
    import shutil

    data = tmp_path / "senteval"
    shutil.copytree(tiny["data_dir"], data)
    locked = data / "STS" / "STSBenchmark"
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # root reads any folder whatever its permissions: make the read fail as it would for a user
        import iscse.evaluation.evaluate
        import iscse.evaluation.senteval

        real = iscse.evaluation.senteval.load_sts_task

        def denied(root, task, split):
            if task == "STSBenchmark":
                raise PermissionError(13, "Permission denied", str(locked / f"sts-{split}.csv"))
            return real(root, task, split)

        monkeypatch.setattr(iscse.evaluation.senteval, "load_sts_task", denied)
        monkeypatch.setattr(iscse.evaluation.evaluate, "load_sts_task", denied)
    else:
        locked.chmod(0)
    try:
        assert T.main(tiny_args(tiny, tmp_path / "out", data_dir=str(data), eval_steps=2)) == 2
        line = _one_line(capsys.readouterr().err)
        assert "--data_dir" in line and "cannot be read" in line and "STSBenchmark dev" in line, line
        assert not (tmp_path / "out").exists()
        with pytest.raises(SystemExit) as exit_info:
            E.main(["--model_name_or_path", tiny["model"], "--data_dir", str(data), "--mode", "dev"])
        assert exit_info.value.code == 2
        line = _one_line(capsys.readouterr().err)
        assert "--data_dir" in line and "Permission denied" in line, line
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("model, says", [
    ("gpt2", "is a gpt2 model, not a BERT- or RoBERTa-like encoder"),
    ("missing", "does not exist"),
    ("no config", "holds no config.json"),
])
def test_model_that_is_not_an_encoder(tiny, gpt2_folder, tmp_path, capsys, model, says):
    path = {"gpt2": gpt2_folder, "missing": str(tmp_path / "no" / "such" / "model"), "no config": str(tmp_path)}[model]
    out = tmp_path / "out"
    assert T.main(tiny_args(tiny, out, model_name_or_path=path)) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--model_name_or_path" in line and says in line, line
    assert not out.exists()
    with pytest.raises(SystemExit) as exit_info:
        E.main(["--model_name_or_path", path, "--data_dir", tiny["data_dir"], "--mode", "dev"])
    assert exit_info.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert "--model_name_or_path" in line and says in line, line


def test_evaluate_data_dir_incomplete(tiny, tmp_path, capsys):
    import shutil

    data = tmp_path / "senteval"
    shutil.copytree(tiny["data_dir"], data)
    (data / "SICK" / "SICK_trial.txt").write_bytes(b"\xff\xfe broken")
    with pytest.raises(SystemExit) as exit_info:
        E.main(["--model_name_or_path", tiny["model"], "--data_dir", str(data), "--mode", "dev"])
    assert exit_info.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert "--data_dir" in line and "SICKRelatedness dev" in line, line


def _run(module: str, argv, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_commands_print_one_line_and_nothing_else(tiny, tmp_path):
    # Online mode on purpose: a path that is clearly local must fail at once, without asking the Hub.
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = _run("iscse.train", ["--model_name_or_path", tiny["model"], "--train_file", str(empty),
                                "--output_dir", str(tmp_path / "out")])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("python -m iscse.train: error: --train_file") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()
    proc = _run("iscse.evaluate", ["--model_name_or_path", str(tmp_path / "runs" / "x" / "model"), "--data_dir",
                                   tiny["data_dir"]], timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("python -m iscse.evaluate: error: --model_name_or_path") \
        and "does not exist" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_inspect_text_file_counts_lines_and_sentences(tmp_path):
    from iscse.training.data import inspect_text_file

    path = tmp_path / "c.txt"
    path.write_text("one\n\ntwo\n  \nthree")
    stats = inspect_text_file(path)
    assert (stats.lines, stats.sentences) == (5, 3)
    path.write_bytes("a\u00e9\n".encode() * 5 + b"bad \xff\n")
    with pytest.raises(ValueError, match="line 6"):
        inspect_text_file(path, chunk_bytes=7)  # the bad byte found across chunk boundaries too
    # a multi-byte character split by a chunk boundary is fine
    path.write_text("\u00e9" * 10 + "\n")
    assert inspect_text_file(path, chunk_bytes=3).sentences == 1
    import datasets

    path.write_text("one\n\ntwo\n  \nthree")
    rows = datasets.load_dataset("text", data_files=str(path), split="train", cache_dir=str(tmp_path / "c"))
    assert len(rows) == inspect_text_file(path).lines  # the same count as the reader the trainer uses
