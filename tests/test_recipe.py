"""The COCO configs and the LazyConfig train with the authors' solver, as docs/algorithm.md's table states."""
import glob
import os
import re

import pytest
import torch
from detectron2.config import LazyConfig, get_cfg
from detectron2.solver import build_optimizer as d2_build_optimizer

from mabn_d2.config import add_mabn_config, long_renorm_warmup_message, mabn_kwargs_from_cfg
from mabn_d2.engine.trainer import MABNTrainer, setup_cfg
from mabn_d2.layers import BatchRenorm2d, MABN2d

from .conftest import REPO_ROOT

COCO = os.path.join(REPO_ROOT, "configs", "COCO-InstanceSegmentation")
CONFIGS_2X = sorted(glob.glob(os.path.join(COCO, "mask_rcnn_R_50_FPN_2x_*.yaml")))
CONFIGS_ALL = sorted(glob.glob(os.path.join(COCO, "mask_rcnn_R_50_FPN_*.yaml")))
SCHEDULE_KEYS = {"SOLVER.STEPS", "SOLVER.MAX_ITER"}


def recipe_table():
    """{detectron2 key: (LazyConfig path, official value, our value)} from docs/algorithm.md."""
    text = open(os.path.join(REPO_ROOT, "docs", "algorithm.md")).read()
    section = text.split("## The training recipe", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.match(r"^(SOLVER|MODEL)\.", cells[0]):
            rows[cells[0]] = (cells[1], cells[2], cells[4])
    return rows


def _value(text: str):
    if text in ("True", "False"):
        return text == "True"
    if text.startswith("("):
        return tuple(int(x) for x in text.strip("()").split(","))
    try:
        return float(text)
    except ValueError:
        return text


def _cfg_value(cfg, key):
    if key.startswith("MODEL.MABN."):
        return mabn_kwargs_from_cfg(cfg)[key.rsplit(".", 1)[1].lower()]
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def test_the_table_lists_the_official_solver_and_ours_equals_it():
    table = recipe_table()
    assert len(table) == 17, sorted(table)
    for key, (_, official, ours) in table.items():
        assert _value(official) == _value(ours), key
    assert _value(table["SOLVER.WARMUP_ITERS"][1]) == 500 and _value(table["SOLVER.BIAS_LR_FACTOR"][1]) == 2.0
    assert _value(table["SOLVER.CLIP_GRADIENTS.ENABLED"][1]) is False


@pytest.mark.parametrize("path", CONFIGS_ALL, ids=os.path.basename)
def test_every_coco_config_takes_the_table(path):
    cfg = setup_cfg(path, ["MODEL.DEVICE", "cpu"])
    for key, (_, _, ours) in recipe_table().items():
        if key in SCHEDULE_KEYS and "_3x_" in path:
            continue
        value = _cfg_value(cfg, key)
        assert (tuple(value) if isinstance(value, (list, tuple)) else value) == _value(ours), (path, key, value)
    assert cfg.SOLVER.STEPS == ((210000, 250000) if "_3x_" in path else (120000, 160000))


@pytest.mark.parametrize("path", CONFIGS_ALL, ids=os.path.basename)
def test_no_warning_fires_against_the_official_recipe(path):
    cfg = setup_cfg(path, ["MODEL.DEVICE", "cpu"])
    assert long_renorm_warmup_message(cfg) is None


def test_the_lazyconfig_takes_the_table():
    lazy = LazyConfig.load(os.path.join(COCO, "mask_rcnn_R_50_FPN_2x_mabn_scratch.py"))
    table = {key: _value(ours) for key, (_, _, ours) in recipe_table().items()}
    assert lazy.dataloader.train.total_batch_size == table["SOLVER.IMS_PER_BATCH"]
    assert lazy.optimizer.lr == table["SOLVER.BASE_LR"] == lazy.optimizer.params.base_lr
    assert lazy.optimizer.momentum == table["SOLVER.MOMENTUM"]
    assert lazy.optimizer.weight_decay == table["SOLVER.WEIGHT_DECAY"]
    assert lazy.optimizer.params.weight_decay_norm == table["SOLVER.WEIGHT_DECAY_NORM"]
    assert lazy.optimizer.params.bias_lr_factor == table["SOLVER.BIAS_LR_FACTOR"]
    assert lazy.optimizer.params.weight_decay_bias == table["SOLVER.WEIGHT_DECAY_BIAS"]
    assert "MultiStep" in table["SOLVER.LR_SCHEDULER_NAME"]
    assert "MultiStepParamScheduler" in str(lazy.lr_multiplier.scheduler._target_)
    assert tuple(lazy.lr_multiplier.scheduler.milestones) == table["SOLVER.STEPS"]
    values = list(lazy.lr_multiplier.scheduler["values"])
    assert values == pytest.approx([1.0, table["SOLVER.GAMMA"], table["SOLVER.GAMMA"] ** 2])
    assert lazy.train.max_iter == lazy.lr_multiplier.scheduler.num_updates == table["SOLVER.MAX_ITER"]
    assert lazy.lr_multiplier.warmup_method == table["SOLVER.WARMUP_METHOD"]
    assert lazy.lr_multiplier.warmup_length * lazy.train.max_iter == pytest.approx(table["SOLVER.WARMUP_ITERS"])
    assert lazy.lr_multiplier.warmup_factor == pytest.approx(table["SOLVER.WARMUP_FACTOR"])
    assert "clip" not in str(lazy.train).lower()
    norm = lazy.model.backbone.norm
    assert norm.keywords["warmup_iters"] == table["MODEL.MABN.WARMUP_ITERS"]
    assert norm.keywords["renorm_warmup_iters"] == table["MODEL.MABN.RENORM_WARMUP_ITERS"]


def _toy_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=True), MABN2d(4), torch.nn.Conv2d(4, 4, 1, bias=False),
                               BatchRenorm2d(4), torch.nn.Conv2d(4, 4, 1, bias=False), torch.nn.BatchNorm2d(4))


def _hyperparams(optimizer, model):
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


def test_mabn_trainer_gives_mabn_and_brn_what_detectron2_gives_bn_under_the_official_solver():
    cfg = get_cfg()
    add_mabn_config(cfg)
    cfg.merge_from_file(os.path.join(COCO, "mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml"))
    model = _toy_model()
    params = _hyperparams(MABNTrainer.build_optimizer(cfg, model), model)
    lr = cfg.SOLVER.BASE_LR
    assert params["5.weight"] == (lr, 1e-4) and params["5.bias"] == (2 * lr, 0.0)  # detectron2's BN
    for norm in ("1", "3"):  # MABN, BRN: the same as BN
        assert params[f"{norm}.weight"] == params["5.weight"]
        assert params[f"{norm}.bias"] == params["5.bias"]
    assert params["0.bias"] == (2 * lr, 0.0) and params["0.weight"] == (lr, 1e-4)


def test_without_a_bias_override_mabn_beta_takes_the_norm_weight_decay_as_bn_beta_does():
    cfg = get_cfg()
    add_mabn_config(cfg)
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0  # detectron2's default solver: no bias override
    model = _toy_model()
    params = _hyperparams(MABNTrainer.build_optimizer(cfg, model), model)
    stock = _hyperparams(d2_build_optimizer(cfg, model), model)
    assert params["5.bias"] == stock["5.bias"] == (cfg.SOLVER.BASE_LR, 0.0)
    assert params["1.bias"] == params["1.weight"] == params["5.weight"] == (cfg.SOLVER.BASE_LR, 0.0)
