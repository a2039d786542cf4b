"""tools/train_net.py that waits at a known iteration for a test to send it a signal.

  python tests/signalled_train_net.py PAUSE_AFTER DIRECTORY [train_net arguments ...]

After step PAUSE_AFTER, every training process writes DIRECTORY/paused.<rank> (holding its
process id) and waits until it has received a signal itself or DIRECTORY/go exists; then it
goes on with the next step, after which the preemption hook acts. So the test knows the
iteration a signal lands at, and signals a running training from outside. launch() re-imports
this file in each process, so the hook is installed everywhere.
"""
import os
import sys
import time

from detectron2.engine import HookBase
from detectron2.utils import comm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import train_net  # noqa: E402

from mabn_d2.engine.preemption import PreemptionCheckpointer  # noqa: E402
from mabn_d2.engine.trainer import MABNTrainer  # noqa: E402

PAUSE_AFTER_ENV = "MABN_TEST_PAUSE_AFTER"
PAUSE_DIR_ENV = "MABN_TEST_PAUSE_DIR"
WAIT_LIMIT_S = 600


class PauseForSignal(HookBase):
    def __init__(self, iteration: int, directory: str):
        self.iteration, self.directory = iteration, directory

    def after_step(self):
        if self.trainer.iter != self.iteration:
            return
        preemption = next(h for h in self.trainer._hooks if isinstance(h, PreemptionCheckpointer))
        marker = os.path.join(self.directory, f"paused.{comm.get_rank()}")
        with open(marker + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(marker + ".tmp", marker)
        deadline = time.monotonic() + WAIT_LIMIT_S
        while not preemption.received and not os.path.exists(os.path.join(self.directory, "go")):
            if time.monotonic() > deadline:
                raise TimeoutError("no signal came")
            time.sleep(0.02)


_build_hooks = MABNTrainer.build_hooks


def _build_hooks_with_pause(self):
    return _build_hooks(self) + [PauseForSignal(int(os.environ[PAUSE_AFTER_ENV]), os.environ[PAUSE_DIR_ENV])]


MABNTrainer.build_hooks = _build_hooks_with_pause

if __name__ == "__main__":
    os.environ[PAUSE_AFTER_ENV], os.environ[PAUSE_DIR_ENV] = sys.argv[1], sys.argv[2]  # inherited by the processes
    sys.exit(train_net.invoke_main(sys.argv[3:]))
