"""End-to-end: the demo config trains, evaluates, resumes exactly (one process or two, after a
crash at a known point) and runs under launch()."""
import contextlib
import logging
import os
import subprocess
import sys

import pytest
import torch
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng

from demo_datasets.builtin import register_demo_datasets
from mabn_d2.engine.trainer import MABNTrainer, setup_cfg
from mabn_d2.layers import CenteredConv2d, MABN2d

from .conftest import REPO_ROOT

DEMO_CONFIG = os.path.join(REPO_ROOT, "configs/Demo/fmnist_mask_rcnn_R_18_FPN_mabn.yaml")
TINY = [
    "DATASETS.TRAIN", "('fmnist_coco_tiny_train',)", "DATASETS.TEST", "('fmnist_coco_tiny_val',)",
    "MODEL.RESNETS.DEPTH", "18", "MODEL.FPN.OUT_CHANNELS", "64",
    "MODEL.ROI_BOX_HEAD.CONV_DIM", "64", "MODEL.ROI_BOX_HEAD.FC_DIM", "128", "MODEL.ROI_MASK_HEAD.CONV_DIM", "64",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "32", "TEST.DETECTIONS_PER_IMAGE", "10",
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "128",
    "INPUT.MAX_SIZE_TEST", "128", "SOLVER.WARMUP_ITERS", "2",
]


def _tiny_cfg(output_dir, *extra):
    """The tiny demo config; seeds every RNG with cfg.SEED as train_net's default_setup does."""
    cfg = setup_cfg(DEMO_CONFIG, TINY + ["OUTPUT_DIR", str(output_dir)] + list(extra))
    register_demo_datasets(cfg)
    seed_all_rng(cfg.SEED)
    return cfg


class _Interrupt(Exception):
    pass


class _InterruptAfter(HookBase):
    def __init__(self, iterations):
        self.iterations = iterations

    def after_step(self):
        if self.trainer.iter + 1 == self.iterations:
            raise _Interrupt()


def _mabn_layers(model):
    return [m for m in model.modules() if isinstance(m, MABN2d)]


@pytest.mark.slow
def test_demo_config_trains_and_evaluates(demo_datasets_dir, tmp_path):
    cfg = _tiny_cfg(tmp_path, "SOLVER.MAX_ITER", "3")
    trainer = MABNTrainer(cfg)
    trainer.resume_or_load(resume=False)
    assert any(isinstance(m, CenteredConv2d) for m in trainer.model.modules())
    results = trainer.train()
    layers = _mabn_layers(trainer.model)
    assert len(layers) > 30
    assert all(layer.iteration == 3 == int(layer.num_batches_tracked) for layer in layers[:21])
    history = trainer.storage.history("total_loss").values()
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(v)) for v, _ in history)
    # DefaultTrainer.test returns one dataset's results unwrapped
    assert set(results) >= {"bbox", "segm"}
    assert "AP" in results["bbox"] and "AP" in results["segm"]


@pytest.mark.slow
def test_resume_is_exact(demo_datasets_dir, tmp_path):
    common = ["SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TEST", "()"]
    straight = MABNTrainer(_tiny_cfg(tmp_path / "straight", *common))
    straight.resume_or_load(resume=False)
    straight.train()

    interrupted_dir = tmp_path / "interrupted"
    first = MABNTrainer(_tiny_cfg(interrupted_dir, *common))
    first.resume_or_load(resume=False)
    first.register_hooks([_InterruptAfter(2)])
    with pytest.raises(_Interrupt):
        first.train()
    del first
    second = MABNTrainer(_tiny_cfg(interrupted_dir, *common))
    second.resume_or_load(resume=True)
    assert second.start_iter == 2
    second.train()

    expected, actual = straight.model.state_dict(), second.model.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=f"{key} differs after resume")
    assert all(layer.iteration == 4 for layer in _mabn_layers(second.model)[:21])


