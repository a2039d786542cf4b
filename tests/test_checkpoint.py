"""MABNCheckpointer: atomic saves, a resume that checks its file, per-process state.

Crashes are simulated deterministically: a save that fails halfway, and a process that kills
itself with SIGKILL halfway through writing a checkpoint.
"""
import contextlib
import logging
import os
import random
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from mabn_d2.engine.checkpoint import (
    RANK_STATES_KEY, CheckpointError, MABNCheckpointer, check_resume_point, read_checkpoint,
)
from mabn_d2.layers import CenteredConv2d, MABN2d
from mabn_d2.engine.rank_state import capture_rank_state, restore_rank_state

from .conftest import REPO_ROOT


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(CenteredConv2d(3, 4, 1), MABN2d(4, buffer_size=2, warmup_iters=0, renorm_warmup_iters=2))
    model.train()
    for _ in range(3):  # statistics and ring buffers away from their initial values
        model(torch.randn(2, 3, 5, 5))
    return model


class _Crash(Exception):
    pass


def _half_then_crash(data, f):
    f.write(b"PK\x03\x04 half of a checkpoint")
    raise _Crash()


def _files(folder) -> list:
    return sorted(os.listdir(folder))


def test_a_save_that_fails_halfway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpointer = MABNCheckpointer(_model(), str(tmp_path))
    checkpointer.save("model_final", iteration=1)
    before = (tmp_path / "model_final.pth").read_bytes()
    monkeypatch.setattr(checkpointer, "_serialize", _half_then_crash)
    with pytest.raises(_Crash):
        checkpointer.save("model_final", iteration=3)
    assert (tmp_path / "model_final.pth").read_bytes() == before
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert _files(tmp_path) == ["last_checkpoint", "model_final.pth"]
    assert read_checkpoint(str(tmp_path / "model_final.pth"))["iteration"] == 1


