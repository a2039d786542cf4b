"""A checkpoint when training is told to stop: SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C).

The signal handler only records the signal: a handler runs between two bytecodes of whatever
the process is doing, mid-step or mid-save, where no state is whole. The hook acts after the
step: every process stops at the same iteration, saves through the run's checkpointer (collective
and atomic: MABNCheckpointer), logs one line and leaves training with `Preempted`, a SystemExit
of status 128 + signal (143 for SIGTERM, 130 for SIGINT). As a SystemExit it passes the trainer's
`except Exception` (no crash report) but not its `finally`: after_train still runs, so
detectron2's writers flush metrics.json and the event file. `--resume` continues from the next
iteration, as it does from a periodic checkpoint.

Agreement costs, with several processes, one all_reduce of one integer per step over gloo on the
host (tens of microseconds on one machine): no device synchronization, and the step's gradient
all_reduce already keeps the processes in step. One process alone pays nothing.

Once a process has stopped, its handlers stay until it exits: a second signal (the launcher
passes the signal on, a scheduler signals every process) cannot cut the metric flush short.
SIGKILL still ends a process at once; the previous checkpoint then stays the last one.
DataLoader workers fork after the handlers are installed and inherit them, so a signal sent to
the whole process group does not kill them under the step that is still running.
"""
import logging
import os
import signal
import threading
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["PREEMPTION_SIGNALS", "Preempted", "PreemptionCheckpointer"]

logger = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(SystemExit):
    """Training stopped on a signal after its checkpoint was saved; the status is 128 + signal."""


class PreemptionCheckpointer(HookBase):
    """On SIGTERM / SIGINT: a checkpoint at the current iteration in every process, then `Preempted`.

    Register it on every process, after the periodic checkpointer (so the learning-rate scheduler
    has stepped, as in a periodic checkpoint) and before evaluation (so a stop does not wait for it).
    """

    def __init__(self, checkpointer, file_prefix: str = "model", signals: Sequence[int] = PREEMPTION_SIGNALS):
        self.checkpointer = checkpointer
        self.file_prefix = file_prefix
        self.signals = tuple(signals)
        self.received = 0  # the first signal this process got (0: none); written by the handler only
        self.stopped_at: Optional[int] = None
        self._previous: Dict[int, object] = {}
        self._group = None

    def _record(self, signum: int, frame) -> None:
        if not self.received:
            self.received = signum

    def before_train(self) -> None:
        if threading.current_thread() is threading.main_thread():  # where Python runs signal handlers
            self._previous = {signum: signal.signal(signum, self._record) for signum in self.signals}
        else:
            logger.warning("Training runs outside the main thread: no checkpoint on SIGTERM / SIGINT")
        if comm.get_world_size() > 1:  # collective: every process runs before_train
            self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def after_step(self) -> None:
        signum = self._agreed_signal()
        if signum:
            self._stop(signum)

    def after_train(self) -> None:
        if self.stopped_at is None:  # trained to the end, or failed: the signals mean what they did before
            self._restore_handlers()

    def _agreed_signal(self) -> int:
        """The signal every process stops on (the largest number any of them got), or 0."""
        if self._group is None:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item())

    def _stop(self, signum: int) -> None:
        iteration = self.trainer.iter
        name = f"{self.file_prefix}_{iteration:07d}"
        self.checkpointer.save(name, iteration=iteration)  # collective: every process is here
        if self._group is not None:  # process 0 writes after the others handed over their state
            dist.barrier(group=self._group)
        self.stopped_at = iteration
        status = 128 + signum
        logger.warning("%s: saved %s at iteration %d; stopping with status %d (--resume continues from iteration %d)",
                       signal.Signals(signum).name, os.path.join(self.checkpointer.save_dir, f"{name}.pth"),
                       iteration, status, iteration + 1)
        raise Preempted(status)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
