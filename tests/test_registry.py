"""The detectron2 glue: NORM strings, cfg plumbing, and the MABN pass at build (centralization,
frozen stages, per-level RetinaNet statistics), also run by hand."""
import collections
import importlib
import logging
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mabn_d2
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.config import get_cfg, instantiate
from detectron2.layers import Conv2d, CycleBatchNormList, FrozenBatchNorm2d, ShapeSpec
from detectron2.layers import batch_norm as d2_batch_norm
from detectron2.modeling import GeneralizedRCNN, RetinaNet, build_model
from detectron2.modeling.backbone.resnet import BasicStem
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from mabn_d2 import (
    BatchRenorm2d, CenteredConv2d, MABN2d, add_mabn_config, mabn_build_context, prepare_mabn_model, register_norms,
)
from mabn_d2.modeling import registry
from mabn_d2.modeling.cycle import CycleMABNList
from mabn_d2.modeling.registry import brn_build_context, build_context_from_cfg

MABN_CFG = dict(BUFFER_SIZE=4, EMA_DECAY=0.9, WARMUP_ITERS=7, RENORM_WARMUP_ITERS=30, RENORM_CLIP=2.5, EPS=1e-3)
MABN_ATTRS = dict(buffer_size=4, ema_decay=0.9, warmup_iters=7, renorm_warmup_iters=30, renorm_clip=2.5, eps=1e-3)
RING_BUFFERS = ("x2_buffer", "gz_buffer")
# R-18 Mask R-CNN FPN with norms everywhere: stem 1, res2 2x2, res3-res5 2x2 + shortcut, FPN 8, box 4, mask 4
R18_FPN_NORMS = 1 + 4 + 3 * 5 + 8 + 4 + 4


# ---------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: extra intra-op threads only add waiting on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



def zoo_cfg(config_file, norm="MABN", mabn=None, small=False):
    cfg = get_cfg()
    add_mabn_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file(config_file))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.FPN.NORM = norm
    for key, value in (mabn or {}).items():
        cfg.MODEL.MABN[key] = value
    if small:
        cfg.MODEL.RESNETS.DEPTH = 18
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
        cfg.MODEL.FPN.OUT_CHANNELS = 32
        cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 100
        cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
        cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
        cfg.MODEL.ROI_BOX_HEAD.CONV_DIM = 32
        cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
        cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 32
        cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 32
        cfg.MODEL.RETINANET.NUM_CONVS = 2
        cfg.INPUT.MIN_SIZE_TEST = 64
        cfg.INPUT.MAX_SIZE_TEST = 64
    return cfg


def mask_rcnn_cfg(norm="MABN", mabn=None, small=False):
    cfg = zoo_cfg("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", norm, mabn, small)
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_CONV = 4
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 1
    cfg.MODEL.ROI_BOX_HEAD.NORM = norm
    cfg.MODEL.ROI_MASK_HEAD.NORM = norm
    return cfg


def retinanet_cfg(head_norm, mabn=None):
    cfg = zoo_cfg("COCO-Detection/retinanet_R_50_FPN_1x.yaml", norm="FrozenBN", mabn=mabn, small=True)
    cfg.MODEL.FPN.NORM = ""
    cfg.MODEL.RETINANET.NORM = head_norm
    return cfg


def frozen_stem_res2_cfg(arch):
    """Small Mask R-CNN (MABN everywhere) or RetinaNet (MABN head), FREEZE_AT 2, MABN_CFG values."""
    cfg = mask_rcnn_cfg("MABN", MABN_CFG, small=True) if arch == "mask_rcnn" else retinanet_cfg("MABN", MABN_CFG)
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    return cfg


def set_training_count(norm, count):
    """Set a norm's training-forward count the supported way: through its state_dict (the
    buffer is a mirror of the host count, written when read or saved)."""
    state = norm.state_dict()
    state["num_batches_tracked"] = torch.tensor(count)
    norm.load_state_dict(state)


def of_type(model, cls):
    return {name: m for name, m in model.named_modules() if isinstance(m, cls)}


def part_of(name):
    """backbone.bottom_up.res2.0.conv1.norm -> res2; backbone.fpn_lateral2.norm -> fpn; ..."""
    parts = name.split(".")
    if parts[0] != "backbone":
        return parts[1]
    if parts[1].startswith("fpn_"):
        return "fpn"
    return parts[2] if parts[1] == "bottom_up" else parts[1]  # C4 models have no FPN wrapper


