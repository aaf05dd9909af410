"""What ``--help`` says: ``python -m iscse.train`` lists the IS-CSE flags first, each with its default; the example
scripts' and the bench scripts' help shows the defaults they really use."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def wide_help(monkeypatch):
    """argparse wraps help at $COLUMNS, and may break "st-iscse-out" at a hyphen: one entry a line here."""
    monkeypatch.setenv("COLUMNS", "1000")


def _entries(help_text: str) -> dict:
    """{option string: its help entry, whitespace collapsed} for every option listed in an argparse help text."""
    entries, current = {}, None
    for line in help_text.splitlines():
        m = re.match(r"^  (-{1,2}[A-Za-z0-9][^ ]*)", line)
        if m:
            current = []
            names = re.findall(r"(?:^|, )(-{1,2}[A-Za-z0-9][\w-]*)", line.strip().split("  ")[0])
            for name in names:
                entries[name] = current
        if current is not None:
            if line and not line.startswith(" "):  # the next section's title
                current = None
                continue
            current.append(line.strip())
    return {k: " ".join(" ".join(v).split()) for k, v in entries.items()}


def _train_help(capsys) -> str:
    """The help exactly as ``python -m iscse.train --help`` prints it (the flags-given-only parser's --help)."""
    from iscse.training.arguments import _explicit

    with pytest.raises(SystemExit) as info:
        _explicit(["--help"])
    assert info.value.code in (0, None)
    return capsys.readouterr().out


def test_train_help_lists_the_iscse_flags_first_with_their_defaults(capsys):
    from transformers import TrainingArguments

    from iscse.training.arguments import ISCSETrainingArguments, RETUNED_FIELDS, build_parser

    text = _train_help(capsys)
    assert text == build_parser().format_help()
    lines = text.splitlines()
    # the usage and the first lines name IS-CSE flags, not the ~150 TrainingArguments ones
    assert lines[0].startswith("usage: python -m iscse.train") and "--preset" in lines[0]
    assert len([line for line in lines if line.startswith("usage") or line.startswith("  ") and "[" in line
                and lines.index(line) < 5]) <= 5
    head = "\n".join(lines[:30])
    assert "IS-CSE / SimCSE flags:" in head and "--preset" in head and "--model_name_or_path" in head

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = [f for f in dataclasses.fields(ISCSETrainingArguments) if f.init and f.name not in base]
    retuned = [f for f in dataclasses.fields(ISCSETrainingArguments) if f.name in RETUNED_FIELDS]
    assert len(own) >= 30 and {"buffer_size", "k", "alpha", "temp", "per_device_train_batch_size"} <= \
        {f.name for f in own + retuned}
    entries = _entries(text)
    pos = {name: text.index(f"\n  --{name} ") if f"\n  --{name} " in text else text.index(f"\n  --{name},")
           for name in [f.name for f in own + retuned] + ["gradient_accumulation_steps", "seed", "tf32"]}
    last_own = max(pos[f.name] for f in own)
    first_hf = min(pos[n] for n in ("gradient_accumulation_steps", "seed", "tf32"))
    assert last_own < min(pos[f.name] for f in retuned) and max(pos[f.name] for f in retuned) < first_hf
    for f in own + retuned:
        entry = entries[f"--{f.name}"]
        default = f.default.value if hasattr(f.default, "value") else f.default
        assert f"(default: {default})" in entry, (f.name, entry)
        assert entry.count("(default:") == 1, (f.name, entry)  # no stale hand-written default beside it
    # a few values as the trainer uses them
    for name, shown in [("buffer_size", "1024"), ("k", "16"), ("temp", "0.05"), ("alpha", "0.1"),
                        ("per_device_train_batch_size", "64"), ("learning_rate", "3e-05"), ("eval_steps", "125")]:
        assert f"(default: {shown})" in entries[f"--{name}"], name
    parsed = build_parser().parse_args([])
    assert (parsed.buffer_size, parsed.k, parsed.temp, parsed.per_device_train_batch_size) == (1024, 16, 0.05, 64)


def test_the_explicit_flags_parser_still_reads_only_what_is_given():
    from iscse.training.arguments import _explicit

    assert _explicit(["--k", "4", "--no-reinit_mlp"]) == {"k": 4, "reinit_mlp": False}
    assert _explicit([]) == {}


# ---------------------------------------------------------------------------------------------- scripts' help


def _script_parser(path: Path, builder: str) -> argparse.ArgumentParser:
    spec = importlib.util.spec_from_file_location(f"_help_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # bench scripts import benchlib from their folder
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return getattr(module, builder)()


SCRIPTS = [
    ("examples/sentence_transformers_iscse.py", "build_parser"),
    ("examples/smoothed_hard_negatives.py", "build_parser"),
    ("bench/cpu_ablations.py", "build_parser"),
    ("bench/cpu_compile.py", "build_parser"),
    ("bench/faiss_gpu_bench.py", "build_parser"),
]


@pytest.mark.parametrize("script,builder", SCRIPTS)
def test_script_help_shows_the_defaults_it_uses(script, builder):
    parser = _script_parser(REPO / script, builder)
    entries = _entries(parser.format_help())
    defaults = vars(parser.parse_args(_required_args(script)))
    checked = 0
    for name, value in defaults.items():
        flag = next((f for f in entries if f.lstrip("-").replace("-", "_") == name), None)
        if flag is None or isinstance(value, bool):
            continue  # positional, or an on/off switch (its default is "off")
        shown = str(value)
        assert f"(default: {shown})" in entries[flag], (script, flag, value, entries[flag])
        assert entries[flag].count("default") == 1, (script, flag, entries[flag])
        checked += 1
    assert checked >= 2, script


def _required_args(script: str) -> list:
    return ["corpus.txt"] if script == "examples/sentence_transformers_iscse.py" else []


def test_example_help_runs_from_the_command_line():
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "sentence_transformers_iscse.py"), "--help"],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=dict(os.environ, COLUMNS="1000"))
    assert proc.returncode == 0, proc.stderr
    entries = _entries(proc.stdout)
    assert "(default: st-iscse-out)" in entries["--output-dir"]
    assert "(default: 64)" in entries["--buffer-size"] and "(default: 4)" in entries["--k"]


