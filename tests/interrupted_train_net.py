"""tools/train_net.py, ended at a known point: every process stops right after iteration N.

  python tests/interrupted_train_net.py STOP_AFTER_N [train_net arguments ...]

The processes first wait for each other, so every checkpoint due at iteration N is complete,
then exit at once with status 17 without any cleanup, as a crash would. Used by the tests to
interrupt a multi-process run deterministically (launch() re-imports this file in each
process, so the hook is installed everywhere).
"""
import os
import sys

from detectron2.engine import HookBase
from detectron2.utils import comm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import train_net  # noqa: E402

from mabn_d2.engine.trainer import MABNTrainer  # noqa: E402

STOPPED = 17
STOP_AFTER_ENV = "MABN_TEST_STOP_AFTER"


class StopAfter(HookBase):
    def __init__(self, iterations: int):
        self.iterations = iterations

    def after_step(self):
        if self.trainer.iter + 1 == self.iterations:
            comm.synchronize()
            sys.stdout.flush()
            os._exit(STOPPED)


_build_hooks = MABNTrainer.build_hooks


def _build_hooks_with_stop(self):
    return _build_hooks(self) + [StopAfter(int(os.environ[STOP_AFTER_ENV]))]


MABNTrainer.build_hooks = _build_hooks_with_stop

if __name__ == "__main__":
    os.environ[STOP_AFTER_ENV] = sys.argv[1]  # inherited by the processes launch() starts
    sys.exit(train_net.invoke_main(sys.argv[2:]))