def counts_by_part(model, cls):
    return dict(collections.Counter(part_of(name) for name in of_type(model, cls)))


def conv_feeding(model, norm_name):
    """The module that owns the norm named `norm_name` (a Conv2d's `.norm`)."""
    owner, _, attr = norm_name.rpartition(".")
    assert attr == "norm", norm_name
    return model.get_submodule(owner)


def ring_buffer_keys(model):
    return {f"{name}.{buf}" for name in of_type(model, MABN2d) for buf in RING_BUFFERS}


def assert_centralized(conv):
    """conv(x) equals F.conv2d with W - mean(W) per output channel (then its norm/activation), not with W."""
    conv.eval()
    x = torch.randn(1, conv.in_channels, 6, 6)
    w = conv.weight.detach()

    def reference(weight):
        y = F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        if getattr(conv, "norm", None) is not None:
            y = conv.norm(y)
        if getattr(conv, "activation", None) is not None:
            y = conv.activation(y)
        return y

    with torch.no_grad():
        out = conv(x)
        torch.testing.assert_close(out, reference(w - w.mean(dim=(1, 2, 3), keepdim=True)), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(out, reference(w), rtol=1e-3, atol=1e-4)


def structure(model):
    """Every module's name, class and settings (hyper-parameters, shapes), in order."""
    return [(name, type(m), m.extra_repr()) for name, m in model.named_modules()]


def assert_same_model(a, b):
    """Same modules (class, settings) under the same names and the same state, value for value."""
    assert structure(a) == structure(b)
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert list(sd_a) == list(sd_b)
    for key in sd_a:
        assert torch.equal(sd_a[key], sd_b[key]), key
    assert [p.requires_grad for p in a.parameters()] == [p.requires_grad for p in b.parameters()]


def seeded(build, seed=0):
    torch.manual_seed(seed)
    return build()


def detection_batch(size=64, n=2, masks=False, sem_seg=False):
    batch = []
    for _ in range(n):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[8.0, 10.0, 40.0, 50.0], [20.0, 4.0, 60.0, 30.0]]))
        inst.gt_classes = torch.tensor([1, 3])
        if masks:
            bitmasks = torch.zeros(2, size, size, dtype=torch.bool)
            bitmasks[0, 10:50, 8:40] = True
            bitmasks[1, 4:30, 20:60] = True
            inst.gt_masks = BitMasks(bitmasks)
        item = {"image": torch.rand(3, size, size) * 255, "instances": inst, "height": size, "width": size}
        if sem_seg:
            item["sem_seg"] = torch.randint(0, 5, (size, size))
        batch.append(item)
    return batch


class RecordWarnings(logging.Handler):
    def __init__(self, logger_name):
        super().__init__(level=logging.WARNING)
        self.logger = logging.getLogger(logger_name)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self._level = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self._level)


# ---------------------------------------------------------------- get_norm / build_model bindings

GET_NORM_BINDERS = [
    "detectron2.layers",
    "detectron2.layers.batch_norm",
    "detectron2.layers.blocks",
    "detectron2.layers.aspp",
    "detectron2.modeling.backbone.resnet",
    "detectron2.modeling.backbone.fpn",
    "detectron2.modeling.backbone.regnet",
    "detectron2.modeling.backbone.vit",
    "detectron2.modeling.roi_heads.box_head",
    "detectron2.modeling.roi_heads.mask_head",
    "detectron2.modeling.meta_arch.retinanet",
    "detectron2.modeling.meta_arch.semantic_seg",
    "detectron2.projects.deeplab.semantic_seg",
    "detectron2.projects.deeplab.resnet",
]
BUILD_MODEL_BINDERS = [
    "detectron2.modeling",
    "detectron2.modeling.meta_arch",
    "detectron2.modeling.meta_arch.build",
    "detectron2.engine.defaults",
    "detectron2.model_zoo.model_zoo",
]


@pytest.mark.parametrize("module_name", GET_NORM_BINDERS)
def test_every_get_norm_binding_knows_the_new_names(module_name):
    get_norm = importlib.import_module(module_name).get_norm
    assert get_norm is d2_batch_norm.get_norm
    assert isinstance(get_norm("MABN", 8), MABN2d)
    assert isinstance(get_norm("BRN", 8), BatchRenorm2d)


