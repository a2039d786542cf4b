"""The shipped configs: every YAML merges, the MABN ones build the paper's layout, the LazyConfig too."""
import functools
import glob
import os

import pytest
import torch
from detectron2.config import LazyConfig
from detectron2.modeling import GeneralizedRCNN
from mabn_d2 import build_model

from mabn_d2.engine.lazy import build_lazy_model
from mabn_d2.engine.trainer import setup_cfg
from mabn_d2.layers import CenteredConv2d, MABN2d

from .conftest import REPO_ROOT

YAMLS = sorted(p for p in glob.glob(os.path.join(REPO_ROOT, "configs", "**", "*.yaml"), recursive=True)
               if not os.path.basename(p).startswith("Base-"))
COCO = os.path.join(REPO_ROOT, "configs", "COCO-InstanceSegmentation")


@pytest.mark.parametrize("path", YAMLS, ids=[os.path.relpath(p, REPO_ROOT) for p in YAMLS])
def test_every_config_merges(path):
    cfg = setup_cfg(path, ["MODEL.DEVICE", "cpu"])
    if "COCO-InstanceSegmentation" in path:
        assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.MODEL.BACKBONE.FREEZE_AT == 0 and cfg.MODEL.MASK_ON
        assert cfg.MODEL.ROI_BOX_HEAD.NUM_CONV == 4 and cfg.MODEL.ROI_BOX_HEAD.NUM_FC == 1
        norms = (cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM, cfg.MODEL.ROI_BOX_HEAD.NORM, cfg.MODEL.ROI_MASK_HEAD.NORM)
        if "_mabn_bnheads_" in os.path.basename(path):
            assert norms == ("MABN", "MABN", "BN", "BN")
        else:
            norm = os.path.basename(path).split("_")[-2].upper().replace("SYNCBN", "SyncBN")
            expected = {"MABN": "MABN", "BN": "BN", "GN": "GN", "SyncBN": "SyncBN"}[norm]
            assert set(norms) == {expected}
        assert cfg.SOLVER.MAX_ITER == (270000 if "_3x_" in path else 180000)


def _mabn_layout(model):
    norms = [m for m in model.modules() if isinstance(m, MABN2d)]
    centered = [m for m in model.modules() if isinstance(m, CenteredConv2d)]
    return len(norms), len(centered)


def _modules(model):
    return [(name, type(m), m.extra_repr()) for name, m in model.named_modules()]


def test_yaml_and_lazy_scratch_configs_build_the_same_mabn_model():
    cfg = setup_cfg(os.path.join(COCO, "mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml"), ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    yaml_model = build_model(cfg)
    lazy = LazyConfig.load(os.path.join(COCO, "mask_rcnn_R_50_FPN_2x_mabn_scratch.py"))
    assert lazy.model._target_ is GeneralizedRCNN  # the detector itself, as in detectron2's LazyConfigs
    assert isinstance(lazy.model.backbone.norm, functools.partial)  # norms as callables
    torch.manual_seed(0)
    lazy_model = build_lazy_model(lazy, device="cpu")  # instantiate, then the MABN pass
    # 53 in the R50 bottom-up, 8 in FPN, 4 in the box head, 4 in the mask head
    assert _mabn_layout(yaml_model) == _mabn_layout(lazy_model) == (69, 69)
    assert lazy.train.max_iter == cfg.SOLVER.MAX_ITER and lazy.dataloader.train.total_batch_size == 16
    assert yaml_model.state_dict().keys() == lazy_model.state_dict().keys()
    # the same modules with the same settings (MABN hyper-parameters included) and the same values
    assert _modules(yaml_model) == _modules(lazy_model)
    lazy_state = lazy_model.state_dict()
    assert all(torch.equal(value, lazy_state[key]) for key, value in yaml_model.state_dict().items())
