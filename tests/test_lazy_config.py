"""LazyConfigs in the tools: the demo .py matches its YAML, overrides reach the detector, bad ones stop
train_net with one line before anything is written, and the demo trains, resumes, evaluates and folds."""
import os
import subprocess
import sys

import pytest
import torch
from detectron2.data import DatasetMapper
from detectron2.modeling import GeneralizedRCNN
from detectron2.solver import build_lr_scheduler
from omegaconf import ListConfig
from torch import nn

from mabn_d2 import build_model
from mabn_d2.engine.lazy import build_lazy_model, load_lazy_config, moving_average_norm_keys
from mabn_d2.engine.lazy_trainer import build_lazy_optimizer
from mabn_d2.engine.preflight import UsageError
from mabn_d2.engine.trainer import MABNTrainer, setup_cfg
from mabn_d2.layers import MABN2d

from .conftest import REPO_ROOT, load_tool

DEMO_YAML = os.path.join(REPO_ROOT, "configs/Demo/fmnist_mask_rcnn_R_18_FPN_mabn_bnheads.yaml")
DEMO_LAZY = os.path.join(REPO_ROOT, "configs/Demo/fmnist_mask_rcnn_R_18_FPN_mabn_bnheads.py")
COCO_LAZY = os.path.join(REPO_ROOT, "configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_mabn_scratch.py")
TINY_DATA = ["dataloader.train.dataset.names=fmnist_coco_tiny_train",
             "dataloader.test.dataset.names=fmnist_coco_tiny_val"]


def _load_tool(name):
    return load_tool(name)


@pytest.fixture(scope="module")
def train_net():
    return _load_tool("train_net")


@pytest.fixture(scope="module")
def demo_models():
    """The demo's model from the YAML and from the LazyConfig, each built after the same seed."""
    cfg = setup_cfg(DEMO_YAML, [])
    lazy = load_lazy_config(DEMO_LAZY)
    torch.manual_seed(0)
    yaml_model = build_model(cfg)
    torch.manual_seed(0)
    lazy_model = build_lazy_model(lazy)
    return cfg, yaml_model, lazy, lazy_model


# ----------------------------------------------------------------------------- the demo LazyConfig


_SKIP = object()