@pytest.mark.slow
def test_two_cpu_processes_train_through_launch(demo_datasets_dir, tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=demo_datasets_dir, OMP_NUM_THREADS="1")
    command = [
        sys.executable, os.path.join(REPO_ROOT, "tools/train_net.py"), "--num-gpus", "2",
        "--config-file", DEMO_CONFIG, *TINY, "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()",
        "OUTPUT_DIR", str(tmp_path),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    log = (tmp_path / "log.txt").read_text()
    assert "Starting training from iteration 0" in log
    assert (tmp_path / "model_final.pth").exists()
    checkpoint = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    counters = [v for k, v in checkpoint["model"].items() if k.endswith("num_batches_tracked")]
    assert counters and all(int(c) == 2 for c in counters[:10])


@pytest.mark.slow
def test_eval_only_reports_box_and_mask_ap(demo_datasets_dir, tmp_path):
    cfg = _tiny_cfg(tmp_path, "SOLVER.MAX_ITER", "1", "DATASETS.TEST", "()")
    trainer = MABNTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    weights = tmp_path / "model_final.pth"
    env = dict(os.environ, DETECTRON2_DATASETS=demo_datasets_dir)
    command = [
        sys.executable, os.path.join(REPO_ROOT, "tools/train_net.py"), "--eval-only", "--config-file", DEMO_CONFIG,
        *TINY, "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(tmp_path / "eval"),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "copypaste: Task: bbox" in completed.stdout + completed.stderr
    assert "copypaste: Task: segm" in completed.stdout + completed.stderr


def test_norm_parameters_get_the_norm_weight_decay(demo_datasets_dir, tmp_path):
    cfg = setup_cfg(DEMO_CONFIG, TINY + ["SOLVER.WEIGHT_DECAY_NORM", "0.0", "SOLVER.WEIGHT_DECAY", "1e-4"])
    from mabn_d2 import build_model

    model = build_model(cfg)
    optimizer = MABNTrainer.build_optimizer(cfg, model)
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    norm = _mabn_layers(model)[0]
    assert decay_of[id(norm.weight)] == 0.0 and decay_of[id(norm.bias)] == 0.0
    conv = model.backbone.bottom_up.stem.conv1
    assert decay_of[id(conv.weight)] == 1e-4
    assert len(decay_of) == len(list(model.parameters()))


# ----------------------------------------------------------------------------- crashes and resume

# MABN past its warm-ups within a few iterations: moving averages and re-normalization are used,
# so a process that resumed with another process's statistics computes other outputs.
MABN_QUICK = ["MODEL.MABN.BUFFER_SIZE", "2", "MODEL.MABN.WARMUP_ITERS", "0", "MODEL.MABN.RENORM_WARMUP_ITERS", "2"]


class _Crash(Exception):
    pass


def _crash_while_writing(checkpointer, monkeypatch, name):
    """Make `checkpointer` write half of checkpoint `name` and fail, as a crash mid-write would."""
    save = checkpointer.save

    def half_then_crash(data, f):
        f.write(b"PK\x03\x04 half of it")
        raise _Crash(name)

    def save_crashing_on_name(checkpoint_name, **kwargs):
        if checkpoint_name == name:
            monkeypatch.setattr(checkpointer, "_serialize", half_then_crash)
        save(checkpoint_name, **kwargs)

    monkeypatch.setattr(checkpointer, "save", save_crashing_on_name)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_tensors(expected, actual, what):
    """Bit-for-bit equality of two nested checkpoint structures."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and torch.equal(expected, actual), f"{what} differs"
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), f"{what}: other keys"
        for key in expected:
            _assert_same_tensors(expected[key], actual[key], f"{what}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), f"{what}: other length"
        for i, (a, b) in enumerate(zip(expected, actual)):
            _assert_same_tensors(a, b, f"{what}[{i}]")
    else:
        assert expected == actual, f"{what}: {expected!r} != {actual!r}"


@pytest.mark.slow
def test_crash_while_rewriting_the_only_checkpoint_keeps_it(demo_datasets_dir, tmp_path, monkeypatch):
    """A finished run extended with --resume and a larger MAX_ITER, the demo's checkpoint policy."""
    common = ["SOLVER.CHECKPOINT_PERIOD", "100000", "DATASETS.TEST", "()"]
    first = MABNTrainer(_tiny_cfg(tmp_path, "SOLVER.MAX_ITER", "2", *common))
    first.resume_or_load(resume=False)
    first.train()
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".pth")) == ["model_final.pth"]
    finished = (tmp_path / "model_final.pth").read_bytes()

    extended = MABNTrainer(_tiny_cfg(tmp_path, "SOLVER.MAX_ITER", "4", *common))
    extended.resume_or_load(resume=True)
    _crash_while_writing(extended.checkpointer, monkeypatch, "model_final")
    with pytest.raises(_Crash):
        extended.train()
    assert (tmp_path / "model_final.pth").read_bytes() == finished  # the only checkpoint survived
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]

    again = MABNTrainer(_tiny_cfg(tmp_path, "SOLVER.MAX_ITER", "4", *common))
    again.resume_or_load(resume=True)
    assert again.start_iter == 2
    again.train()
    assert _load(tmp_path / "model_final.pth")["iteration"] == 3