@pytest.mark.parametrize("module_name", BUILD_MODEL_BINDERS)
def test_every_build_model_binding_is_the_hooked_one(module_name):
    fn = importlib.import_module(module_name).build_model
    assert fn is build_model
    assert getattr(fn, "_mabn_d2_hook", False)
    assert not getattr(fn.__wrapped__, "_mabn_d2_hook", False)


@pytest.mark.parametrize(
    "norm",
    ["BN", "GN", "FrozenBN", "SyncBN", "nnSyncBN", "naiveSyncBN", "LN", "", None, lambda c: nn.InstanceNorm2d(c)],
)
def test_other_norms_behave_as_the_original_get_norm(norm):
    original = d2_batch_norm.get_norm.__wrapped__
    assert not getattr(original, "_mabn_d2_hook", False)
    ours, theirs = d2_batch_norm.get_norm(norm, 32), original(norm, 32)
    assert type(ours) is type(theirs)
    if theirs is not None:
        assert ours.state_dict().keys() == theirs.state_dict().keys()


def test_unknown_norm_string_fails_naming_the_valid_ones():
    with pytest.raises(KeyError):
        d2_batch_norm.get_norm.__wrapped__("NoSuchNorm", 8)
    with pytest.raises(ValueError, match="unknown NORM 'NoSuchNorm'; valid names: .*BN.*MABN"):
        d2_batch_norm.get_norm("NoSuchNorm", 8)


def test_register_norms_is_idempotent():
    hooks = lambda: (  # noqa: E731
        d2_batch_norm.get_norm,
        build_model,
        importlib.import_module("detectron2.modeling").build_model,
        importlib.import_module("detectron2.solver.build").get_default_optimizer_params,
    )
    before = hooks()
    register_norms()
    register_norms()
    assert hooks() == before
    for fn in before:
        assert getattr(fn, "_mabn_d2_hook", False)
        assert not getattr(fn.__wrapped__, "_mabn_d2_hook", False)  # wrapped once, not twice


def test_only_get_norm_build_model_and_the_optimizer_params_are_wrapped():
    untouched = (
        Conv2d.__init__,
        FrozenBatchNorm2d.__dict__["convert_frozen_batchnorm"].__func__,
        RetinaNetHead.__init__,
        RetinaNetHead.__init__.__wrapped__,  # the __init__ under @configurable
    )
    for fn in untouched:
        assert not registry._is_hooked(fn), fn
        assert fn.__module__.startswith("detectron2."), fn
    stem = BasicStem(3, 8, norm="MABN")  # outside build_model: detectron2's modules as they are
    assert type(stem.conv1) is Conv2d and isinstance(stem.conv1.norm, MABN2d)
    assert prepare_mabn_model(stem) is stem and type(stem.conv1) is CenteredConv2d


def test_get_norm_rebinding_touches_only_detectron2_modules(monkeypatch):
    original_get_norm = d2_batch_norm.get_norm.__wrapped__
    original_build = build_model.__wrapped__
    outside = types.ModuleType("mabn_d2_test_outside_detectron2")
    inside = types.ModuleType("detectron2.mabn_d2_test_inside")
    project = types.ModuleType("detectron2.projects.mabn_d2_test_project")
    for module in (outside, inside, project):
        module.get_norm, module.build_model = original_get_norm, original_build
        monkeypatch.setitem(sys.modules, module.__name__, module)
    register_norms()
    assert outside.get_norm is original_get_norm  # other packages keep what they imported
    assert inside.get_norm is project.get_norm is d2_batch_norm.get_norm
    # build_model too is re-pointed inside detectron2 only; a user's module keeps its own reference
    assert outside.build_model is original_build
    assert inside.build_model is project.build_model is build_model


# ---------------------------------------------------------------- Mask R-CNN R50-FPN (build only)


@pytest.fixture(scope="module")
def r50_models():
    mabn = build_model(mask_rcnn_cfg("MABN", MABN_CFG))
    bn = build_model(mask_rcnn_cfg("BN"))
    return mabn, bn


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


def test_exactly_the_convs_feeding_mabn_are_centralized(r50_models):
    model, _ = r50_models
    feeding = {name.rpartition(".")[0] for name in of_type(model, MABN2d)}
    assert set(of_type(model, CenteredConv2d)) == feeding
    assert "proposal_generator.rpn_head.conv" not in feeding  # no norm there: stays a plain conv
    assert type(model.proposal_generator.rpn_head.conv) is Conv2d
    for name in sorted(feeding):
        assert_centralized(model.get_submodule(name))


