"""A training process that dies is named by the process that launched the run: one line with its
rank, pid and how it ended, on stderr and at the end of log.txt (mabn_d2.engine.rank_failure)."""
import os
import signal

import pytest
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from mabn_d2.engine.rank_failure import describe_rank_failure, rank_failure, report_rank_failure

from .test_engine import MABN_QUICK, TINY
from .test_preemption import PAUSE_AFTER, _Training

TRACEBACK = ("\n\n-- Process 1 terminated with the following error:\nTraceback (most recent call last):\n"
             '  File "train.py", line 1, in <module>\nRuntimeError: Connection closed by peer\n')


def _killed(index=1, pid=1234, signum=signal.SIGKILL):
    name = signal.Signals(signum).name
    return ProcessExitedException(f"process {index} terminated with signal {name}", error_index=index,
                                  error_pid=pid, exit_code=-int(signum), signal_name=name)


def _run_folder(tmp_path, checkpoint="model_0000041.pth"):
    (tmp_path / "log.txt").write_text("[12/07 10:00:00] d2.engine INFO: earlier lines\n")
    if checkpoint:
        (tmp_path / "last_checkpoint").write_text(checkpoint)
    return tmp_path


def test_a_killed_rank_is_named_with_its_pid_signal_and_the_checkpoint_to_resume_from(tmp_path):
    run = _run_folder(tmp_path)
    assert describe_rank_failure(_killed(), str(run)) == (
        f"rank 1 (pid 1234) was killed by SIGKILL; the other ranks were stopped; resume with --resume from "
        f"{run / 'model_0000041.pth'}")
    failure = rank_failure(_killed(index=0, pid=77, signum=signal.SIGSEGV), first_rank=4)  # second machine of 4
    assert (failure.rank, failure.pid, failure.how, failure.status) == (4, 77, "was killed by SIGSEGV", 139)


def test_an_exit_status_and_an_exception_are_named(tmp_path):
    exited = ProcessExitedException("process 0 terminated with exit code 17", error_index=0, error_pid=99,
                                    exit_code=17)
    assert describe_rank_failure(exited, str(tmp_path)) == (
        "rank 0 (pid 99) exited with status 17; the other ranks were stopped; no checkpoint was saved yet: "
        "train again without --resume")
    failure = rank_failure(ProcessRaisedException(TRACEBACK, 1, 321))
    assert failure == (1, 321, "raised RuntimeError: Connection closed by peer", 1)


def test_report_goes_to_stderr_and_the_end_of_log_txt(tmp_path, capsys):
    run = _run_folder(tmp_path)
    assert report_rank_failure(_killed(), str(run)) == 128 + signal.SIGKILL
    err = capsys.readouterr().err
    line = f"rank 1 (pid 1234) was killed by SIGKILL; the other ranks were stopped; resume with --resume from " \
           f"{run / 'model_0000041.pth'}"
    assert err == f"train_net: error: {line}\n"
    last = (run / "log.txt").read_text().splitlines()[-1]
    assert last.startswith("[") and last.endswith(f"] mabn_d2.engine.rank_failure ERROR: {line}")

    assert report_rank_failure(ProcessRaisedException(TRACEBACK, 1, 321), str(run)) == 1
    err = capsys.readouterr().err.splitlines()
    assert "Traceback (most recent call last):" in err and err[-1].startswith("train_net: error: rank 1 (pid 321) "
                                                                               "raised RuntimeError: Connection")


def test_a_status_the_process_explained_itself_adds_nothing(tmp_path, capsys):
    run = _run_folder(tmp_path)
    preempted = ProcessExitedException("process 1 terminated with exit code 143", error_index=1, error_pid=5,
                                       exit_code=143)
    assert report_rank_failure(preempted, str(run), explained=(2, 143, 130)) == 143
    assert report_rank_failure(_killed(signum=signal.SIGTERM), str(run), explained=(2, 143, 130)) == 143
    err = capsys.readouterr().err  # killed by SIGTERM before saving is not a checkpoint taken on SIGTERM
    assert err.count("\n") == 1 and "rank 1 (pid 1234) was killed by SIGTERM" in err
    assert (run / "log.txt").read_text().count("rank_failure ERROR") == 1


@pytest.mark.slow
def test_sigkill_of_one_of_two_processes_names_that_rank(demo_datasets_dir, tmp_path):
    out = tmp_path / "run"
    opts = [*TINY, *MABN_QUICK, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "1", "DATASETS.TEST", "()"]
    training = _Training(tmp_path, out, 2, demo_datasets_dir, opts=opts)
    pids = training.paused_pids()  # both wait after step PAUSE_AFTER; checkpoints up to it are saved
    os.kill(pids[1], signal.SIGKILL)
    assert training.wait() == 128 + signal.SIGKILL, training.tail()
    line = (f"rank 1 (pid {pids[1]}) was killed by SIGKILL; the other ranks were stopped; resume with --resume "
            f"from {out / f'model_{PAUSE_AFTER:07d}.pth'}")
    assert f"train_net: error: {line}" in training.tail().splitlines()
    assert (out / "log.txt").read_text().splitlines()[-1].endswith(f"rank_failure ERROR: {line}")