def test_last_checkpoint_names_a_file_only_once_it_is_complete(tmp_path, monkeypatch):
    checkpointer = MABNCheckpointer(_model(), str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    monkeypatch.setattr(checkpointer, "_serialize", _half_then_crash)
    with pytest.raises(_Crash):
        checkpointer.save("model_0000003", iteration=3)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert _files(tmp_path) == ["last_checkpoint", "model_0000001.pth"]


KILLED_WHILE_SAVING = textwrap.dedent(
    """
    import os, signal, sys, torch
    from torch import nn
    from mabn_d2.engine.checkpoint import MABNCheckpointer
    from mabn_d2.layers import MABN2d
    checkpointer = MABNCheckpointer(nn.Sequential(nn.Conv2d(3, 4, 1), MABN2d(4)), sys.argv[1])
    checkpointer.save("model_final", iteration=1)
    def half_then_killed(data, f):
        f.write(b"PK\\x03\\x04 half")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    checkpointer._serialize = half_then_killed
    checkpointer.save("model_final", iteration=3)
    """
)


def test_sigkill_while_rewriting_the_only_checkpoint_leaves_it_readable(tmp_path):
    result = subprocess.run([sys.executable, "-c", KILLED_WHILE_SAVING, str(tmp_path)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    stale = [name for name in _files(tmp_path) if name.endswith(".tmp")]
    assert len(stale) == 1 and stale[0].startswith(".model_final.pth.")  # what SIGKILL cannot clean
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert check_resume_point(str(tmp_path)) == str(tmp_path / "model_final.pth")

    checkpointer = MABNCheckpointer(nn.Sequential(nn.Conv2d(3, 4, 1), MABN2d(4)), str(tmp_path))
    assert checkpointer.resume_or_load("", resume=True)["iteration"] == 1
    assert _files(tmp_path) == ["last_checkpoint", "model_final.pth"]  # the unfinished write is gone


def test_resume_from_an_unreadable_checkpoint_names_it_and_the_others(tmp_path):
    checkpointer = MABNCheckpointer(_model(), str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    checkpointer.save("model_0000003", iteration=3)
    (tmp_path / "model_final.pth").write_bytes(b"")  # what writing in place left after a crash
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    message = (r"cannot resume: cannot read checkpoint .*model_final\.pth: the file is empty \(0 bytes.*\); "
               r"other checkpoints in .*, newest first: model_0000003\.pth \(.*\), model_0000001\.pth \(.*\); "
               r"to resume from one of them write its file name into .*last_checkpoint$")
    with pytest.raises(CheckpointError, match=message):
        check_resume_point(str(tmp_path))
    with pytest.raises(CheckpointError, match=message):
        MABNCheckpointer(_model(), str(tmp_path)).resume_or_load("", resume=True)
    (tmp_path / "last_checkpoint").write_text("model_0000003.pth")  # what the message says to do
    assert MABNCheckpointer(_model(), str(tmp_path)).resume_or_load("", resume=True)["iteration"] == 3


def test_resume_with_no_other_checkpoint_says_to_start_again(tmp_path):
    (tmp_path / "model_final.pth").write_text("some text")
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    with pytest.raises(CheckpointError, match=r"not a PyTorch or pickle checkpoint .*there is no other checkpoint "
                                              r"in .*: train again without --resume$"):
        MABNCheckpointer(_model(), str(tmp_path)).resume_or_load("", resume=True)
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*model_0000009\.pth"):
        check_resume_point(str(tmp_path))
    (tmp_path / "last_checkpoint").write_text("")
    with pytest.raises(CheckpointError, match=r"last_checkpoint is empty"):
        MABNCheckpointer(_model(), str(tmp_path)).resume_or_load("", resume=True)


def test_a_failed_load_does_not_break_the_next_one(tmp_path):
    checkpointer = MABNCheckpointer(_model(), str(tmp_path))
    checkpointer.save("good", iteration=1)
    (tmp_path / "bad.pth").write_bytes(b"\x80\x02 broken pickle")
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        checkpointer.load(str(tmp_path / "bad.pth"))
    assert checkpointer.load(str(tmp_path / "good.pth"))["iteration"] == 1


def _overwrite_tensor_bytes(path, tensor: torch.Tensor) -> None:
    """Change one byte inside `tensor`'s data in the file: the zip and pickle around it stay intact."""
    data = bytearray(path.read_bytes())
    start = data.find(tensor.detach().numpy().tobytes())
    assert start > 0 and data.count(tensor.detach().numpy().tobytes()) == 1
    data[start + 1] ^= 0x40
    path.write_bytes(bytes(data))


def test_resume_from_a_checkpoint_changed_after_saving_names_it(tmp_path):
    model = _model()
    checkpointer = MABNCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    checkpointer.save("model_0000003", iteration=3)
    _overwrite_tensor_bytes(tmp_path / "model_0000003.pth", model[0].weight)  # saved once: buffers twice
    torch.load(tmp_path / "model_0000003.pth", weights_only=True)  # still loads: torch.load does not notice
    message = (r"cannot resume: checkpoint .*model_0000003\.pth is damaged: its model state does not match the "
               r"checksum saved with it \(model_sha256\); .*other checkpoints in .*, newest first: model_0000001\.pth")
    with pytest.raises(CheckpointError, match=message):
        check_resume_point(str(tmp_path))
    with pytest.raises(CheckpointError, match=message):
        MABNCheckpointer(_model(seed=1), str(tmp_path)).resume_or_load("", resume=True)
    with pytest.raises(CheckpointError, match=r"^checkpoint .*model_0000003\.pth is damaged"):
        MABNCheckpointer(_model(seed=1)).load(str(tmp_path / "model_0000003.pth"), checkpointables=[])
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    extra = MABNCheckpointer(_model(seed=1), str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 1 and "model_sha256" not in extra


def test_reading_a_checkpoint_changed_after_saving_refuses_it_naming_the_file(tmp_path):
    """read_checkpoint (fold, re-estimation, evaluation and the checks before a run) verifies as a resume does."""
    model = _model()
    MABNCheckpointer(model, str(tmp_path)).save("model_final", iteration=2)
    path = tmp_path / "model_final.pth"
    _overwrite_tensor_bytes(path, model[0].weight)
    assert torch.load(path, weights_only=True)["iteration"] == 2  # the pickle still loads
    for mmap in (False, True):
        with pytest.raises(CheckpointError, match=rf"^checkpoint {re.escape(str(path))} is damaged: its model "
                                                  r"state does not match the checksum saved with it"):
            read_checkpoint(str(path), mmap=mmap)
    assert read_checkpoint(str(path), verify=False)["iteration"] == 2


def test_reestimation_refuses_a_checkpoint_changed_after_saving(tmp_path, monkeypatch):
    import mabn_d2
    from mabn_d2.engine import setup_cfg
    from mabn_d2.engine import reestimation

    from .test_train_net import DEMO_CONFIG, TINY_MODEL

    cfg = setup_cfg(DEMO_CONFIG, [*TINY_MODEL, "SOLVER.MAX_ITER", "4"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.dump())
    model = mabn_d2.build_model(cfg)
    MABNCheckpointer(model, str(run)).save("model_final", iteration=3)
    _overwrite_tensor_bytes(run / "model_final.pth", model.backbone.bottom_up.stem.conv1.weight)
    with pytest.raises(CheckpointError, match=rf"^checkpoint {re.escape(str(run / 'model_final.pth'))} is damaged"):
        reestimation.reestimate_run_checkpoints(str(run), str(tmp_path / "out"), num_batches=1)


def test_checkpoints_without_a_checksum_still_load(tmp_path):
    model = _model()
    torch.save({"model": model.state_dict(), "iteration": 7}, tmp_path / "model_0000007.pth")
    (tmp_path / "last_checkpoint").write_text("model_0000007.pth")
    other = _model(seed=1)
    assert MABNCheckpointer(other, str(tmp_path)).resume_or_load("", resume=True)["iteration"] == 7
    assert torch.equal(other[1].running_var, model[1].running_var)


def test_resume_restores_buffers_and_rng_of_this_process(tmp_path):
    model = _model()
    checkpointer = MABNCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000002", iteration=2)
    saved = read_checkpoint(str(tmp_path / "model_0000002.pth"))[RANK_STATES_KEY]
    assert len(saved) == 1 and {"buffers", "rng"} == set(saved[0])
    assert {"1.x2_buffer", "1.gz_buffer", "1.running_var", "1.num_batches_tracked"} <= set(saved[0]["buffers"])
    expected = (torch.rand(3), np.random.rand(3), random.random())

    other = _model(seed=1)
    assert not torch.equal(other[1].running_var, model[1].running_var)
    MABNCheckpointer(other, str(tmp_path)).resume_or_load("", resume=True)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    assert other[1].iteration == model[1].iteration == 3
    drawn = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(drawn[0], expected[0]) and np.array_equal(drawn[1], expected[1]) and drawn[2] == expected[2]


def test_loading_weights_without_resume_ignores_per_process_state(tmp_path):
    MABNCheckpointer(_model(), str(tmp_path)).save("model_final", iteration=2)
    model = _model(seed=1)
    state = torch.get_rng_state()
    MABNCheckpointer(model).load(str(tmp_path / "model_final.pth"), checkpointables=[])
    assert torch.equal(torch.get_rng_state(), state)


@contextlib.contextmanager
def _handled_by(caplog, logger_name):
    """Records of `logger_name` reach caplog even where detectron2's setup_logger stopped propagation."""
    logger = logging.getLogger(logger_name)
    logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)


def _rank_states(world_size: int):
    states = []
    for rank in range(world_size):
        model = _model(seed=10 + rank)
        torch.manual_seed(100 + rank)
        states.append(capture_rank_state(model))
    return states


def test_same_process_count_restores_each_rank_exactly():
    saved = _rank_states(2)
    model = _model(seed=5)
    restore_rank_state(model, saved, rank=1, world_size=2)
    assert torch.equal(model[1].x2_buffer, saved[1]["buffers"]["1.x2_buffer"])
    assert torch.equal(torch.get_rng_state(), saved[1]["rng"]["torch"])


@pytest.mark.parametrize("world_size,rank,source_rank", [(1, 0, 0), (3, 2, 0), (3, 1, 1)])
def test_another_process_count_takes_buffers_of_rank_mod_n_and_keeps_its_rng(world_size, rank, source_rank, caplog):
    saved = _rank_states(2)
    model = _model(seed=5)
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="mabn_d2.engine.rank_state"), _handled_by(caplog, "mabn_d2.engine.rank_state"):
        restore_rank_state(model, saved, rank=rank, world_size=world_size, source="model_0000003.pth")
    assert torch.equal(model[1].x2_buffer, saved[source_rank]["buffers"]["1.x2_buffer"])
    assert torch.equal(torch.get_rng_state(), rng)
    if rank == 0:
        assert "model_0000003.pth was written by 2 processes and this run has 1" in caplog.text
        assert "not exact" in caplog.text


def test_per_process_state_of_another_model_is_refused():
    saved = [{"buffers": {"7.running_var": torch.ones(4)}, "rng": {}}]
    with pytest.raises(ValueError, match=r"does not match the model: 1 unknown buffers \(7\.running_var\)"):
        restore_rank_state(_model(), saved, rank=0, world_size=1)


def _onto_a_full_disk(data, _file) -> None:
    """MABNCheckpointer._serialize as a full disk answers it: torch.save onto /dev/full."""
    with open("/dev/full", "wb") as full:
        torch.save(data, full)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a device that is always full")
def test_save_on_a_full_disk_names_the_file_and_the_checkpoint_kept(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), MABN2d(4))
    checkpointer = MABNCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000099", iteration=99)
    monkeypatch.setattr(checkpointer, "_serialize", _onto_a_full_disk)
    with pytest.raises(CheckpointError) as raised:
        checkpointer.save("model_0000199", iteration=199)
    assert str(raised.value) == (f"no space left on device while saving {tmp_path / 'model_0000199.pth'}; "
                                 f"{tmp_path / 'model_0000099.pth'} kept")
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000099.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000099.pth"

    first = MABNCheckpointer(model, str(tmp_path / "new"))
    os.makedirs(first.save_dir)
    monkeypatch.setattr(first, "_serialize", _onto_a_full_disk)
    with pytest.raises(CheckpointError, match=r"while saving .*model_0000000.pth; no earlier checkpoint in .*new$"):
        first.save("model_0000000", iteration=0)
    assert os.listdir(first.save_dir) == []