def test_cfg_hyper_parameters_reach_every_mabn_layer(r50_models):
    model, _ = r50_models
    for name, layer in of_type(model, MABN2d).items():
        assert {k: getattr(layer, k) for k in MABN_ATTRS} == MABN_ATTRS, name
        assert layer.x2_buffer.shape == (4, layer.num_features)


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


@pytest.mark.parametrize("arch", ["mask_rcnn", "retinanet"])
def test_hand_built_model_and_the_pass_equal_the_built_one(arch):
    cfg = frozen_stem_res2_cfg(arch)
    meta_arch = GeneralizedRCNN if arch == "mask_rcnn" else RetinaNet
    built = seeded(lambda: build_model(cfg))
    with mabn_build_context(**MABN_ATTRS):
        by_hand = seeded(lambda: meta_arch(cfg))
    # detectron2 alone: MABN layers, but no MABN-specific step
    assert of_type(by_hand, MABN2d) and not of_type(by_hand, CenteredConv2d) and not of_type(by_hand, CycleMABNList)
    if arch == "mask_rcnn":
        assert of_type(by_hand.backbone.bottom_up.stem, MABN2d)  # frozen, yet not converted
    assert prepare_mabn_model(by_hand) is by_hand
    assert_same_model(built, by_hand)


@pytest.mark.parametrize("arch", ["mask_rcnn", "retinanet"])
def test_the_pass_is_idempotent(arch):
    cfg = frozen_stem_res2_cfg(arch)
    model = build_model(cfg)
    assert of_type(model, CenteredConv2d) and of_type(model, FrozenBatchNorm2d)
    if arch == "retinanet":
        assert of_type(model.head, CycleMABNList)
    modules = [(name, id(m)) for name, m in model.named_modules()]
    before = structure(model), {k: v.clone() for k, v in model.state_dict().items()}
    assert prepare_mabn_model(prepare_mabn_model(model)) is model
    assert [(name, id(m)) for name, m in model.named_modules()] == modules
    assert structure(model) == before[0]
    state = model.state_dict()
    assert list(state) == list(before[1]) and all(torch.equal(state[k], v) for k, v in before[1].items())


@pytest.mark.parametrize("arch", ["mask_rcnn", "retinanet"])
def test_modules_the_pass_creates_live_on_the_models_device(arch):
    """build_model moves the model to MODEL.DEVICE before the pass; "meta" shows where new tensors go."""
    cfg = frozen_stem_res2_cfg(arch)
    cfg.MODEL.DEVICE = "meta"
    model = build_model(cfg)
    assert of_type(model, FrozenBatchNorm2d) and (arch == "mask_rcnn" or of_type(model, CycleMABNList))
    assert {t.device.type for t in list(model.parameters()) + list(model.buffers())} == {"meta"}


def test_cfg_without_mabn_section_uses_defaults_or_the_enclosing_context():
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS, cfg.MODEL.FPN.OUT_CHANNELS = 18, 64, 32
    cfg.MODEL.RESNETS.NORM = "MABN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    assert "MABN" not in cfg.MODEL
    stem_norm = build_model(cfg).backbone.bottom_up.stem.conv1.norm
    assert (stem_norm.buffer_size, stem_norm.ema_decay) == (16, 0.98)
    with mabn_build_context(buffer_size=5):
        stem_norm = build_model(cfg).backbone.bottom_up.stem.conv1.norm
    assert stem_norm.buffer_size == 5


@pytest.mark.parametrize(
    "section, key, value", [("MABN", "EMA_DECAY", 1.5), ("MABN", "BUFFER_SIZE", 0), ("BRN", "R_MAX", 0.5)]
)
def test_build_model_rejects_bad_cfg_values_naming_the_key(section, key, value):
    cfg = mask_rcnn_cfg("MABN", small=True)
    cfg.MODEL[section][key] = value
    with pytest.raises(ValueError, match=f"cfg.MODEL.{section}.{key}"):
        build_model(cfg)


def test_brn_cfg_reaches_batch_renorm_layers_and_leaves_convs_plain():
    cfg = mask_rcnn_cfg("BRN", small=True)
    cfg.MODEL.BRN.R_MAX, cfg.MODEL.BRN.WARMUP_ITERS = 2.0, 11
    model = build_model(cfg)
    layers = of_type(model, BatchRenorm2d)
    assert len(layers) == R18_FPN_NORMS and all(l.r_max == 2.0 and l.warmup_iters == 11 for l in layers.values())
    assert not of_type(model, CenteredConv2d) and not of_type(model, MABN2d)


