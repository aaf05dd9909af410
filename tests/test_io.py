"""iscse._io: the one home of atomic writes, the umask rule, JSON files and the one-line form of an error."""
import json
import os

import pytest

from iscse._io import apply_umask, current_umask, first_line, replace_dir, write_json, write_json_atomic


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def test_current_umask_reads_without_changing_it(umask_027):
    assert current_umask() == 0o027
    assert current_umask() == 0o027


def test_write_json_atomic_follows_umask_and_replaces(tmp_path, umask_027):
    path = tmp_path / "sub" / "out.json"  # the parent folder is created
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"b": [1, 2]})
    assert path.read_text(encoding="utf-8") == json.dumps({"b": [1, 2]}, indent=2) + "\n"
    assert path.stat().st_mode & 0o777 == 0o640  # 0o666 & ~0o027, not mkstemp's 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]  # no temporary file left


def test_write_json_atomic_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.json"
    write_json_atomic(path, {"kept": True})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text(encoding="utf-8")) == {"kept": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    write_json_atomic(path, {"x": object()}, default=lambda o: "obj")
    assert json.loads(path.read_text(encoding="utf-8")) == {"x": "obj"}


def test_write_json_plain(tmp_path):
    write_json(tmp_path / "a.json", [1, {"k": "v"}], fsync=True)
    assert (tmp_path / "a.json").read_text(encoding="utf-8") == json.dumps([1, {"k": "v"}], indent=2) + "\n"


def test_apply_umask_fixes_private_files_and_folders(tmp_path, umask_027):
    (tmp_path / "d").mkdir(mode=0o700)
    (tmp_path / "d" / "f").write_text("x")
    os.chmod(tmp_path / "d" / "f", 0o600)
    apply_umask(tmp_path / "d")
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "d" / "f").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("exists", [False, True])
def test_replace_dir(tmp_path, exists):
    new, target = tmp_path / "new", tmp_path / "target"
    new.mkdir()
    (new / "f").write_text("new")
    if exists:
        target.mkdir()
        (target / "old").write_text("old")
    replace_dir(new, target)
    assert not new.exists()
    assert sorted(p.name for p in target.iterdir()) == ["f"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]  # the previous folder is gone


@pytest.mark.parametrize("exc, expected", [
    (ValueError("one line"), "one line"),
    (OSError("\n  first   line \nsecond line"), "first line"),
    (KeyError(), "KeyError"),
    (RuntimeError("   \n "), "RuntimeError"),
])
def test_first_line(exc, expected):
    assert first_line(exc) == expected
