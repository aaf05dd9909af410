"""Every code block in README.md and docs/**/*.md runs as written; the site's nav lists every page; the README is short.

Which blocks run: fenced blocks whose language is ``python`` / ``py`` (a fresh ``python`` process each) or ``bash`` /
``sh`` / ``shell`` (``bash -euo pipefail``). Other languages (``text``, ``console`` transcripts with prompts and
output, ``yaml``, ``markdown``...) are shown, not run.

A block that cannot run in CI says so on its first line: ``# needs: GPU``, ``# needs: hub``, ``# needs: full data``,
``# needs: network`` or ``# needs: CI`` (several: ``# needs: GPU, full data``); it is skipped with that reason. Any
other reason, or a ``# needs:`` line further down the block, fails, so a typo cannot silently skip a block. An
unmarked shell block that installs packages (``pip install``, ``apt-get install``...) fails without running: run
here, it would change the environment the tests run in.

Where a block runs: a fresh temporary folder that looks like the repository root (a symbolic link to each of its
top-level entries), so a block written as if run in the clone (``python examples/x.py``, ``--output_dir result``)
works, and whatever it writes to a relative path lands in the temporary folder. ``../shared`` beside it is the
clone's ``../shared`` when there is one (CI's data). ``ISCSE_REPO`` is the repository root, ``PYTHONPATH`` starts
with it. A block that writes into the clone anyway (through a link) fails: ``git status`` (ignored files included)
is compared before and after each block.
"""
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200
#: The reasons a block may give for not running in CI (the docs' convention, issue 20).
NEEDS = ("GPU", "hub", "full data", "network", "CI")
PYTHON_LANGS = ("python", "py")
SHELL_LANGS = ("bash", "sh", "shell")
#: Seconds one block may take (CPU size); ISCSE_DOCS_TIMEOUT overrides.
TIMEOUT = float(os.environ.get("ISCSE_DOCS_TIMEOUT", "300"))

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_INSTALL = re.compile(r"\b(pip3?|uv pip|apt-get|apt|conda)\s+install\b")
_NEEDS = re.compile(r"^#\s*needs\s*:(?P<reasons>.*)$", re.IGNORECASE)


@dataclass
class Block:
    path: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