# ---------------------------------------------------------------- hand-built models, contexts


def test_hand_built_modules_are_centralized_by_the_pass_and_follow_the_context():
    assert type(prepare_mabn_model(BasicStem(3, 8, norm="BN")).conv1) is Conv2d
    stem = prepare_mabn_model(BasicStem(3, 8, norm="MABN"))
    assert type(stem.conv1) is CenteredConv2d
    assert_centralized(stem.conv1)
    assert stem.conv1.norm.buffer_size == 16  # outside a context: the layer defaults
    with mabn_build_context(buffer_size=3, ema_decay=0.5):
        with mabn_build_context(ema_decay=0.7):  # nested: overrides key by key
            inner = BasicStem(3, 8, norm="MABN").conv1.norm
        outer_stem = instantiate(L(prepare_mabn_model)(model=L(BasicStem)(in_channels=3, out_channels=8, norm="MABN")))
        outer = outer_stem.conv1.norm
    assert type(outer_stem.conv1) is CenteredConv2d
    assert (inner.buffer_size, inner.ema_decay) == (3, 0.7)
    assert (outer.buffer_size, outer.ema_decay) == (3, 0.5)
    assert BasicStem(3, 8, norm="MABN").conv1.norm.ema_decay == 0.98
    with brn_build_context(r_max=1.5):
        assert d2_batch_norm.get_norm("BRN", 4).r_max == 1.5
    assert d2_batch_norm.get_norm("BRN", 4).r_max == 3.0


def test_plain_conv_with_mabn_norm_is_centralized_by_the_pass():
    conv = Conv2d(4, 6, kernel_size=3, padding=1, norm=MABN2d(6))
    assert type(conv) is Conv2d
    assert prepare_mabn_model(conv) is conv
    assert type(conv) is CenteredConv2d
    assert_centralized(conv)
    per_level = Conv2d(4, 6, kernel_size=3, padding=1, norm=CycleMABNList(2, 6))
    assert type(prepare_mabn_model(per_level)) is CenteredConv2d
    assert type(prepare_mabn_model(Conv2d(4, 6, kernel_size=3, norm=BatchRenorm2d(6)))) is Conv2d
    assert type(prepare_mabn_model(Conv2d(4, 6, kernel_size=3, norm=nn.BatchNorm2d(6)))) is Conv2d


def test_conv_subclass_feeding_mabn_is_left_alone_with_a_warning():
    class OwnConv(Conv2d):
        pass

    conv = OwnConv(4, 6, kernel_size=3, norm=MABN2d(6))
    with RecordWarnings("mabn_d2.modeling.prepare") as records:
        prepare_mabn_model(nn.Sequential(conv))
    assert type(conv) is OwnConv
    assert len(records.messages) == 1 and "0 (OwnConv) feeds an MABN layer" in records.messages[0]


def test_build_contexts_reject_unknown_or_bad_arguments():
    with pytest.raises(TypeError, match="buffer_sise"):
        with mabn_build_context(buffer_sise=3):
            pass
    with pytest.raises(ValueError, match="ema_decay"):
        with mabn_build_context(ema_decay=1.5):
            pass
    with pytest.raises(ValueError, match="r_max"):
        with brn_build_context(r_max=0.5):
            pass


# ---------------------------------------------------------------- frozen stages


def small_resnet_cfg(norm, freeze_at):
    cfg = mask_rcnn_cfg(norm, MABN_CFG, small=True)
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    return cfg


def stem_res2(bottom_up, x):
    return bottom_up.res2(bottom_up.stem(x))


