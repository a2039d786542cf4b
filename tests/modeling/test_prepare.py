"""mabn_d2.modeling.prepare: the MABN pass over a built model (convolutions feeding MABN centralized,
norms of frozen stages frozen, per-level norms in RetinaNet heads), run by build_model or by hand."""
import pytest
import torch
from torch import nn

import mabn_d2  # noqa: F401  (registers the norms and hooks build_model before it is imported below)
from detectron2.layers import Conv2d, CycleBatchNormList, FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import GeneralizedRCNN, RetinaNet, build_model
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.utils.events import EventStorage
from mabn_d2 import BatchRenorm2d, CenteredConv2d, MABN2d, mabn_build_context, prepare_mabn_model
from mabn_d2.modeling.cycle import CycleMABNList

from .helpers import (
    MABN_ATTRS, RecordWarnings, assert_centralized, assert_same_model, conv_feeding, counts_by_part, detection_batch,
    frozen_stem_res2_cfg, of_type, retinanet_cfg, ring_buffer_keys, seeded, small_resnet_cfg, structure,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def set_training_count(norm, count):
    """Set a norm's training-forward count the supported way: through its state_dict (the
    buffer is a mirror of the host count, written when read or saved)."""
    state = norm.state_dict()
    state["num_batches_tracked"] = torch.tensor(count)
    norm.load_state_dict(state)


# ---------------------------------------------------------------- centralization


def test_exactly_the_convs_feeding_mabn_are_centralized(r50_models):
    model, _ = r50_models
    feeding = {name.rpartition(".")[0] for name in of_type(model, MABN2d)}
    assert set(of_type(model, CenteredConv2d)) == feeding
    assert "proposal_generator.rpn_head.conv" not in feeding  # no norm there: stays a plain conv
    assert type(model.proposal_generator.rpn_head.conv) is Conv2d
    for name in sorted(feeding):
        assert_centralized(model.get_submodule(name))


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


# ---------------------------------------------------------------- the pass and build_model


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


# ---------------------------------------------------------------- frozen stages


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