def extract_blocks(text: str, path: str = "<text>") -> List[Block]:
    """The fenced code blocks of a Markdown text, nested fences (a longer fence around a shorter one) included as
    the outer block's text. The language is the info string's first word (``{.python}`` and ``python title="x"``
    give ``python``); indentation of the opening fence (lists, admonitions) is removed from the lines."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m or (m.group("fence")[0] == "`" and "`" in m.group("info")):
            i += 1
            continue
        indent, fence = len(m.group("indent").expandtabs()), m.group("fence")
        words = m.group("info").strip().lstrip("{").lstrip(".").split()
        lang = words[0].rstrip("}").lower() if words else ""
        body = []
        j = i + 1
        while j < len(lines):
            close = _FENCE.match(lines[j])
            if (close and close.group("fence")[0] == fence[0] and len(close.group("fence")) >= len(fence)
                    and not close.group("info").strip()):
                break
            line = lines[j].expandtabs()
            # remove the fence's indentation (at most that much whitespace)
            strip = len(line) - len(line.lstrip(" "))
            body.append(line[min(indent, strip):])
            j += 1
        blocks.append(Block(path, i + 1, lang, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def needs_of(block: Block) -> Optional[List[str]]:
    """The reasons of the block's first-line ``# needs:`` marker, or None when it has none. Raises ValueError for a
    reason not in NEEDS, an empty marker, or a marker below the first line."""
    lines = block.code.splitlines()
    for n, line in enumerate(lines[1:], start=2):
        if _NEEDS.match(line.strip()):
            raise ValueError(f"{block.id}: '# needs:' must be on the block's first line, found on line {n} of it")
    first = lines[0].strip() if lines else ""
    m = _NEEDS.match(first)
    if not m:
        return None
    reasons = [r.strip() for r in m.group("reasons").split(",")]
    bad = [r for r in reasons if r not in NEEDS]
    if bad or not reasons:
        raise ValueError(f"{block.id}: unknown '# needs:' reason(s) {bad}; the accepted ones are {list(NEEDS)}")
    return reasons


def check_block(block: Block) -> Optional[List[str]]:
    """:func:`needs_of`, and a ValueError for an unmarked shell block that installs packages (run by the tests, it
    would change the environment they run in)."""
    reasons = needs_of(block)
    if not reasons and block.lang in SHELL_LANGS and _INSTALL.search(block.code):
        raise ValueError(f"{block.id} installs packages: mark it '# needs: CI' (the installs .ci/run does) or "
                         f"'# needs: network'")
    return reasons


def doc_files(repo: Path = REPO) -> List[Path]:
    files = [repo / "README.md"] + sorted((repo / "docs").rglob("*.md"))
    return [f for f in files if f.is_file()]


def runnable_blocks(repo: Path = REPO) -> List[Block]:
    blocks = []
    for f in doc_files(repo):
        rel = f.relative_to(repo).as_posix()
        blocks += [b for b in extract_blocks(f.read_text(encoding="utf-8"), rel)
                   if b.lang in PYTHON_LANGS + SHELL_LANGS]
    return blocks


def _top_level_entries(repo: Path) -> List[str]:
    """The repository's tracked top-level files and folders (not run outputs such as ``result/``, which a block
    would otherwise write into through the link); every entry but ``.git`` outside a git checkout."""
    if shutil.which("git") and (repo / ".git").exists():
        proc = subprocess.run(["git", "ls-files", "-z"], cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        if proc.returncode == 0:
            names = {f.split("/", 1)[0] for f in proc.stdout.decode().split("\0") if f}
            return sorted(n for n in names if (repo / n).exists())
    return sorted(e.name for e in repo.iterdir() if e.name != ".git")


def make_workdir(tmp: Path, repo: Path = REPO) -> Path:
    """A folder that looks like the repository root (links to its top-level entries), with ``../shared`` linked
    when the clone has one beside it."""
    work = tmp / "repo"
    work.mkdir()
    for name in _top_level_entries(repo):
        (work / name).symlink_to(repo / name)
    shared = repo.parent / "shared"
    if shared.is_dir():
        (tmp / "shared").symlink_to(shared)
    return work


def block_env(repo: Path = REPO) -> dict:
    env = dict(os.environ)
    env["ISCSE_REPO"] = str(repo)
    env["PYTHONPATH"] = os.pathsep.join([str(repo)] + [p for p in [env.get("PYTHONPATH")] if p])
    # No .pyc written into the clone (and so none to tell apart from a block's own writes there).
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("MPLBACKEND", "Agg")
    # As tests/conftest.py does: without a GPU, Triton's interpreter runs the kernels on CPU tensors.
    try:
        import torch
        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        env.setdefault("TRITON_INTERPRET", "1")
    return env


def run_block(block: Block, tmp: Path, repo: Path = REPO, timeout: float = TIMEOUT) -> Tuple[int, str]:
    """Run ``block`` in a fresh process in a work folder under ``tmp``; returns (exit status, stdout + stderr).
    A block past ``timeout`` seconds gives status -1."""
    work = make_workdir(tmp, repo)
    if block.lang in PYTHON_LANGS:
        script = tmp / "block.py"
        cmd = [sys.executable, str(script)]
    else:
        script = tmp / "block.sh"
        cmd = ["bash", "-euo", "pipefail", str(script)]
    script.write_text(block.code, encoding="utf-8")
    try:
        proc = subprocess.run(cmd, cwd=work, env=block_env(repo), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.output.decode(errors="replace") if exc.output else ""
        return -1, out + f"\n[timed out after {timeout:g} s]"
    return proc.returncode, proc.stdout.decode(errors="replace")


def git_state(repo: Path = REPO) -> Optional[str]:
    """The clone's ``git status`` with ignored files, or None when it is not a git checkout."""
    if shutil.which("git") is None or not (repo / ".git").exists():
        return None
    proc = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=repo,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return proc.stdout if proc.returncode == 0 else None


BLOCKS = runnable_blocks()


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block_runs(block, tmp_path):
    try:
        reasons = check_block(block)
    except ValueError as exc:
        pytest.fail(str(exc), pytrace=False)
    if reasons:
        pytest.skip(f"needs: {', '.join(reasons)}")
    before = git_state()
    status, output = run_block(block, tmp_path)
    if status != 0:
        pytest.fail(f"{block.id} ({block.lang}) exited with status {status}; its output (last 6000 characters):\n"
                    f"{output[-6000:]}", pytrace=False)
    after = git_state()
    if before is not None and after != before:
        new = sorted(set(after.splitlines()) - set(before.splitlines()))
        pytest.fail(f"{block.id} wrote into the clone: {new}", pytrace=False)


# ------------------------------------------------------------------------------------------------ the site and README

def _nav_files(nav) -> List[str]:
    out = []
    for item in nav:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            for value in item.values():
                out += _nav_files(value) if isinstance(value, list) else [value]
    return [p for p in out if not re.match(r"^[a-z]+://", p)]


