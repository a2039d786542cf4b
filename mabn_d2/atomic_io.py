"""Atomic file writes: a reader sees the old file or the complete new one, never a half-written one."""
import contextlib
import json
import os
import tempfile
from typing import Callable

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json"]


def _umask() -> int:
    """The process umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[object], None], mode: str = "wb") -> None:
    """Call `write(file)` on a temporary file beside `path`, then move it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str, data: object) -> None:
    atomic_write(path, lambda f: json.dump(data, f, indent=1, default=str), mode="w")