def test_freeze_at_2_turns_mabn_into_frozen_bn_and_keeps_centralized_convs():
    model = build_model(small_resnet_cfg("MABN", 2))
    bottom_up = model.backbone.bottom_up
    frozen = {**of_type(bottom_up.stem, FrozenBatchNorm2d), **of_type(bottom_up.res2, FrozenBatchNorm2d)}
    assert len(frozen) == 1 + 4  # stem + 2 basic blocks x 2 convs
    assert not of_type(bottom_up.stem, MABN2d) and not of_type(bottom_up.res2, MABN2d)
    assert counts_by_part(model, MABN2d)["res3"] == 5
    for name, norm in of_type(bottom_up.res2, FrozenBatchNorm2d).items():
        assert type(conv_feeding(bottom_up.res2, name)) is CenteredConv2d
        assert norm.eps == 1e-3
    assert type(bottom_up.stem.conv1) is CenteredConv2d
    assert all(not p.requires_grad for p in bottom_up.res2.parameters())

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        bottom_up.train()
        train_out = stem_res2(bottom_up, x)
        bottom_up.eval()
        eval_out = stem_res2(bottom_up, x)
    assert torch.equal(train_out, eval_out)

    # Control: a live MABN differs between modes. Eval first, since the first training iteration
    # sets running_var to the statistic it used, which would make eval match train on this x.
    unfrozen = build_model(small_resnet_cfg("MABN", 0)).backbone.bottom_up
    with torch.no_grad():
        unfrozen.eval()
        eval_out = stem_res2(unfrozen, x)
        unfrozen.train()
        train_out = stem_res2(unfrozen, x)
    assert not torch.allclose(train_out, eval_out)


def test_freezing_keeps_mabn_statistics_and_eval_function():
    bottom_up = build_model(small_resnet_cfg("MABN", 0)).backbone.bottom_up
    torch.manual_seed(0)
    values = {}
    for part in ("stem", "res2"):
        for name, layer in of_type(getattr(bottom_up, part), MABN2d).items():
            with torch.no_grad():
                layer.running_var.uniform_(0.5, 2.0)
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-0.5, 0.5)
            set_training_count(layer, 7)
            values[(part, name)] = {k: getattr(layer, k).detach().clone() for k in ("running_var", "weight", "bias")}
    x = torch.randn(2, 3, 32, 32)
    bottom_up.eval()
    with torch.no_grad():
        before = stem_res2(bottom_up, x)
        bottom_up.freeze(2)
        assert len(of_type(bottom_up.res2, MABN2d)) == 4  # detectron2 only marks them frozen
        assert prepare_mabn_model(bottom_up) is bottom_up
        after = stem_res2(bottom_up, x)
    assert {part: len(of_type(getattr(bottom_up, part), MABN2d)) for part in ("stem", "res2", "res3")} == {
        "stem": 0, "res2": 0, "res3": 5
    }
    torch.testing.assert_close(after, before)
    for (part, name), expected in values.items():
        frozen = getattr(bottom_up, part).get_submodule(name)
        assert type(frozen) is FrozenBatchNorm2d
        for key, value in expected.items():
            assert torch.equal(getattr(frozen, key), value), (part, name, key)
        assert torch.equal(frozen.running_mean, torch.zeros_like(frozen.running_mean))
        assert frozen.eps == 1e-3 and int(frozen.num_batches_tracked) == 7


def test_frozen_model_state_dict_keys_match_frozen_bn_model():
    mabn = build_model(small_resnet_cfg("MABN", 2))
    bn = build_model(small_resnet_cfg("BN", 2))
    ring = ring_buffer_keys(mabn)
    assert not any(".stem." in k or ".res2." in k for k in ring)
    assert set(mabn.state_dict()) == set(bn.state_dict()) | ring


@pytest.mark.parametrize("norm_class", [MABN2d, BatchRenorm2d])
def test_the_pass_freezes_mabn_and_brn_whose_parameters_are_frozen(norm_class):
    torch.manual_seed(0)
    norm = norm_class(6, eps=1e-3)
    with torch.no_grad():
        norm.running_var.uniform_(0.5, 2.0)
        if norm_class is BatchRenorm2d:
            norm.running_mean.uniform_(-1.0, 1.0)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    set_training_count(norm, 5)
    x = torch.randn(2, 6, 5, 5)
    expected = norm.eval()(x)
    trainable = nn.Sequential(norm)
    assert prepare_mabn_model(trainable)[0] is norm  # trainable: left as it is
    norm.requires_grad_(False)  # what ResNet.freeze does to a frozen stage
    assert FrozenBatchNorm2d.convert_frozen_batchnorm(nn.Sequential(norm))[0] is norm  # detectron2 alone
    frozen = prepare_mabn_model(nn.Sequential(norm))[0]
    assert type(frozen) is FrozenBatchNorm2d
    torch.testing.assert_close(frozen(x), expected)
    assert torch.equal(frozen.running_mean, norm.running_mean)
    assert frozen.eps == 1e-3 and int(frozen.num_batches_tracked) == 5
    bare = prepare_mabn_model(norm)  # the norm itself: returned as its replacement
    assert type(bare) is FrozenBatchNorm2d
    torch.testing.assert_close(bare(x), expected)