def _plain(value, depth=0):
    """A comparable form of a module's setting; _SKIP for submodules, tensors and other objects."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple, ListConfig)):
        items = tuple(_plain(v, depth) for v in value)
        return _SKIP if any(i is _SKIP for i in items) else items
    if isinstance(value, dict):
        return tuple(sorted((str(k), _plain(v, depth)) for k, v in value.items()))
    if isinstance(value, (nn.Module, torch.Tensor)) or depth > 0 or not hasattr(value, "__dict__"):
        return _SKIP
    # helpers such as Matcher, Box2BoxTransform, anchor generators' settings
    return type(value).__name__, tuple(sorted((k, _plain(v, 1)) for k, v in vars(value).items()))


def _settings(model):
    """{(module, attribute): value} of every plain setting of every module (thresholds, sizes, top-k ...)."""
    found = {}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            plain = _plain(value)
            if not key.startswith("_") and key != "training" and plain is not _SKIP:
                found[(name, key)] = plain
    return found


def test_demo_yaml_and_lazyconfig_build_the_same_model(demo_models):
    _, yaml_model, lazy, lazy_model = demo_models
    assert lazy.model._target_ is GeneralizedRCNN  # the detector itself: model.<attr> overrides reach it
    modules = [(name, type(m), m.extra_repr()) for name, m in yaml_model.named_modules()]
    assert modules == [(name, type(m), m.extra_repr()) for name, m in lazy_model.named_modules()]
    yaml_state, lazy_state = yaml_model.state_dict(), lazy_model.state_dict()
    assert list(yaml_state) == list(lazy_state)
    assert all(yaml_state[k].shape == lazy_state[k].shape and torch.equal(yaml_state[k], lazy_state[k])
               for k in yaml_state)
    yaml_settings, lazy_settings = _settings(yaml_model), _settings(lazy_model)
    # detectron2's from_config gives {"loss_box_reg": w}, its default {"loss_cls": 1.0, "loss_box_reg": 1.0};
    # a missing weight counts as 1.0 (FastRCNNOutputLayers.losses), so they weigh the same
    key = ("roi_heads.box_predictor", "loss_weight")
    assert dict(lazy_settings.pop(key)) == {**{"loss_cls": 1.0}, **dict(yaml_settings.pop(key))}
    assert yaml_settings == lazy_settings
    mabn = [m for m in lazy_model.modules() if isinstance(m, MABN2d)]
    assert len(mabn) == 28 and all(m.input_centering == "centered" for m in mabn)
    assert {(m.buffer_size, m.ema_decay, m.warmup_iters, m.renorm_warmup_iters, m.renorm_clip, m.eps) for m in mabn} \
        == {(16, 0.98, 22, 180, 5.0, 1e-5)}
    assert sum(isinstance(m, nn.BatchNorm2d) for m in lazy_model.roi_heads.modules()) == 8  # BN heads


def _per_parameter(optimizer, model):
    by_id = {id(p): (g["lr"], g["weight_decay"], g["momentum"], g["nesterov"], g["dampening"])
             for g in optimizer.param_groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


def test_demo_yaml_and_lazyconfig_have_the_same_solver_and_data(demo_models):
    cfg, yaml_model, lazy, lazy_model = demo_models
    yaml_optimizer = MABNTrainer.build_optimizer(cfg, yaml_model)
    lazy_optimizer = build_lazy_optimizer(lazy, lazy_model)
    assert type(yaml_optimizer).__name__ == type(lazy_optimizer).__name__ == "SGD"  # the authors clip nothing
    assert _per_parameter(yaml_optimizer, yaml_model) == _per_parameter(lazy_optimizer, lazy_model)
    clip = cfg.SOLVER.CLIP_GRADIENTS
    assert dict(lazy.train.clip_gradients) == dict(enabled=clip.ENABLED, clip_type=clip.CLIP_TYPE,
                                                  clip_value=clip.CLIP_VALUE, norm_type=clip.NORM_TYPE)
    yaml_schedule = build_lr_scheduler(cfg, yaml_optimizer)._multiplier
    from detectron2.config import instantiate

    lazy_schedule = instantiate(lazy.lr_multiplier)
    for iteration in range(cfg.SOLVER.MAX_ITER):
        where = iteration / cfg.SOLVER.MAX_ITER
        assert lazy_schedule(where) == pytest.approx(yaml_schedule(where), rel=1e-12, abs=1e-15), iteration
    assert lazy.train.max_iter == cfg.SOLVER.MAX_ITER and lazy.train.seed == cfg.SEED
    assert lazy.train.checkpointer.period == cfg.SOLVER.CHECKPOINT_PERIOD
    assert lazy.train.eval_period == cfg.TEST.EVAL_PERIOD and lazy.train.device == cfg.MODEL.DEVICE
    train = lazy.dataloader.train
    assert train.total_batch_size == cfg.SOLVER.IMS_PER_BATCH and train.num_workers == cfg.DATALOADER.NUM_WORKERS
    assert (train.dataset.names,) == cfg.DATASETS.TRAIN and (lazy.dataloader.test.dataset.names,) == cfg.DATASETS.TEST
    assert _mapper_settings(DatasetMapper(cfg, True)) == _mapper_settings(instantiate(train.mapper))
    yaml_test, lazy_test = DatasetMapper(cfg, False), instantiate(lazy.dataloader.test.mapper)
    for mapper in (yaml_test, lazy_test):  # a test mapper drops annotations: their format is not used
        del mapper.use_instance_mask, mapper.instance_mask_format
    assert _mapper_settings(yaml_test) == _mapper_settings(lazy_test)


def _mapper_settings(mapper):
    """A DatasetMapper's settings, its augmentations as (type, settings) with lists and tuples alike."""
    settings = {k: _plain(v) for k, v in vars(mapper).items() if k != "augmentations"}
    settings["augmentations"] = [(type(a).__name__, _plain(vars(a))) for a in mapper.augmentations.augs]
    return settings


