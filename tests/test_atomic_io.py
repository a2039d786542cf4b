"""Atomic writes: the old content or the new one, never a half-written file or a stray temporary.

Crashes are simulated deterministically: a writer that fails halfway, and processes that send
SIGTERM or SIGINT to themselves halfway through a write.
"""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from mabn_d2.utils.atomic_io import atomic_write, atomic_write_text, replace_directory, staged_directory

from .conftest import REPO_ROOT


def _half_then_fail(f):
    f.write(b"half of the new")
    raise RuntimeError("disk full")


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "model.pth"
    atomic_write_text(str(target), "old")
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(str(target), _half_then_fail)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["model.pth"]


def test_durable_write_replaces_the_file(tmp_path):
    target = tmp_path / "model.pth"
    atomic_write(str(target), lambda f: f.write(b"new"), durable=True)
    assert target.read_bytes() == b"new" and oct(target.stat().st_mode & 0o777) != "0o600"


# atomic_io imports nothing of the project: load the file alone, so each process starts in a blink.
IMPORT_ATOMIC_IO = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("atomic_io", {os.path.join(REPO_ROOT, "mabn_d2", "utils", "atomic_io.py")!r})
atomic_io = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic_io)
"""


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    code = IMPORT_ATOMIC_IO + textwrap.dedent(script)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)


SIGNAL_DURING_WRITE = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job may inherit SIGINT ignored
atomic_write = atomic_io.atomic_write
target, signame = sys.argv[1], sys.argv[2]
def write(f):
    f.write(b"half")
    os.kill(os.getpid(), getattr(signal, signame))
    f.write(b" and the rest")
atomic_write(target, write)
print("not reached")
"""


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_signal_during_write_removes_the_temporary_file(tmp_path, signame):
    target = tmp_path / "model.pth"
    target.write_bytes(b"old")
    result = _run(SIGNAL_DURING_WRITE, str(target), signame)
    if signame == "SIGTERM":
        assert result.returncode == -signal.SIGTERM, result.stderr  # still ends the way SIGTERM does
    else:
        assert result.returncode != 0 and "KeyboardInterrupt" in result.stderr
    assert "not reached" not in result.stdout
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.pth"]


SIGNAL_WHILE_STAGING = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job may inherit SIGINT ignored
staged_directory = atomic_io.staged_directory
target, signame = sys.argv[1], sys.argv[2]
with staged_directory(target, "staging") as stage:
    with open(os.path.join(stage, "big.bin"), "wb") as f:
        f.write(b"x" * 1000)
    os.kill(os.getpid(), getattr(signal, signame))
    os.replace(stage, target)
print("not reached")
"""


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_signal_while_staging_removes_the_staging_folder(tmp_path, signame):
    target = tmp_path / "folded"
    result = _run(SIGNAL_WHILE_STAGING, str(target), signame)
    assert result.returncode != 0 and "not reached" not in result.stdout
    assert os.listdir(tmp_path) == [], "a staging folder or a partial output was left behind"


def test_staged_directory_is_removed_after_an_error_and_published_on_success(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(ValueError):
        with staged_directory(str(target)) as stage:
            open(os.path.join(stage, "a"), "w").close()
            raise ValueError("verification failed")
    assert os.listdir(tmp_path) == []
    with staged_directory(str(target)) as stage:
        open(os.path.join(stage, "a"), "w").close()
        replace_directory(stage, str(target))
    assert os.listdir(tmp_path) == ["out"] and os.listdir(target) == ["a"]


def test_replace_directory_swaps_the_whole_folder(tmp_path):
    target, new = tmp_path / "out", tmp_path / "new"
    target.mkdir()
    (target / "old_only.txt").write_text("old")
    new.mkdir()
    (new / "fresh.txt").write_text("new")
    replace_directory(str(new), str(target))
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(target) == ["fresh.txt"]


def test_replace_directory_puts_the_old_folder_back_when_the_move_fails(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(FileNotFoundError):
        replace_directory(str(tmp_path / "vanished"), str(target))
    assert sorted(os.listdir(tmp_path)) == ["out"] and (target / "keep.txt").read_text() == "old"
