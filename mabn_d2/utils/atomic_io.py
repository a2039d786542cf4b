"""Atomic file and folder writes: a reader sees the old content or the complete new one.

Temporary files and staging folders live beside their target (so the final `os.replace` is
one rename on one filesystem) and are removed when the write fails, including when the
process is asked to stop with SIGTERM or SIGINT while writing. Only SIGKILL (or a power cut)
can leave one behind; its name starts with a dot and says what it was for.
"""
import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from typing import Callable, Iterator, Optional

__all__ = [
    "TerminatedBySignal",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "cleanup_on_termination",
    "replace_directory",
    "staged_directory",
]


def _umask() -> int:
    """The process umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


class TerminatedBySignal(BaseException):
    """Raised inside `cleanup_on_termination` when SIGTERM/SIGINT arrives, so cleanup code runs.

    A BaseException like KeyboardInterrupt: ordinary `except Exception` handlers let it pass.
    """

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


_GUARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_guard_depth = 0
_pending_signal: Optional[int] = None


def _raise_terminated(signum: int, frame) -> None:
    global _pending_signal
    if _pending_signal is None:  # later signals wait for the cleanup the first one started
        _pending_signal = signum
        raise TerminatedBySignal(signum)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGTERM/SIGINT back during a few steps that must not be split (they arrive after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _GUARDED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def cleanup_on_termination() -> Iterator[None]:
    """Turn SIGTERM/SIGINT into `TerminatedBySignal` inside the block, then end the process with it.

    The default action of SIGTERM kills the process without running `finally` blocks; inside
    this block it raises instead, cleanup code runs, and on leaving the outermost block the
    signal is delivered again with its default action, so the process still ends as asked
    (exit status 128 + signal number). Signals with a handler of their own (Python's
    KeyboardInterrupt for SIGINT, or anyone else's) and ignored signals are left alone; outside
    the main thread nothing changes. Blocks nest.
    """
    global _guard_depth, _pending_signal
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    installed = []
    with _signals_deferred():
        outermost = _guard_depth == 0
        _guard_depth += 1
        if outermost:
            _pending_signal = None
            for signum in _GUARDED_SIGNALS:
                if signal.getsignal(signum) is signal.SIG_DFL:
                    signal.signal(signum, _raise_terminated)
                    installed.append(signum)
    try:
        yield
    finally:
        with _signals_deferred():
            _guard_depth -= 1
            pending = None
            if outermost:
                for signum in installed:
                    signal.signal(signum, signal.SIG_DFL)
                pending, _pending_signal = _pending_signal, None
        if pending is not None:
            os.kill(os.getpid(), pending)  # default action now: the process ends here


def atomic_write(path: str, write: Callable[[object], None], mode: str = "wb", durable: bool = False) -> None:
    """Call `write(file)` on a temporary file beside `path`, then move it into place.

    `durable`: also fsync the file and its folder, so the new content survives a power cut
    (used for checkpoints; a killed process needs no fsync to leave a complete file).
    """
    directory = os.path.dirname(os.path.abspath(path))
    with cleanup_on_termination():
        tmp = None
        try:
            with _signals_deferred():
                fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
            with os.fdopen(fd, mode) as f:
                write(f)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result is an ordinary file
            os.replace(tmp, path)
        except BaseException:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
            raise
        if durable:
            _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str, data: object) -> None:
    atomic_write(path, lambda f: json.dump(data, f, indent=1, default=str), mode="w")


@contextlib.contextmanager
def staged_directory(target: str, label: str = "staging") -> Iterator[str]:
    """A new hidden folder `.<name>.<label>-XXXX` beside `target`, removed when the block ends.

    The block fills it and publishes it (`os.replace` or `replace_directory`); whatever is
    still there at the end, after an error, SIGTERM or SIGINT, is removed.
    """
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    with cleanup_on_termination():
        stage = None
        try:
            with _signals_deferred():
                stage = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.{label}-", dir=parent)
            os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
            yield stage
        finally:
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)


def replace_directory(source: str, target: str) -> None:
    """Move folder `source` to `target`, replacing whatever folder `target` was.

    An absent or empty `target` is replaced in one rename. A non-empty one is first renamed
    aside (hidden, beside it), then removed once `source` is in place; if the second rename
    fails, the old folder is put back. Signals wait until both renames are done.
    """
    target = os.path.abspath(target)
    if not os.path.isdir(target) or not os.listdir(target):
        os.replace(source, target)
        return
    with cleanup_on_termination():
        aside = None
        try:
            with _signals_deferred():
                aside = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.replaced-", dir=os.path.dirname(target))
                os.replace(target, aside)  # `aside` is empty: the rename replaces it
                try:
                    os.replace(source, target)
                except BaseException:
                    os.replace(aside, target)
                    raise
        finally:
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