# ----------------------------------------------------------------------------- overrides


def test_roi_heads_num_classes_reaches_the_detector():
    lazy = load_lazy_config(COCO_LAZY, ["model.roi_heads.num_classes=10", "train.device=cpu"])
    model = build_lazy_model(lazy)
    assert model.roi_heads.num_classes == 10
    assert model.roi_heads.box_predictor.cls_score.out_features == 11  # 10 classes and the background
    assert model.roi_heads.mask_head.predictor.out_channels == 10
    assert sum(isinstance(m, MABN2d) for m in model.modules()) == 69  # the MABN pass ran after instantiate


def test_the_nested_model_path_of_the_old_layout_names_the_new_one():
    with pytest.raises(UsageError) as error:
        load_lazy_config(COCO_LAZY, ["model.model.roi_heads.num_classes=10"])
    assert str(error.value) == (
        "bad config override 'model.model.roi_heads.num_classes=10': model builds GeneralizedRCNN, which takes "
        "no argument 'model' (`model` is the detector itself: write model.roi_heads.num_classes)")


def test_norms_that_build_mabn_are_found_by_key():
    keys = dict(moving_average_norm_keys(load_lazy_config(DEMO_LAZY)))
    assert keys == {"model.backbone.bottom_up.stem.norm": MABN2d, "model.backbone.bottom_up.stages.norm": MABN2d,
                    "model.backbone.norm": MABN2d}


