"""One line naming the training process that ended a multi-process run, for the process that launched it.

When one process of `launch(..., num_gpus_per_machine=N)` dies, torch.multiprocessing stops the
others ("Terminating process N via signal SIGTERM") and raises in the launching process an
exception that knows which process failed, its pid and how: ProcessExitedException (an exit
status, or the signal that killed it) or ProcessRaisedException (a Python exception, with the
traceback). Left alone, that ends the command with torch's warnings or a long traceback, and the
log of the run with the last line the surviving processes wrote. `report_rank_failure` turns it
into one line, on stderr and at the end of the run's log.txt:

  rank 1 (pid 1234) was killed by SIGKILL; the other ranks were stopped; resume with --resume from <checkpoint>

A process that said why it stopped itself (a usage error, a checkpoint taken on SIGTERM / SIGINT)
ends with a status the caller names as explained; then nothing is added.
"""
import logging
import os
import signal
import sys
from typing import Collection, NamedTuple, Optional

from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

__all__ = ["RankFailure", "describe_rank_failure", "failure_line", "rank_failure", "report_rank_failure"]

logger = logging.getLogger(__name__)

LOG_FILE = "log.txt"  # detectron2's setup_logger: the log of rank 0 in OUTPUT_DIR
LAST_CHECKPOINT = "last_checkpoint"
# detectron2's plain log format (detectron2.utils.logger.setup_logger), so the line reads like the rest of log.txt.
_LOG_FORMAT = logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s", datefmt="%m/%d %H:%M:%S")


class RankFailure(NamedTuple):
    """The training process that failed first, as the launching process learns it."""

    rank: int  # global rank: machine_rank x processes per machine + local index
    pid: int
    how: str  # "was killed by SIGKILL", "exited with status 17", "raised RuntimeError: ..."
    status: int  # the launching command's exit status: 128 + signal, the process's own status, or 1


def rank_failure(error: BaseException, first_rank: int = 0) -> RankFailure:
    """What a ProcessExitedException / ProcessRaisedException says about the failed process.

    `first_rank` is the global rank of this machine's first process (torch counts per machine).
    """
    rank = first_rank + int(getattr(error, "error_index", 0))
    pid = int(getattr(error, "error_pid", 0) or getattr(error, "pid", 0) or 0)
    if isinstance(error, ProcessRaisedException):
        return RankFailure(rank, pid, f"raised {_last_traceback_line(str(error))}", 1)
    code = int(getattr(error, "exit_code", 1))
    if code < 0:
        return RankFailure(rank, pid, f"was killed by {getattr(error, 'signal_name', None) or _signal_name(-code)}",
                           128 - code)
    return RankFailure(rank, pid, f"exited with status {code}", code)


def failure_line(failure: RankFailure, checkpoint: Optional[str]) -> str:
    """The one line: which rank, how it ended, and where --resume would continue from."""
    resume = (f"resume with --resume from {checkpoint}" if checkpoint
              else "no checkpoint was saved yet: train again without --resume")
    return f"rank {failure.rank} (pid {failure.pid}) {failure.how}; the other ranks were stopped; {resume}"


def describe_rank_failure(error: BaseException, output_dir: Optional[str] = None, first_rank: int = 0) -> str:
    """`failure_line` for a torch.multiprocessing exception and the run in `output_dir`."""
    return failure_line(rank_failure(error, first_rank), last_checkpoint(output_dir))


def report_rank_failure(error: BaseException, output_dir: Optional[str], first_rank: int = 0,
                        explained: Collection[int] = (), program: str = "train_net") -> int:
    """Report the failed process on stderr and in OUTPUT_DIR/log.txt; returns the command's exit status.

    A ProcessRaisedException's traceback (the failed process's own) is printed first, as the
    details under the line. Statuses in `explained` are those a process ends with after printing
    or logging why itself (killed by a signal is never explained): they get no line.
    """
    failure = rank_failure(error, first_rank)
    if isinstance(error, ProcessExitedException) and error.exit_code in explained:  # not a signal: an exit status
        return failure.status
    if isinstance(error, ProcessRaisedException):
        print(str(error).strip("\n"), file=sys.stderr)
    line = failure_line(failure, last_checkpoint(output_dir))
    print(f"{program}: error: {line}", file=sys.stderr, flush=True)
    _append_to_log(output_dir, line)
    return failure.status


def last_checkpoint(output_dir: Optional[str]) -> Optional[str]:
    """The checkpoint `--resume` continues from (what OUTPUT_DIR/last_checkpoint names), or None."""
    if not output_dir:
        return None
    try:
        with open(os.path.join(output_dir, LAST_CHECKPOINT)) as f:
            name = f.read().strip()
    except OSError:
        return None
    return os.path.join(output_dir, name) if name else None


def _append_to_log(output_dir: Optional[str], line: str) -> None:
    """The line at the end of the run's log.txt, where the run has one (every process has stopped:
    nothing else writes it now). A process that logs into that file itself logs it there instead."""
    path = os.path.join(output_dir, LOG_FILE) if output_dir else None
    if not path or not os.path.isfile(path):
        return
    if _logged_into(path):
        logger.error(line)
        return
    record = logging.LogRecord(logger.name, logging.ERROR, __file__, 0, line, None, None)
    try:
        with open(path, "a") as f:
            f.write(_LOG_FORMAT.format(record) + "\n")
    except OSError:  # the line is on stderr already; a log that cannot be written does not hide it
        pass


def _logged_into(path: str) -> bool:
    """Whether a handler of this module's logger (or a parent's) already writes the file `path`."""
    target = os.path.realpath(path)
    current: Optional[logging.Logger] = logger
    while current is not None:
        for handler in current.handlers:
            name = getattr(handler, "baseFilename", None) or getattr(getattr(handler, "stream", None), "name", None)
            if isinstance(name, str) and os.path.realpath(name) == target:
                return True
        current = current.parent if current.propagate else None
    return False


def _last_traceback_line(traceback_text: str) -> str:
    """`Type: message` of a formatted traceback: its last non-empty line."""
    lines = [line.strip() for line in traceback_text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "an exception"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