# ---------------------------------------------------------------- RetinaNet


@pytest.mark.parametrize("head_norm, level_class", [("MABN", MABN2d), ("BRN", BatchRenorm2d)])
def test_retinanet_keeps_per_level_statistics_without_warning(head_norm, level_class):
    with RecordWarnings("detectron2.modeling.meta_arch.retinanet") as records:
        model = build_model(retinanet_cfg(head_norm))
    assert records.messages == []
    head = model.head
    lists = [m for m in list(head.cls_subnet) + list(head.bbox_subnet) if isinstance(m, CycleMABNList)]
    assert len(lists) == 2 * 2  # NUM_CONVS per subnet
    levels = len(model.head_in_features)
    assert levels == 5
    for norm_list in lists:
        assert len(norm_list) == levels and all(type(m) is level_class for m in norm_list)

    convs = [head.cls_subnet[i] for i in (0, 3)] + [head.bbox_subnet[i] for i in (0, 3)]
    if head_norm == "MABN":
        for conv in convs:
            assert type(conv) is CenteredConv2d
            assert_centralized(conv)
    else:
        assert all(type(conv) is nn.Conv2d for conv in convs)

    model.train()
    with EventStorage(0):
        losses = model(detection_batch(size=128))
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for norm_list in lists:
        assert [int(m.num_batches_tracked) for m in norm_list] == [1] * levels
        assert [m._iteration for m in norm_list] == [1] * levels
        assert norm_list._pos == 0
        assert norm_list.weight.grad is not None
    if head_norm == "MABN":
        slot = 1 % MABN2d(1).buffer_size
        per_level = torch.stack([m.x2_buffer[slot] for m in lists[0]])
        assert not torch.allclose(per_level[0], per_level[-1])  # each level its own statistics
    model.eval()
    with torch.no_grad():
        model([{"image": torch.rand(3, 64, 64) * 255}])


def test_retinanet_state_dict_keys_match_cycle_batchnorm_model():
    mabn = build_model(retinanet_cfg("MABN"))
    bn = build_model(retinanet_cfg("BN"))
    assert isinstance(bn.head.cls_subnet[1], CycleBatchNormList)
    ring = ring_buffer_keys(mabn)
    assert len(ring) == 2 * 2 * 2 * 5  # ring buffers x subnets x NUM_CONVS x levels
    assert set(mabn.state_dict()) == set(bn.state_dict()) | ring
    assert "head.cls_subnet.1.weight" in bn.state_dict() and "head.cls_subnet.1.4.running_var" in bn.state_dict()


def test_retinanet_levels_come_from_the_features_the_detector_feeds_its_head():
    cfg = retinanet_cfg("MABN")
    cfg.MODEL.RETINANET.IN_FEATURES = ["p3", "p4", "p5"]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = cfg.MODEL.ANCHOR_GENERATOR.SIZES[:3]
    model = build_model(cfg)
    assert len(model.head_in_features) == 3
    lists = of_type(model.head, CycleMABNList)
    assert len(lists) == 4 and all(len(norm_list) == 3 for norm_list in lists.values())


def test_a_bare_retinanet_head_is_prepared_per_level():
    shapes = [ShapeSpec(channels=8, stride=s) for s in (8, 16, 32)]
    head = RetinaNetHead(input_shape=shapes, num_classes=3, num_anchors=9, conv_dims=[8, 8], norm="MABN")
    assert isinstance(head.cls_subnet[1], MABN2d)  # shared by the levels until the pass
    prepare_mabn_model(head)
    for subnet in (head.cls_subnet, head.bbox_subnet):
        assert [type(m) for m in subnet] == [CenteredConv2d, CycleMABNList, nn.ReLU] * 2
        assert all(len(subnet[i]) == 3 for i in (1, 4))


def test_only_the_per_level_norms_shared_bn_warning_is_dropped_during_build():
    class SharedBN(nn.BatchNorm2d):
        pass

    shapes = [ShapeSpec(channels=8, stride=s) for s in (8, 16)]

    def head(norm):
        return RetinaNetHead(input_shape=shapes, num_classes=3, num_anchors=9, conv_dims=[8], norm=norm)

    with RecordWarnings("detectron2.modeling.meta_arch.retinanet") as records:
        head("MABN")
    assert len(records.messages) == 1 and "MABN2d" in records.messages[0]  # detectron2 alone warns
    with RecordWarnings("detectron2.modeling.meta_arch.retinanet") as records:
        with registry._per_level_norm_warning_dropped():
            head("MABN")
            head(lambda c: SharedBN(c))
    assert len(records.messages) == 1 and "SharedBN" in records.messages[0]
    assert not logging.getLogger("detectron2.modeling.meta_arch.retinanet").filters