@pytest.mark.slow
def test_resumed_finished_run_never_ends_without_a_readable_final_model(demo_datasets_dir, tmp_path, monkeypatch):
    common = ["SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TEST", "()"]
    first = MABNTrainer(_tiny_cfg(tmp_path, *common))
    first.resume_or_load(resume=False)
    _crash_while_writing(first.checkpointer, monkeypatch, "model_final")
    with pytest.raises(_Crash):  # the crash comes while model_final.pth is written at the end
        first.train()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    assert not (tmp_path / "model_final.pth").exists()
    last = _load(tmp_path / "model_0000003.pth")

    for final_before in ("missing", "empty"):  # "empty": what writing in place used to leave
        if final_before == "empty":
            (tmp_path / "model_final.pth").write_bytes(b"")
            (tmp_path / "last_checkpoint").write_text("model_0000003.pth")
        resumed = MABNTrainer(_tiny_cfg(tmp_path, *common))
        resumed.resume_or_load(resume=True)
        assert resumed.start_iter == 4 == resumed.max_iter
        resumed.train()
        final = _load(tmp_path / "model_final.pth")
        assert final["iteration"] == 3
        _assert_same_tensors(last["model"], final["model"], "model")
        (tmp_path / "model_final.pth").unlink()


@contextlib.contextmanager
def _handled_by(caplog, logger_name):
    """Records of `logger_name` reach caplog even where detectron2's setup_logger stopped propagation."""
    logger = logging.getLogger(logger_name)
    logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)


STOPPED = 17  # tests/interrupted_train_net.py's exit status


def _train_net(output_dir, *extra, processes=2, stop_after=None, demo_datasets_dir=None):
    env = dict(os.environ, DETECTRON2_DATASETS=demo_datasets_dir, OMP_NUM_THREADS="1")
    script = ["tests/interrupted_train_net.py", str(stop_after)] if stop_after else ["tools/train_net.py"]
    command = [sys.executable, *script, "--num-gpus", str(processes), "--config-file", DEMO_CONFIG, *extra,
               "OUTPUT_DIR", str(output_dir)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200, cwd=REPO_ROOT)


