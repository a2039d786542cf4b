"""End-to-end: the demo config trains, evaluates, resumes exactly and runs under launch()."""
import os
import subprocess
import sys

import pytest
import torch
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng

from mabn_d2.data.builtin import register_demo_datasets
from mabn_d2.engine import MABNTrainer, setup_cfg
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
    from detectron2.modeling import build_model

    model = build_model(cfg)
    optimizer = MABNTrainer.build_optimizer(cfg, model)
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    norm = _mabn_layers(model)[0]
    assert decay_of[id(norm.weight)] == 0.0 and decay_of[id(norm.bias)] == 0.0
    conv = model.backbone.bottom_up.stem.conv1
    assert decay_of[id(conv.weight)] == 1e-4
    assert len(decay_of) == len(list(model.parameters()))