def test_warning_capture_sees_the_shared_bn_warning():
    """Control for the no-warning assertion: a BN-named norm that is not per-level still warns."""

    class SharedBN(nn.BatchNorm2d):
        pass

    cfg = retinanet_cfg("")
    model = build_model(cfg)
    shapes = [model.backbone.output_shape()[f] for f in model.head_in_features]
    with RecordWarnings("detectron2.modeling.meta_arch.retinanet") as records:
        RetinaNetHead(input_shape=shapes, num_classes=3, num_anchors=9, conv_dims=[32], norm=lambda c: SharedBN(c))
    assert any("Shared BatchNorm" in m for m in records.messages)


def test_cycle_mabn_list_from_shared_copies_settings_state_and_affine():
    shared = MABN2d(4, buffer_size=3, ema_decay=0.5, eps=1e-3)
    with torch.no_grad():
        shared.weight.fill_(2.0)
        shared.bias.fill_(-1.0)
        shared.running_var.fill_(3.0)
    levels = CycleMABNList.from_shared(shared, 3)
    assert len(levels) == 3 and len({id(m) for m in levels}) == 3 and all(m is not shared for m in levels)
    for level in levels:
        assert (level.buffer_size, level.ema_decay, level.eps) == (3, 0.5, 1e-3)
        assert torch.equal(level.running_var, shared.running_var)
        assert torch.equal(level.weight, torch.ones(4)) and not isinstance(level.weight, nn.Parameter)
    assert torch.equal(levels.weight, shared.weight) and torch.equal(levels.bias, shared.bias)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(levels.eval()(x), shared.eval()(x))


def test_cycle_mabn_list_matches_one_mabn_per_level():
    torch.manual_seed(0)
    cycle = CycleMABNList(2, 4, buffer_size=2)
    with torch.no_grad():
        cycle.weight.uniform_(0.5, 1.5)
        cycle.bias.uniform_(-0.5, 0.5)
    refs = [MABN2d(4, buffer_size=2) for _ in range(2)]
    for ref in refs:
        ref.weight.data.copy_(cycle.weight.data)
        ref.bias.data.copy_(cycle.bias.data)
    assert set(cycle.state_dict()) == {"weight", "bias"} | {
        f"{i}.{k}" for i in range(2) for k in ("running_mean", "running_var", "num_batches_tracked") + RING_BUFFERS
    }
    for _ in range(3):
        for level in range(2):
            x = torch.randn(2, 4, 3, 3, requires_grad=True)
            x_ref = x.detach().clone().requires_grad_()
            y, y_ref = cycle(x), refs[level](x_ref)
            torch.testing.assert_close(y, y_ref)
            dy = torch.randn_like(y)
            y.backward(dy)
            y_ref.backward(dy)
            torch.testing.assert_close(x.grad, x_ref.grad)
    for level, ref in enumerate(refs):
        torch.testing.assert_close(cycle[level].running_var, ref.running_var)
        torch.testing.assert_close(cycle[level].gz_buffer, ref.gz_buffer)


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


def test_a_user_module_keeps_its_build_model_and_the_documented_entry_points_build_mabn():
    from .conftest import REPO_ROOT

    """In a fresh interpreter: a reference taken before `import mabn_d2` is not swapped."""
    import subprocess
    import textwrap

    program = textwrap.dedent("""
        import detectron2.modeling
        from detectron2.modeling import build_model as users_build_model
        original = detectron2.modeling.build_model
        import mabn_d2
        from mabn_d2.engine.trainer import MABNTrainer
        from mabn_d2.layers import CenteredConv2d, MABN2d
        from tests.test_registry import small_resnet_cfg
        assert users_build_model is original, "a user's reference was swapped"
        assert not getattr(users_build_model, "_mabn_d2_hook", False)
        for build in (mabn_d2.build_model, MABNTrainer.build_model, detectron2.modeling.build_model):
            model = build(small_resnet_cfg("MABN", 0))
            stem = model.backbone.bottom_up.stem
            assert isinstance(stem.conv1.norm, MABN2d) and type(stem.conv1) is CenteredConv2d, build
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
