"""The norm table: a norm added with one entry is a NORM value for configs, builders, the model pass
and the fold; a cfg section is validated once, and layers built from it do not check it again."""
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.layers import batch_norm as d2_batch_norm
from torch import nn

import mabn_d2
from mabn_d2 import MABN2d, add_mabn_config
from mabn_d2.config import validate_mabn_config
from mabn_d2.deploy.fold import fold_mabn
from mabn_d2.deploy.frozen_config import frozen_config
from mabn_d2.deploy.strict_load import check_state_dict_matches
from mabn_d2.layers import hyperparams, mabn_phase
from mabn_d2.layers.hyperparams import Hyperparameter, check_arguments
from mabn_d2.modeling.registry import norm_build_context, valid_norm_names
from mabn_d2.norms import NormSpec, add_norm, norm_specs, remove_norm

from .conftest import REPO_ROOT

CHECKED = []  # values the toy's one rule has checked


def _positive_float(value):
    CHECKED.append(value)
    return isinstance(value, float) and value > 0.0


TOY_HYPERPARAMETERS = (
    Hyperparameter("eps", 1e-3, _positive_float, "must be a float > 0", "added to the variance"),
)


class ToyNorm(nn.BatchNorm2d):
    """BatchNorm2d whose eps comes from the table: the smallest norm the table holds."""

    def __init__(self, num_features: int, eps: float = 1e-3):
        check_arguments("ToyNorm", TOY_HYPERPARAMETERS, {"eps": eps})  # for direct callers
        super().__init__(num_features, eps=eps)


@pytest.fixture
def toy_norm():
    """NORM "TOYNORM", section MODEL.TOYNORM, folding into FrozenBN: in the table for one test."""
    spec = add_norm(NormSpec("TOYNORM", ToyNorm, "TOYNORM", TOY_HYPERPARAMETERS, fold="FrozenBN"))
    CHECKED.clear()
    try:
        yield spec
    finally:
        remove_norm("TOYNORM")
    assert "TOYNORM" not in valid_norm_names() and all(s.name != "TOYNORM" for s in norm_specs())


def small_cfg(norm="TOYNORM", eps=0.01):
    """An R-18 FPN Mask R-CNN with narrow FPN and heads, NORM `norm` in backbone and FPN: quick on 2 CPU cores."""
    cfg = get_cfg()
    add_mabn_config(cfg)
    cfg.merge_from_file(os.path.join(REPO_ROOT, "configs", "Base-RCNN-FPN.yaml"))
    m = cfg.MODEL
    m.DEVICE, m.WEIGHTS, m.MASK_ON = "cpu", "", True
    m.BACKBONE.FREEZE_AT = 0
    m.RESNETS.DEPTH, m.RESNETS.RES2_OUT_CHANNELS = 18, 64
    m.RESNETS.NORM = m.FPN.NORM = norm
    m.FPN.OUT_CHANNELS = 32
    m.ROI_BOX_HEAD.CONV_DIM, m.ROI_BOX_HEAD.FC_DIM, m.ROI_MASK_HEAD.CONV_DIM = 32, 64, 32
    if norm == "TOYNORM":
        m.TOYNORM.EPS = eps
    return cfg


def of_type(model, cls):
    return {name: m for name, m in model.named_modules() if isinstance(m, cls)}