def _load_mkdocs_yml() -> dict:
    yaml = pytest.importorskip("yaml")

    class Loader(yaml.SafeLoader):
        pass

    # MkDocs configs may carry tags such as !!python/name:... or !ENV; their values do not matter here.
    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    return yaml.load((REPO / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)


def test_nav_lists_every_page_and_only_pages_that_exist():
    config = _load_mkdocs_yml()
    docs = REPO / config.get("docs_dir", "docs")
    nav = _nav_files(config["nav"])
    missing = [p for p in nav if not (docs / p).is_file()]
    assert not missing, f"mkdocs.yml's nav lists pages that do not exist: {missing}"
    duplicated = sorted({p for p in nav if nav.count(p) > 1})
    assert not duplicated, f"mkdocs.yml's nav lists pages twice: {duplicated}"
    pages = sorted(p.relative_to(docs).as_posix() for p in docs.rglob("*.md"))
    unlisted = [p for p in pages if p not in nav]
    assert not unlisted, f"pages under {docs.name}/ that mkdocs.yml's nav does not list: {unlisted}"


def test_readme_is_short():
    n = len((REPO / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; at most {README_MAX_LINES} (the rest goes in docs/)"


# ----------------------------------------------------------------------------------------------- the runner itself

_SAMPLE = """# A page

```python
print("ok")
```

- a list item:

    ```bash
    echo indented
    ```

````markdown
```python
# needs: GPU
raise SystemExit(1)
```
````

~~~sh
# needs: hub, full data
exit 1
~~~

```text
not run
```
"""


def test_extract_blocks_finds_languages_lines_and_nesting():
    blocks = extract_blocks(_SAMPLE, "sample.md")
    assert [(b.lang, b.line) for b in blocks] == [("python", 3), ("bash", 9), ("markdown", 13), ("sh", 20),
                                                  ("text", 25)]
    assert blocks[1].code == "echo indented\n"
    # the fenced block inside the ````markdown block is its text, not a block of its own
    assert "```python" in blocks[2].code and "raise SystemExit(1)" in blocks[2].code
    assert needs_of(blocks[0]) is None
    assert needs_of(blocks[3]) == ["hub", "full data"]


@pytest.mark.parametrize("first_line", ["# needs: gpu", "# needs: GPUs", "# needs: data", "# needs:",
                                        "# needs: GPU, internet"])
def test_unknown_needs_reason_fails(first_line):
    block = Block("x.md", 1, "python", f"{first_line}\nprint(1)\n")
    with pytest.raises(ValueError, match="needs"):
        needs_of(block)


@pytest.mark.parametrize("code", ["pip install -e '.[dev]'\n", "python -m pip install torch\n",
                                  "apt-get install -y chromium\n"])
def test_unmarked_install_fails_and_marked_install_skips(code):
    with pytest.raises(ValueError, match="installs packages"):
        check_block(Block("x.md", 1, "bash", code))
    assert check_block(Block("x.md", 1, "bash", "# needs: CI\n" + code)) == ["CI"]


def test_needs_marker_below_the_first_line_fails():
    block = Block("x.md", 1, "bash", "echo hi\n# needs: GPU\n")
    with pytest.raises(ValueError, match="first line"):
        needs_of(block)


@pytest.mark.parametrize("lang, code, ok", [
    ("python", "import sys\nprint('fine')\n", True),
    ("python", "raise RuntimeError('boom in a docs block')\n", False),
    ("bash", "echo fine\n", True),
    ("bash", "false\necho not reached\n", False),
    ("bash", "false | true\n", False),  # pipefail
    ("bash", "echo $UNSET_VARIABLE_IN_DOCS_TEST\n", False),  # nounset
])
def test_run_block_reports_failures(lang, code, ok, tmp_path):
    status, output = run_block(Block("x.md", 1, lang, code), tmp_path)
    assert (status == 0) == ok, output
    if lang == "python" and not ok:
        assert "boom in a docs block" in output  # the error output is shown


def test_run_block_runs_in_a_view_of_the_repo_not_in_it(tmp_path):
    code = ("test -f setup.py && test -d docs && test \"$ISCSE_REPO\" = \"$(cd \"$ISCSE_REPO\" && pwd)\"\n"
            "mkdir -p result && echo x > result/out.txt\n"
            "python -c 'import iscse; print(iscse.__version__)'\n")
    status, output = run_block(Block("x.md", 1, "bash", code), tmp_path)
    assert status == 0, output
    assert (tmp_path / "repo" / "result" / "out.txt").is_file()
    assert not (REPO / "result" / "out.txt").exists()


def test_run_block_times_out(tmp_path):
    status, output = run_block(Block("x.md", 1, "python", "import time\ntime.sleep(30)\n"), tmp_path, timeout=1)
    assert status == -1 and "timed out" in output
