"""Configs, model inspection and inputs shared by the tests of mabn_d2.modeling, and by the fresh
interpreters that tests/test_centering.py and test_registry.py start (`from tests.modeling.helpers import ...`)."""
import collections
import logging

import torch
import torch.nn.functional as F

from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.structures import BitMasks, Boxes, Instances
from mabn_d2 import MABN2d, add_mabn_config

MABN_CFG = dict(BUFFER_SIZE=4, EMA_DECAY=0.9, WARMUP_ITERS=7, RENORM_WARMUP_ITERS=30, RENORM_CLIP=2.5, EPS=1e-3)
MABN_ATTRS = dict(buffer_size=4, ema_decay=0.9, warmup_iters=7, renorm_warmup_iters=30, renorm_clip=2.5, eps=1e-3)
RING_BUFFERS = ("x2_buffer", "gz_buffer")
# R-18 Mask R-CNN FPN with norms everywhere: stem 1, res2 2x2, res3-res5 2x2 + shortcut, FPN 8, box 4, mask 4
R18_FPN_NORMS = 1 + 4 + 3 * 5 + 8 + 4 + 4


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


def small_resnet_cfg(norm, freeze_at):
    cfg = mask_rcnn_cfg(norm, MABN_CFG, small=True)
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    return cfg


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
