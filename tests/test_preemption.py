"""SIGTERM / SIGINT sent to a running training (tools/train_net.py): a checkpoint at the current
iteration in every process, one log line, flushed metrics, status 143 / 130; --resume continues
exactly from that checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import REPO_ROOT
from .test_engine import DEMO_CONFIG, MABN_QUICK, TINY, _assert_same_tensors, _load, _train_net

MAX_ITER = 4
OPTS = [*TINY, *MABN_QUICK, "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.CHECKPOINT_PERIOD", "100", "DATASETS.TEST", "()"]
PAUSE_AFTER = 1  # the signal comes while the processes wait after step 1: they stop after step 2
STOPPED_AT = PAUSE_AFTER + 1


class _Training:
    """tests/signalled_train_net.py in the background, paused after step PAUSE_AFTER."""

    def __init__(self, tmp_path, output_dir, processes, demo_datasets_dir, opts=OPTS):
        self.pause_dir, self.processes = tmp_path / "pause", processes
        self.pause_dir.mkdir()
        self.output = tmp_path / "output.txt"
        env = dict(os.environ, DETECTRON2_DATASETS=demo_datasets_dir, OMP_NUM_THREADS="1")
        command = [sys.executable, "tests/signalled_train_net.py", str(PAUSE_AFTER), str(self.pause_dir),
                   "--num-gpus", str(processes), "--config-file", DEMO_CONFIG, *opts, "OUTPUT_DIR", str(output_dir)]
        with open(self.output, "w") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)

    def paused_pids(self, timeout_s=1200):
        """The process id of each training process, once all of them wait after step PAUSE_AFTER."""
        markers = [self.pause_dir / f"paused.{rank}" for rank in range(self.processes)]
        deadline = time.monotonic() + timeout_s
        while not all(marker.exists() for marker in markers):
            assert self.process.poll() is None, f"ended with {self.process.returncode}: {self.tail()}"
            assert time.monotonic() < deadline, "the training never reached the pause"
            time.sleep(0.1)
        return [int(marker.read_text()) for marker in markers]

    def go_on(self):
        (self.pause_dir / "go").touch()

    def wait(self, timeout_s=1200):
        try:
            return self.process.wait(timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()

    def tail(self):
        return self.output.read_text()[-3000:]


def _saved_line(log_file, name, status):
    lines = [line for line in log_file.read_text().splitlines() if f"{name}: saved" in line]
    assert len(lines) == 1, lines
    checkpoint = log_file.parent / f"model_{STOPPED_AT:07d}.pth"
    assert lines[0].endswith(f"{name}: saved {checkpoint} at iteration {STOPPED_AT}; stopping with status {status} "
                             f"(--resume continues from iteration {STOPPED_AT + 1})"), lines[0]


def _assert_stopped_checkpoint(output_dir, processes):
    assert (output_dir / "last_checkpoint").read_text() == f"model_{STOPPED_AT:07d}.pth"
    saved = _load(output_dir / f"model_{STOPPED_AT:07d}.pth")
    assert saved["iteration"] == STOPPED_AT and len(saved["rank_states"]) == processes
    assert not (output_dir / "model_final.pth").exists()
    metrics = [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines()]
    assert metrics and metrics[-1]["iteration"] == STOPPED_AT  # flushed, up to the iteration stopped at


@pytest.mark.slow
def test_sigterm_saves_the_current_iteration_and_resume_continues_exactly(demo_datasets_dir, tmp_path):
    out = tmp_path / "signalled"
    training = _Training(tmp_path, out, 1, demo_datasets_dir)
    assert training.paused_pids() == [training.process.pid]
    os.kill(training.process.pid, signal.SIGTERM)
    assert training.wait() == 143, training.tail()
    _assert_stopped_checkpoint(out, 1)
    _saved_line(out / "log.txt", "SIGTERM", 143)
    assert "Traceback" not in training.tail()

    resumed = _train_net(out, "--resume", *OPTS, processes=1, demo_datasets_dir=demo_datasets_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Starting training from iteration {STOPPED_AT + 1}" in (out / "log.txt").read_text()
    straight = _train_net(tmp_path / "straight", *OPTS, processes=1, demo_datasets_dir=demo_datasets_dir)
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected, actual = _load(tmp_path / "straight" / "model_final.pth"), _load(out / "model_final.pth")
    assert expected.keys() == actual.keys() >= {"model", "trainer", "training_stream", "rank_states", "iteration"}
    for key in expected:
        _assert_same_tensors(expected[key], actual[key], key)


@pytest.mark.slow
def test_two_processes_stop_together_when_one_gets_sigint(demo_datasets_dir, tmp_path):
    out = tmp_path / "run"
    training = _Training(tmp_path, out, 2, demo_datasets_dir)
    pids = training.paused_pids()
    os.kill(pids[1], signal.SIGINT)  # process 0 gets nothing: it must stop at the same iteration
    training.go_on()
    assert training.wait() == 130, training.tail()
    _assert_stopped_checkpoint(out, 2)
    _saved_line(out / "log.txt", "SIGINT", 130)
    _saved_line(out / "log.txt.rank1", "SIGINT", 130)


@pytest.mark.slow
def test_the_launcher_passes_sigterm_on_and_two_processes_resume(demo_datasets_dir, tmp_path):
    out = tmp_path / "run"
    training = _Training(tmp_path, out, 2, demo_datasets_dir)
    training.paused_pids()
    os.kill(training.process.pid, signal.SIGTERM)  # as a scheduler that signals the command only
    assert training.wait() == 143, training.tail()
    _assert_stopped_checkpoint(out, 2)
    _saved_line(out / "log.txt", "SIGTERM", 143)

    resumed = _train_net(out, "--resume", *OPTS, processes=2, demo_datasets_dir=demo_datasets_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Starting training from iteration {STOPPED_AT + 1}" in (out / "log.txt").read_text()
    assert _load(out / "model_final.pth")["iteration"] == MAX_ITER - 1
