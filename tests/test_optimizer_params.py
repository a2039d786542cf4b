"""One treatment of MABN's parameters: detectron2's own build_optimizer / get_default_optimizer_params
give MABN2d and BatchRenorm2d parameters what MABNTrainer gives them and what BatchNorm2d's get."""
import importlib
import itertools
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.solver import build as d2_solver_build
from detectron2.solver import build_optimizer  # bound before mabn_d2: it looks the params function up per call
from torch import nn

from mabn_d2 import BatchRenorm2d, MABN2d, add_mabn_config, build_model
from mabn_d2.engine.trainer import MABNTrainer, setup_cfg
from mabn_d2.modeling.cycle import CycleMABNList

from .conftest import REPO_ROOT

DEMO_CONFIG = os.path.join(REPO_ROOT, "configs/Demo/fmnist_mask_rcnn_R_18_FPN_mabn_bnheads.yaml")
SOLVERS = list(itertools.product([0.0, 1e-4], [1.0, 2.0], [None, 0.0]))  # WEIGHT_DECAY_NORM, BIAS_LR_FACTOR, _BIAS
MOVING_AVERAGE = (MABN2d, BatchRenorm2d, CycleMABNList)


def toy_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), MABN2d(4), nn.Conv2d(4, 4, 1, bias=False), BatchRenorm2d(4),
                         nn.Conv2d(4, 4, 1, bias=False), CycleMABNList(2, 4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))


@pytest.fixture(scope="module")
def demo_model():
    return build_model(setup_cfg(DEMO_CONFIG, ["MODEL.DEVICE", "cpu"]))


def solver_cfg(weight_decay_norm, bias_lr_factor, weight_decay_bias):
    cfg = get_cfg()
    add_mabn_config(cfg)
    cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY = 0.02, 5e-4
    cfg.SOLVER.WEIGHT_DECAY_NORM = weight_decay_norm
    cfg.SOLVER.BIAS_LR_FACTOR = bias_lr_factor
    cfg.SOLVER.WEIGHT_DECAY_BIAS = weight_decay_bias
    return cfg


def settings(optimizer):
    """id(param) -> (lr, weight_decay)."""
    return {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def norm_parameters(model, types):
    return [(name, p) for m in model.modules() if isinstance(m, types) for name, p in m.named_parameters(recurse=False)]


def assert_mabn_treated_as_bn(model, cfg):
    stock, trainer = settings(build_optimizer(cfg, model)), settings(MABNTrainer.build_optimizer(cfg, model))
    assert stock == trainer
    bn = {name: stock[id(p)] for name, p in norm_parameters(model, nn.BatchNorm2d)}
    ours = norm_parameters(model, MOVING_AVERAGE)
    assert ours and set(bn) == {"weight", "bias"}
    for name, p in ours:
        assert stock[id(p)] == bn[name], (name, stock[id(p)], bn[name])


@pytest.mark.parametrize("weight_decay_norm, bias_lr_factor, weight_decay_bias", SOLVERS)
def test_stock_build_optimizer_gives_mabn_and_brn_what_bn_gets(weight_decay_norm, bias_lr_factor, weight_decay_bias):
    cfg = solver_cfg(weight_decay_norm, bias_lr_factor, weight_decay_bias)
    model = toy_model()
    assert_mabn_treated_as_bn(model, cfg)
    decay = settings(build_optimizer(cfg, model))
    assert decay[id(model[1].weight)][1] == weight_decay_norm
    assert decay[id(model[0].weight)][1] == cfg.SOLVER.WEIGHT_DECAY  # convolutions keep WEIGHT_DECAY


@pytest.mark.parametrize("weight_decay_norm, bias_lr_factor, weight_decay_bias", SOLVERS[::3])
def test_the_demo_model_trains_alike_under_both_trainers(demo_model, weight_decay_norm, bias_lr_factor,
                                                         weight_decay_bias):
    assert any(isinstance(m, MABN2d) for m in demo_model.modules())
    assert_mabn_treated_as_bn(demo_model, solver_cfg(weight_decay_norm, bias_lr_factor, weight_decay_bias))


def test_lazyconfig_style_call_and_overrides_match_bn():
    """detectron2's model_zoo common/optim.py: get_default_optimizer_params(weight_decay_norm=0.0)."""
    model = toy_model()
    calls = (
        {"weight_decay_norm": 0.0},
        {"weight_decay_norm": 0.0, "overrides": {"weight": {"weight_decay": 0.5}}},
        {"base_lr": 0.1, "weight_decay": 1e-4, "weight_decay_norm": 0.0, "bias_lr_factor": 2.0},
    )
    for kwargs in calls:
        groups = d2_solver_build.get_default_optimizer_params(model, **kwargs)  # what a LazyConfig imports
        found = {id(p): {k: v for k, v in g.items() if k != "params"} for g in groups for p in g["params"]}
        assert found[id(model[1].weight)] == found[id(model[3].weight)] == found[id(model[7].weight)], kwargs
        assert found[id(model[1].bias)] == found[id(model[5].bias)] == found[id(model[7].bias)], kwargs
    assert found[id(model[7].bias)] == {"lr": 0.2, "weight_decay": 0.0}


def test_every_detectron2_binding_is_the_hooked_function():
    hooked = d2_solver_build.get_default_optimizer_params
    assert getattr(hooked, "_mabn_d2_hook", False) and not getattr(hooked.__wrapped__, "_mabn_d2_hook", False)
    assert importlib.import_module("detectron2.solver").get_default_optimizer_params is hooked