def test_download_script_help_names_its_default_and_downloads_nothing(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "scripts" / "download_data.sh"), "--help"], capture_output=True,
                          text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "usage: scripts/download_data.sh [DEST]" in proc.stdout and "default: data" in proc.stdout
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- .gitignore


def test_run_outputs_are_git_ignored():
    """What the trainer's presets, the example, the bench scripts and the data script write into the clone by
    default, and the docs build, are ignored by git (so runs leave the clone clean)."""
    import shutil

    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    from iscse.training.arguments import PRESETS

    example = _script_parser(REPO / "examples" / "sentence_transformers_iscse.py", "build_parser")
    outputs = {Path(p["output_dir"]).parts[0] for p in PRESETS.values()}
    outputs |= {example.parse_args(["corpus.txt"]).output_dir, "out", "data", "site", ".benchmarks", "build",
                "dist", "iscse.egg-info", ".pytest_cache", "iscse/__pycache__"}
    outputs = sorted(f"{name}/probe" for name in outputs) + ["iscse/kernels"]
    proc = subprocess.run(["git", "check-ignore", "--no-index", *outputs], capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    ignored = set(proc.stdout.split())
    assert ignored == set(outputs), f"not git-ignored: {sorted(set(outputs) - ignored)}"
    tracked = subprocess.run(["git", "ls-files", "-ci", "--exclude-standard"], capture_output=True, text=True,
                             cwd=REPO, timeout=60).stdout.split()
    assert tracked == [], f"tracked files that .gitignore would ignore: {tracked}"
