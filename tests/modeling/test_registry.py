"""mabn_d2.modeling.registry: the NORM strings in detectron2's get_norm, the hooked build_model and
its bindings, the build contexts and the cfg values they carry, the shared-BN warning filter."""
import importlib
import logging
import os
import sys
import types

import pytest
from torch import nn

import mabn_d2  # noqa: F401  (registers the norms and hooks build_model before it is imported below)
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.config import get_cfg, instantiate
from detectron2.layers import Conv2d, FrozenBatchNorm2d, ShapeSpec
from detectron2.layers import batch_norm as d2_batch_norm
from detectron2.modeling import build_model
from detectron2.modeling.backbone.resnet import BasicStem
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from mabn_d2 import BatchRenorm2d, CenteredConv2d, MABN2d, mabn_build_context, prepare_mabn_model, register_norms
from mabn_d2.modeling import registry
from mabn_d2.modeling.registry import brn_build_context

from .helpers import MABN_ATTRS, R18_FPN_NORMS, RecordWarnings, assert_centralized, mask_rcnn_cfg, of_type

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_a_user_module_keeps_its_build_model_and_the_documented_entry_points_build_mabn():
    from ..conftest import REPO_ROOT

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
        from tests.modeling.helpers import small_resnet_cfg
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


# ---------------------------------------------------------------- cfg values and build contexts


def test_cfg_hyper_parameters_reach_every_mabn_layer(r50_models):
    model, _ = r50_models
    for name, layer in of_type(model, MABN2d).items():
        assert {k: getattr(layer, k) for k in MABN_ATTRS} == MABN_ATTRS, name
        assert layer.x2_buffer.shape == (4, layer.num_features)


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


# ---------------------------------------------------------------- RetinaNet's shared-BN warning


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
