"""End to end: stock detectron2 builders (Mask R-CNN, RetinaNet, semantic and Panoptic FPN), trainers
and predictors build MABN models that train and run."""
import numpy as np
import pytest
import torch
from torch import nn

import mabn_d2  # noqa: F401  (registers the norms and hooks build_model before it is imported below)
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from mabn_d2 import CenteredConv2d, MABN2d

from .helpers import (
    MABN_CFG, R18_FPN_NORMS, assert_centralized, assert_same_model, conv_feeding, counts_by_part, detection_batch,
    frozen_stem_res2_cfg, mask_rcnn_cfg, of_type, ring_buffer_keys, seeded, zoo_cfg,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_one_thread_fixture_applies_to_this_module(request):
    assert "one_thread" in request.fixturenames
    assert torch.get_num_threads() == 1


# ---------------------------------------------------------------- Mask R-CNN R50 (build only)


def test_mask_rcnn_r50_fpn_has_mabn_in_every_part(r50_models):
    model, _ = r50_models
    expected = {
        "stem": 1,
        "res2": 3 * 3 + 1,  # 3 bottlenecks x 3 convs + shortcut
        "res3": 4 * 3 + 1,
        "res4": 6 * 3 + 1,
        "res5": 3 * 3 + 1,
        "fpn": 4 + 4,  # lateral + output
        "box_head": 4,
        "mask_head": 4,
    }
    assert counts_by_part(model, MABN2d) == expected
    assert sum(expected.values()) == 53 + 8 + 4 + 4
    assert not of_type(model, nn.modules.batchnorm._NormBase)
    assert not of_type(model, FrozenBatchNorm2d)


def test_state_dict_keys_are_the_bn_models_plus_ring_buffers(r50_models):
    mabn, bn = r50_models
    mabn_sd, bn_sd = mabn.state_dict(), bn.state_dict()
    assert len(ring_buffer_keys(mabn)) == 2 * 69
    assert set(mabn_sd) == set(bn_sd) | ring_buffer_keys(mabn)
    assert not set(bn_sd) & ring_buffer_keys(mabn)
    for key in bn_sd:
        assert mabn_sd[key].shape == bn_sd[key].shape, key


def test_c4_res5_head_uses_mabn():
    cfg = zoo_cfg("COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml")
    model = build_model(cfg)
    counts = counts_by_part(model, MABN2d)
    assert counts["res5"] == 3 * 3 + 1  # the ROI head's res5 stage
    assert {k: v for k, v in counts.items() if k != "res5"} == {"stem": 1, "res2": 10, "res3": 13, "res4": 19}
    for name in of_type(model.roi_heads.res5, MABN2d):
        assert type(conv_feeding(model.roi_heads.res5, name)) is CenteredConv2d


# ---------------------------------------------------------------- small models: training, entry points


def test_small_mask_rcnn_trains_one_step_with_mabn_everywhere():
    model = build_model(mask_rcnn_cfg("MABN", MABN_CFG, small=True))
    model.train()
    with EventStorage(0):
        losses = model(detection_batch(masks=True))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    layers = of_type(model, MABN2d)
    iterations = {name: layer.iteration for name, layer in layers.items()}
    assert all(it == 1 for it in iterations.values()), iterations
    assert all(int(layer.num_batches_tracked) == 1 for layer in layers.values())
    assert model.backbone.bottom_up.stem.conv1.weight.grad is not None


def test_default_trainer_and_predictor_build_with_cfg_values():
    from detectron2.engine import DefaultPredictor, DefaultTrainer

    cfg = mask_rcnn_cfg("MABN", MABN_CFG, small=True)
    for model in (DefaultTrainer.build_model(cfg), DefaultPredictor(cfg).model):
        layers = of_type(model, MABN2d)
        assert len(layers) == R18_FPN_NORMS
        assert all(layer.buffer_size == 4 and layer.eps == 1e-3 for layer in layers.values())
        assert len(of_type(model, CenteredConv2d)) == len(layers)
    predictions = DefaultPredictor(cfg)(np.random.randint(0, 255, (64, 64, 3), dtype=np.uint8))
    assert "instances" in predictions


@pytest.mark.parametrize("arch", ["mask_rcnn", "retinanet"])
def test_stock_build_model_equals_the_trainers_and_the_predictors(arch):
    from detectron2.engine import DefaultPredictor, DefaultTrainer
    from detectron2.modeling import build_model as stock_build_model

    from mabn_d2.engine.trainer import MABNTrainer

    cfg = frozen_stem_res2_cfg(arch)
    stock = seeded(lambda: stock_build_model(cfg))
    assert of_type(stock, CenteredConv2d) and of_type(stock, MABN2d) and of_type(stock, FrozenBatchNorm2d)
    for build in (DefaultTrainer.build_model, MABNTrainer.build_model, lambda c: DefaultPredictor(c).model):
        assert_same_model(stock, seeded(lambda: build(cfg)))


# ---------------------------------------------------------------- semantic FPN, Panoptic FPN


def test_semantic_fpn_head_uses_centralized_mabn_and_trains():
    cfg = zoo_cfg("Misc/semantic_R_50_FPN_1x.yaml", norm="FrozenBN", small=True)
    cfg.MODEL.FPN.NORM = ""
    cfg.MODEL.SEM_SEG_HEAD.NORM = "MABN"
    model = build_model(cfg)
    layers = of_type(model.sem_seg_head, MABN2d)
    assert len(layers) == 1 + 1 + 2 + 3  # p2..p5 -> common stride 4: 1, 1, 2, 3 convs
    assert {n.rpartition(".")[0] for n in layers} == set(of_type(model.sem_seg_head, CenteredConv2d))
    assert type(model.sem_seg_head.predictor) is Conv2d
    for name in layers:
        assert_centralized(conv_feeding(model.sem_seg_head, name))
    model.train()
    with EventStorage(0):
        losses = model(detection_batch(size=64, sem_seg=True))
    sum(losses.values()).backward()
    assert all(layer.iteration == 1 for layer in layers.values())


def test_panoptic_fpn_builds_and_runs_with_mabn_sem_seg_head():
    cfg = zoo_cfg("COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml", norm="MABN", small=True)
    cfg.MODEL.SEM_SEG_HEAD.NORM = "MABN"
    model = build_model(cfg)
    assert type(model).__name__ == "PanopticFPN"
    assert len(of_type(model.sem_seg_head, MABN2d)) == 7
    assert len(of_type(model, CenteredConv2d)) == len(of_type(model, MABN2d))
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": torch.rand(3, 64, 64) * 255, "height": 64, "width": 64}])
    assert {"sem_seg", "instances", "panoptic_seg"} <= set(out)