def test_one_entry_makes_a_norm_of_configs_builders_and_the_fold(toy_norm):
    assert "TOYNORM" in valid_norm_names() and isinstance(d2_batch_norm.get_norm("TOYNORM", 4), ToyNorm)
    cfg = small_cfg(eps=0.01)
    assert dict(get_cfg().MODEL).get("TOYNORM") is None and cfg.MODEL.TOYNORM.EPS == 0.01

    model = mabn_d2.build_model(cfg)
    toys = of_type(model, ToyNorm)
    assert len(toys) == 1 + 4 + 3 * 5 + 8 and all(layer.eps == 0.01 for layer in toys.values())
    assert set(of_type(model, MABN2d)) == set()

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking statistics, so the fold cannot pass by being an identity
        for layer in toys.values():
            layer.running_mean.copy_(torch.randn(layer.num_features, generator=generator))
            layer.running_var.copy_(torch.rand(layer.num_features, generator=generator) + 0.5)
    model.eval()
    folded, report = fold_mabn(model)
    assert not of_type(folded, ToyNorm) and sorted(report.frozen_norms) == sorted(toys)
    assert all(folded.get_submodule(name).eps == 0.01 for name in toys)
    x = torch.randn(1, 3, 64, 64, generator=generator)
    with torch.no_grad():
        expected, got = model.backbone(x), folded.backbone(x)
    for level in expected:
        torch.testing.assert_close(got[level], expected[level], rtol=1e-5, atol=1e-5)

    stock_cfg = frozen_config(cfg, report)
    assert (stock_cfg.MODEL.RESNETS.NORM, stock_cfg.MODEL.FPN.NORM) == ("FrozenBN", "FrozenBN")
    assert "TOYNORM" not in stock_cfg.MODEL
    stock = mabn_d2.build_model(stock_cfg)
    assert len(of_type(stock, FrozenBatchNorm2d)) == len(toys)
    check_state_dict_matches(stock, folded.state_dict(), "folded toy norm")


def test_a_section_is_validated_once_and_named_in_errors(toy_norm):
    cfg = small_cfg(eps=0.02)
    validate_mabn_config(cfg)  # setup_cfg's check
    assert CHECKED == [0.02]
    model = mabn_d2.build_model(cfg)  # the same content: no second check, no check per layer
    assert CHECKED == [0.02] and {layer.eps for layer in of_type(model, ToyNorm).values()} == {0.02}

    cfg.MODEL.TOYNORM.EPS = -1.0
    with pytest.raises(ValueError, match=r"^cfg\.MODEL\.TOYNORM\.EPS must be a float > 0, got -1\.0$"):
        mabn_d2.build_model(cfg)
    with pytest.raises(ValueError, match=r"^ToyNorm: eps must be a float > 0, got 0\.0$"):
        ToyNorm(4, eps=0.0)  # a layer built by hand still checks its arguments
    with pytest.raises(ValueError, match=r"norm_build_context\('TOYNORM'\): eps must be a float > 0"):
        with norm_build_context("TOYNORM", eps=-2.0):
            pass
    with norm_build_context("TOYNORM", eps=0.5):
        assert d2_batch_norm.get_norm("TOYNORM", 3).eps == 0.5


def test_the_table_refuses_colliding_or_broken_entries():
    with pytest.raises(ValueError, match="collides with NORM 'MABN'"):
        add_norm(NormSpec("MABN", ToyNorm, "TOYNORM", TOY_HYPERPARAMETERS))
    with pytest.raises(ValueError, match="collides with NORM 'BRN'"):
        add_norm(NormSpec("TOYNORM", ToyNorm, "BRN", TOY_HYPERPARAMETERS))
    with pytest.raises(ValueError, match="stock detectron2 norm"):
        NormSpec("GN", ToyNorm, "TOYNORM", TOY_HYPERPARAMETERS)
    bad_default = (Hyperparameter("eps", -1.0, _positive_float, "must be a float > 0", ""),)
    with pytest.raises(ValueError, match=r"the default of eps fails its check"):
        NormSpec("TOYNORM", ToyNorm, "TOYNORM", bad_default)
    assert [spec.name for spec in norm_specs()] == ["MABN", "BRN"]


def test_mabn_layers_from_the_cfg_are_not_checked_again(monkeypatch):
    checked = []
    real = hyperparams.failed_check
    monkeypatch.setattr(hyperparams, "failed_check", lambda table, values: checked.append(values) or real(table, values))
    cfg = small_cfg("MABN")
    cfg.MODEL.MABN.BUFFER_SIZE = 4
    model = mabn_d2.build_model(cfg)
    layers = of_type(model, MABN2d)
    assert layers and all(layer.buffer_size == 4 for layer in layers.values())
    assert checked == [], "a layer built from validated values checked them again"
    with pytest.raises(ValueError, match=r"^MABN2d: buffer_size must be an integer >= 1, got 0$"):
        MABN2d(4, buffer_size=0)
    layer = next(iter(layers.values()))
    phase = layer._next_phase()  # what the training step hands both implementations
    assert phase.buffer_size == layer.buffer_size == 4 and mabn_phase(3, 2, 3, 5).buffer_size == 2