def _refused(train_net, capsys, *argv, config=DEMO_LAZY) -> str:
    assert train_net.invoke_main(["--config-file", config, *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train_net: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("override, message", [
    ("model.model.roi_heads.num_classes=10", "takes no argument 'model' (`model` is the detector itself"),
    ("trian.max_iter=3", "the config has no 'trian' (it has model, dataloader, optimizer, train, lr_multiplier)"),
    ("train.max_iter=0", "train.max_iter must be an integer > 0, got 0"),
    ("optimizer.lr=nan", "optimizer.lr must be finite and > 0, got nan"),
    ("model.roi_heads.num_clases=10", "TypeError: ROIHeads.__init__() got an unexpected keyword argument 'num_clases'"),
    ("MODEL.WEIGHTS", "a LazyConfig takes key=value (e.g. train.max_iter=100), not YAML's KEY VALUE"),
])
def test_bad_override_is_one_line_and_writes_nothing(train_net, tmp_path, capsys, override, message):
    err = _refused(train_net, capsys, f"train.output_dir={tmp_path / 'run'}", override)
    assert message in err
    assert not (tmp_path / "run").exists()


def test_bad_value_in_an_existing_run_changes_nothing(train_net, tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("the run's config\n")
    err = _refused(train_net, capsys, f"train.output_dir={tmp_path}", "dataloader.train.total_batch_size=3",
                   "--num-gpus", "2")
    assert "bad config override '--num-gpus'" in err  # options go before the overrides, as in detectron2
    err = _refused(train_net, capsys, "--num-gpus", "2", f"train.output_dir={tmp_path}",
                   "dataloader.train.total_batch_size=3")
    assert "dataloader.train.total_batch_size must be divisible by the number of training processes, 2" in err
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"] and (tmp_path / "config.yaml").read_text() == \
        "the run's config\n"


def test_unreadable_init_checkpoint_and_missing_config(train_net, tmp_path, capsys):
    weights = tmp_path / "weights.pth"
    weights.write_text("not weights")
    err = _refused(train_net, capsys, f"train.output_dir={tmp_path / 'run'}", f"train.init_checkpoint={weights}")
    assert f"cannot read checkpoint {weights}: not a PyTorch or pickle checkpoint" in err
    err = _refused(train_net, capsys, config=str(tmp_path / "none.py"))
    assert f"cannot read config {tmp_path / 'none.py'}: no such file" in err
    assert not (tmp_path / "run").exists()


def test_fold_tool_refuses_a_bad_lazy_override_in_one_line(tmp_path, capsys):
    fold_mabn = _load_tool("fold_mabn")
    rc = fold_mabn.main(["--config-file", DEMO_LAZY, "--weights", str(tmp_path / "w.pth"), "--output-dir",
                         str(tmp_path / "out"), "model.model.roi_heads.num_classes=10"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("fold_mabn: error: bad config override") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- end to end


def _run(tool, *argv, datasets):
    env = dict(os.environ, DETECTRON2_DATASETS=datasets, OMP_NUM_THREADS="1")
    command = [sys.executable, os.path.join(REPO_ROOT, "tools", tool), *map(str, argv)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200, cwd=REPO_ROOT)


@pytest.mark.slow
def test_demo_lazyconfig_trains_resumes_evaluates_and_folds(demo_datasets_dir, tmp_path):
    run = tmp_path / "run"
    common = ["--config-file", DEMO_LAZY]
    trained = _run("train_net.py", *common, "train.max_iter=3", f"train.output_dir={run}", *TINY_DATA,
                   datasets=demo_datasets_dir)
    assert trained.returncode == 0, trained.stderr[-3000:]
    log = (run / "log.txt").read_text()
    assert "Starting training from iteration 0" in log and "MABN: 28 layers" in log
    assert "copypaste: Task: segm" in log  # the evaluation after training
    assert '"mabn/phase"' in (run / "metrics.json").read_text()  # the health hook's scalars
    checkpoint = torch.load(run / "model_final.pth", map_location="cpu", weights_only=False)
    assert len(checkpoint["rank_states"]) == 1 and checkpoint["iteration"] == 2  # MABNCheckpointer's state
    assert checkpoint["training_stream"]["data_seed"] == 0  # the seeded stream, train.seed

    resumed = _run("train_net.py", *common, "--resume", "train.max_iter=4", f"train.output_dir={run}", *TINY_DATA,
                   datasets=demo_datasets_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Starting training from iteration 3" in (run / "log.txt").read_text()
    evaluated = _run("train_net.py", *common, "--eval-only", f"train.init_checkpoint={run / 'model_final.pth'}",
                     f"train.output_dir={tmp_path / 'eval'}", *TINY_DATA, datasets=demo_datasets_dir)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "copypaste: Task: bbox" in (tmp_path / "eval" / "log.txt").read_text()

    folded = _run("fold_mabn.py", *common, "--weights", run / "model_final.pth", "--output-dir", tmp_path / "folded",
                  "--verify", "1", *TINY_DATA, datasets=demo_datasets_dir)
    assert folded.returncode == 0, folded.stderr[-3000:]
    assert "verify frozen vs original" in folded.stdout
    text = (tmp_path / "folded" / "config_folded.yaml").read_text()
    assert "mabn_d2" not in text and "MABN" not in text
    assert f"init_checkpoint: {tmp_path / 'folded' / 'model_folded.pth'}" in text
    assert sorted(os.listdir(tmp_path / "folded")) == ["config_folded.yaml", "model_folded.pth"]


@pytest.mark.slow
def test_demo_lazyconfig_trains_on_two_cpu_processes(demo_datasets_dir, tmp_path):
    trained = _run("train_net.py", "--num-gpus", "2", "--config-file", DEMO_LAZY, "train.max_iter=2",
                   f"train.output_dir={tmp_path}", *TINY_DATA, datasets=demo_datasets_dir)
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    assert len(checkpoint["rank_states"]) == 2  # each process's own MABN state
    counters = [v for k, v in checkpoint["model"].items() if k.endswith("num_batches_tracked")]
    assert counters and all(int(c) == 2 for c in counters[:10])