@pytest.mark.slow
def test_two_process_resume_is_exact(demo_datasets_dir, tmp_path):
    opts = [*TINY, *MABN_QUICK, "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "3", "DATASETS.TEST", "()"]
    straight = _train_net(tmp_path / "straight", *opts, demo_datasets_dir=demo_datasets_dir)
    assert straight.returncode == 0, straight.stderr[-3000:]

    interrupted_dir = tmp_path / "interrupted"
    interrupted = _train_net(interrupted_dir, *opts, stop_after=3, demo_datasets_dir=demo_datasets_dir)
    assert interrupted.returncode == STOPPED, interrupted.stderr[-3000:]
    assert (interrupted_dir / "last_checkpoint").read_text() == "model_0000002.pth"
    assert not (interrupted_dir / "model_final.pth").exists()
    resumed = _train_net(interrupted_dir, "--resume", *opts, demo_datasets_dir=demo_datasets_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Starting training from iteration 3" in (interrupted_dir / "log.txt").read_text()

    expected, actual = _load(tmp_path / "straight" / "model_final.pth"), _load(interrupted_dir / "model_final.pth")
    ranks = expected["rank_states"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["buffers"]["backbone.fpn_output2.norm.x2_buffer"],
                                               ranks[1]["buffers"]["backbone.fpn_output2.norm.x2_buffer"])
    assert expected.keys() == actual.keys() >= {"model", "rank_states", "trainer", "training_stream", "iteration"}
    for key in expected:
        _assert_same_tensors(expected[key], actual[key], key)


@pytest.mark.slow
def test_two_process_checkpoint_resumes_on_one_process(demo_datasets_dir, tmp_path, caplog):
    opts = [*TINY, *MABN_QUICK, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TEST", "()"]
    interrupted = _train_net(tmp_path, *opts, stop_after=2, demo_datasets_dir=demo_datasets_dir)
    assert interrupted.returncode == STOPPED, interrupted.stderr[-3000:]
    saved = _load(tmp_path / "model_0000001.pth")
    assert len(saved["rank_states"]) == 2

    trainer = MABNTrainer(_tiny_cfg(tmp_path, *MABN_QUICK, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2",
                                    "DATASETS.TEST", "()"))
    with caplog.at_level(logging.WARNING, logger="mabn_d2.engine.rank_state"), _handled_by(caplog, "mabn_d2.engine.rank_state"):
        trainer.resume_or_load(resume=True)
    assert "was written by 2 processes and this run has 1" in caplog.text and "not exact" in caplog.text
    buffers = saved["rank_states"][0]["buffers"]
    for key, value in trainer.model.state_dict().items():
        if key in buffers:
            assert torch.equal(value, buffers[key]), key  # process 0 continues from saved process 0's state
    trainer.train()
    assert _load(tmp_path / "model_final.pth")["iteration"] == 3


def test_plugin_warnings_land_in_log_txt_with_level_and_time(demo_datasets_dir, tmp_path):
    """A run whose re-normalization starts late: the plugin's warning is in detectron2's log.txt."""
    import re

    from mabn_d2.engine.trainer import setup_cfg

    class Args:
        config_file, eval_only, resume = DEMO_CONFIG, False, False

    out = tmp_path / "run"
    cfg = setup_cfg(DEMO_CONFIG, TINY + ["OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "2",
                                         "MODEL.MABN.WARMUP_FRACTION", "-1.0",
                                         "MODEL.MABN.RENORM_WARMUP_FRACTION", "-1.0"], args=Args())
    register_demo_datasets(cfg)
    trainer = MABNTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    for handler in logging.getLogger("mabn_d2").handlers:
        try:
            handler.flush()
        except ValueError:  # a stdout handler set up under an earlier test's captured (now closed) stdout
            pass
    log = (out / "log.txt").read_text()
    line = next(line for line in log.splitlines() if "re-normalization starts after iteration" in line)
    assert re.match(r"\[\d\d/\d\d \d\d:\d\d:\d\d\] mabn_d2\.engine\.trainer WARNING: MABN re-normalization", line), line


@pytest.mark.slow
def test_a_demo_run_logs_mabn_health_in_metrics_and_log_txt(demo_datasets_dir, tmp_path):
    """metrics.json holds the mabn/ scalars at the writer's period; log.txt names both phase changes."""
    import json

    cfg = _tiny_cfg(tmp_path, "SOLVER.MAX_ITER", "21", "DATASETS.TEST", "()", "MODEL.MABN.BUFFER_SIZE", "2",
                    "MODEL.MABN.WARMUP_ITERS", "3", "MODEL.MABN.RENORM_WARMUP_ITERS", "5",
                    "SOLVER.CHECKPOINT_PERIOD", "100000")
    trainer = MABNTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    with open(tmp_path / "metrics.json") as f:
        records = [json.loads(line) for line in f if line.strip()]
    health = [r for r in records if "mabn/phase" in r]
    assert [r["iteration"] for r in health] == [19, 20]  # the writer's period, and the last iteration
    for key in ("mabn/r_clipped_fraction", "mabn/chi2_log_ratio_abs_median", "mabn/chi2_log_ratio_median"):
        assert key in health[0], key
    assert health[0]["mabn/phase"] == 2.0 and 0.0 <= health[0]["mabn/r_clipped_fraction"] <= 1.0
    log = (tmp_path / "log.txt").read_text()
    assert "every MABN layer normalizes with moving averages\n" in log
    assert "normalizes with moving averages with re-normalization" in log
    assert "MABN layers served by PyTorch operations" in log
