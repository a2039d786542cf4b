"""Folding MABN into frozen affine layers and fused convolutions; the deployment tool around it.

Layer math is checked in float64 against the formula; whole models (a tiny Mask R-CNN and
RetinaNet trained a few steps, so running_var != 1) against their eval-mode originals with the
tolerances of `mabn_d2.deploy.verify.TOLERANCES`; the tool's outputs in a process that never imports
mabn_d2.
"""
import importlib.util
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import Conv2d, CycleBatchNormList, FrozenBatchNorm2d
from mabn_d2 import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

import mabn_d2  # noqa: F401  (registers "MABN")
from mabn_d2.config import add_mabn_config
from mabn_d2.modeling.cycle import CycleMABNList
from mabn_d2.deploy import ExportError
from mabn_d2.deploy.export_formats import ONNXRUNTIME_TOLERANCES, export_onnx, export_torchscript
from mabn_d2.deploy.frozen_config import frozen_config, mabn_norm_keys
from mabn_d2.deploy.output_dir import check_output_dir, staged_output_dir
from mabn_d2.deploy.pipeline import fold_checkpoint
from mabn_d2.deploy.strict_load import check_state_dict_matches
from mabn_d2.deploy.verify import TOLERANCES, compare_predictions, raw_predictions
from mabn_d2.deploy.fold import fold_affine_into_conv, fold_mabn, mabn_to_affine
from mabn_d2.layers import CenteredConv2d, MABN2d, centered_weight

REPO = Path(__file__).resolve().parents[2]
F64 = dict(rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- helpers


def _randomize_(norm: MABN2d, generator: torch.Generator) -> MABN2d:
    """Trained-looking statistics and affine, so no folding step can pass by being an identity."""
    with torch.no_grad():
        c = norm.num_features
        norm.running_var.copy_(torch.rand(c, generator=generator, dtype=torch.float64) * 3 + 0.1)
        norm.weight.copy_(torch.randn(c, generator=generator, dtype=torch.float64))
        norm.bias.copy_(torch.randn(c, generator=generator, dtype=torch.float64))
    return norm


def _conv_mabn(generator, in_ch=4, out_ch=6, groups=1, bias=False) -> CenteredConv2d:
    conv = CenteredConv2d(in_ch, out_ch, 3, padding=1, groups=groups, bias=bias, norm=MABN2d(out_ch))
    conv.double()
    _randomize_(conv.norm, generator)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator, dtype=torch.float64) + 0.3)
    return conv.eval()


def _formula(conv: CenteredConv2d, x: torch.Tensor) -> torch.Tensor:
    """weight * conv(x, W - mean W) / sqrt(running_var + eps) + bias, written out."""
    norm = conv.norm
    w = conv.weight - conv.weight.mean(dim=(1, 2, 3), keepdim=True)
    z = nn.functional.conv2d(x, w, conv.bias, padding=1, groups=conv.groups)
    view = (1, -1, 1, 1)
    return norm.weight.view(view) * z / torch.sqrt(norm.running_var.view(view) + norm.eps) + norm.bias.view(view)


def tiny_cfg(norm: str = "MABN", arch: str = "GeneralizedRCNN"):
    """R-18 FPN with 32-channel FPN/heads and few proposals: quick on 2 CPU cores."""
    cfg = get_cfg()
    add_mabn_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "Base-RCNN-FPN.yaml"))
    m = cfg.MODEL
    m.DEVICE = "cpu"
    m.META_ARCHITECTURE = arch
    m.MASK_ON = arch == "GeneralizedRCNN"
    m.BACKBONE.FREEZE_AT = 0
    m.RESNETS.DEPTH, m.RESNETS.RES2_OUT_CHANNELS, m.RESNETS.NORM = 18, 64, norm
    m.FPN.OUT_CHANNELS, m.FPN.NORM = 32, norm
    m.ROI_HEADS.NUM_CLASSES, m.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 3, 32
    m.ROI_BOX_HEAD.NUM_CONV, m.ROI_BOX_HEAD.CONV_DIM, m.ROI_BOX_HEAD.NUM_FC, m.ROI_BOX_HEAD.FC_DIM = 2, 32, 1, 64
    m.ROI_BOX_HEAD.NORM = norm
    m.ROI_MASK_HEAD.NUM_CONV, m.ROI_MASK_HEAD.CONV_DIM, m.ROI_MASK_HEAD.NORM = 2, 32, norm
    m.RPN.PRE_NMS_TOPK_TRAIN, m.RPN.POST_NMS_TOPK_TRAIN = 200, 100
    m.RPN.PRE_NMS_TOPK_TEST, m.RPN.POST_NMS_TOPK_TEST = 200, 50
    m.RETINANET.NUM_CLASSES, m.RETINANET.NUM_CONVS, m.RETINANET.NORM = 3, 2, norm
    m.RETINANET.TOPK_CANDIDATES_TEST, m.RETINANET.SCORE_THRESH_TEST = 200, 0.0  # detections from an untrained head
    if arch == "RetinaNet":  # detectron2's Base-RetinaNet.yaml: P3-P7 from res3-res5
        m.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
        m.RESNETS.OUT_FEATURES = m.FPN.IN_FEATURES = ["res3", "res4", "res5"]
        m.RETINANET.IOU_THRESHOLDS, m.RETINANET.IOU_LABELS = [0.4, 0.5], [0, -1, 1]
    # Past warm-up within a few steps: moving averages and re-normalization both get used.
    m.MABN.BUFFER_SIZE, m.MABN.WARMUP_ITERS, m.MABN.RENORM_WARMUP_ITERS = 2, 0, 2
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 128, 160
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ()
    return cfg


def synthetic_batch(generator: torch.Generator, n: int = 2, size=(128, 160)):
    """Images with two dark squares each, annotated as boxes and masks."""
    batch = []
    for _ in range(n):
        image = torch.rand(3, *size, generator=generator) * 255
        x0 = torch.randint(0, size[1] - 48, (2,), generator=generator)
        y0 = torch.randint(0, size[0] - 48, (2,), generator=generator)
        boxes = torch.stack([x0, y0, x0 + 40, y0 + 40], 1)
        masks = torch.zeros(2, *size, dtype=torch.bool)
        for i, (a, b, c, d) in enumerate(boxes.tolist()):
            masks[i, b:d, a:c] = True
            image[:, b:d, a:c] *= 0.3
        instances = Instances(size, gt_boxes=Boxes(boxes.float()), gt_classes=torch.tensor([0, 1]))
        instances.gt_masks = BitMasks(masks)
        batch.append({"image": image, "instances": instances, "height": size[0], "width": size[1]})
    return batch


def trained_model(cfg, steps: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with EventStorage(0):
        for _ in range(steps):
            loss = sum(model(synthetic_batch(generator)).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def _inputs(n: int = 2, seed: int = 5):
    return [{k: v for k, v in item.items() if k != "instances"} for item in synthetic_batch(torch.Generator().manual_seed(seed), n)]


def _load_tool():
    spec = importlib.util.spec_from_file_location("fold_mabn_tool", REPO / "tools" / "fold_mabn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mask_rcnn():
    cfg = tiny_cfg()
    return cfg, trained_model(cfg)


@pytest.fixture(scope="module")
def saved(mask_rcnn, tmp_path_factory):
    """The trained tiny Mask R-CNN as a config file, a checkpoint and two image files."""
    from PIL import Image

    cfg, model = mask_rcnn
    folder = tmp_path_factory.mktemp("mabn_model")
    (folder / "config.yaml").write_text(cfg.dump())
    torch.save({"model": model.state_dict(), "iteration": 4}, folder / "model.pth")
    rng = np.random.default_rng(0)
    images = []
    for i in range(2):
        path = folder / f"image{i}.png"
        Image.fromarray(rng.integers(0, 255, (120, 150, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    return folder, images


# ----------------------------------------------------------------------------- the math


def test_mabn_to_affine_is_the_eval_mode_layer():
    g = torch.Generator().manual_seed(0)
    norm = _randomize_(MABN2d(5).double(), g).eval()
    x = torch.randn(2, 5, 4, 3, generator=g, dtype=torch.float64)
    scale, shift = mabn_to_affine(norm.running_var, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(scale.view(1, -1, 1, 1) * x + shift.view(1, -1, 1, 1), norm(x), **F64)
    # The FrozenBatchNorm2d form holds the same numbers, with running_mean 0.
    frozen, report = fold_mabn(norm)
    assert isinstance(frozen, FrozenBatchNorm2d) and report.frozen_norms == [""]
    assert torch.equal(frozen.running_mean, torch.zeros(5, dtype=torch.float64))
    with torch.no_grad():
        assert torch.equal(frozen(x), norm(x))


@pytest.mark.parametrize("groups,bias", [(1, False), (2, True)])
def test_fold_affine_into_conv_matches_conv_then_affine(groups, bias):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 4 // groups, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64) if bias else None
    scale, shift = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    x = torch.randn(2, 4, 7, 5, generator=g, dtype=torch.float64)
    fw, fb = fold_affine_into_conv(w, b, scale, shift)
    expected = scale.view(1, -1, 1, 1) * nn.functional.conv2d(x, w, b, groups=groups) + shift.view(1, -1, 1, 1)
    torch.testing.assert_close(nn.functional.conv2d(x, fw, fb, groups=groups), expected, **F64)
    assert fw.dtype == w.dtype and fb.dtype == w.dtype


@pytest.mark.parametrize("groups,bias", [(1, False), (2, True)])
def test_centered_conv_with_mabn_frozen_and_fused_match_formula(groups, bias):
    g = torch.Generator().manual_seed(2)
    conv = _conv_mabn(g, groups=groups, bias=bias)
    x = torch.randn(2, 4, 6, 5, generator=g, dtype=torch.float64)
    expected = _formula(conv, x)
    torch.testing.assert_close(conv(x), expected, **F64)

    frozen, report = fold_mabn(conv, "frozen")
    assert type(frozen) is Conv2d and isinstance(frozen.norm, FrozenBatchNorm2d)
    assert report.plain_convs == [""] and report.frozen_norms == ["norm"] and not report.fused_convs
    torch.testing.assert_close(frozen.weight, centered_weight(conv.weight), rtol=0, atol=0)
    with torch.no_grad():  # inference: FrozenBatchNorm2d then runs MABN's batch_norm op
        assert torch.equal(frozen(x), conv(x))  # same ops on the same numbers

    fused, report = fold_mabn(conv, "fused")
    assert type(fused) is Conv2d and fused.norm is None and fused.bias is not None
    assert report.fused_convs == [""] and not report.frozen_norms and not report.unfused_norms
    torch.testing.assert_close(fused(x), expected, **F64)


def test_fold_keeps_the_activation():
    g = torch.Generator().manual_seed(3)
    conv = _conv_mabn(g)
    conv.activation = nn.functional.relu
    x = torch.randn(1, 4, 5, 5, generator=g, dtype=torch.float64)
    for mode in ("frozen", "fused"):
        folded, _ = fold_mabn(conv, mode)
        assert folded.activation is nn.functional.relu
        torch.testing.assert_close(folded(x), conv(x), **F64)


# ----------------------------------------------------------------------------- the model pass


class _ListHolder(nn.Module):
    """Keeps its conv in a plain list too, as detectron2's FPN does with lateral_convs."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        self.convs = [conv]

    def forward(self, x):
        return self.convs[0](x)


def test_fold_deep_copies_and_updates_unregistered_references():
    g = torch.Generator().manual_seed(4)
    model = _ListHolder(_conv_mabn(g)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 4, 5, 5, generator=g, dtype=torch.float64)
    for mode in ("frozen", "fused"):
        folded, _ = fold_mabn(model, mode)
        assert folded is not model and folded.convs[0] is folded.conv
        assert not any(isinstance(m, (MABN2d, CenteredConv2d)) for m in folded.convs + list(folded.modules()))
        torch.testing.assert_close(folded(x), model(x), **F64)
    assert isinstance(model.conv, CenteredConv2d) and isinstance(model.conv.norm, MABN2d)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_fold_refuses_training_mode_and_unknown_modes():
    conv = _conv_mabn(torch.Generator().manual_seed(5))
    conv.train()
    with pytest.raises(ValueError, match="CenteredConv2d is in training mode.*model.eval"):
        fold_mabn(conv)
    conv.eval()
    conv.norm.train()  # one submodule left in training mode is enough to refuse
    with pytest.raises(ValueError, match="training mode \\(norm\\)"):
        fold_mabn(conv)
    conv.eval()
    with pytest.raises(ValueError, match="mode must be one of"):
        fold_mabn(conv, "merged")


def test_sequential_conv_then_mabn_is_fused_and_a_lone_mabn_is_reported():
    g = torch.Generator().manual_seed(6)
    first = CenteredConv2d(4, 6, 3, padding=1).double()
    model = nn.Sequential(first, _randomize_(MABN2d(6).double(), g), nn.ReLU(), _randomize_(MABN2d(6).double(), g))
    model.eval()
    x = torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64)
    fused, report = fold_mabn(model, "fused")
    assert report.fused_convs == ["0"] and isinstance(fused[1], nn.Identity)
    assert list(report.unfused_norms) == ["3"] and report.frozen_norms == ["3"]
    assert isinstance(fused[3], FrozenBatchNorm2d)
    torch.testing.assert_close(fused(x), model(x), **F64)
    with pytest.raises(ValueError, match="no foldable convolution before 3"):
        fold_mabn(model, "fused", strict=True)
    frozen, report = fold_mabn(model, "frozen")
    assert report.frozen_norms == ["1", "3"] and report.plain_convs == ["0"] and not report.unfused_norms


def _retinanet_like(levels: CycleMABNList) -> nn.Sequential:
    conv = CenteredConv2d(4, levels.num_features, 3, padding=1).double()
    return nn.Sequential(conv, levels.double(), nn.ReLU()).eval()


def _run_levels(model: nn.Module, xs):
    return [model(x) for x in xs]


def test_per_level_lists_keep_their_levels_as_cycle_batchnorm_list():
    g = torch.Generator().manual_seed(7)
    levels = CycleMABNList(3, 6)
    model = _retinanet_like(levels)
    with torch.no_grad():
        for norm in levels:
            norm.running_var.copy_(torch.rand(6, generator=g, dtype=torch.float64) + 0.2)
        levels.weight.copy_(torch.randn(6, generator=g, dtype=torch.float64))
        levels.bias.copy_(torch.randn(6, generator=g, dtype=torch.float64))
    xs = [torch.randn(1, 4, 5, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    expected = _run_levels(model, xs)

    frozen, report = fold_mabn(model, "frozen")
    assert report.per_level_norms == ["1"] and not report.collapsed_norms
    assert type(frozen[1]) is CycleBatchNormList and len(frozen[1]) == 3
    for got, want in zip(_run_levels(frozen, xs), expected):
        torch.testing.assert_close(got, want, **F64)
    # The layout of stock RetinaNetHead's "BN" norm, so a stock model loads it.
    stock = CycleBatchNormList(3, num_features=6)
    stock.load_state_dict(frozen[1].state_dict())

    fused, report = fold_mabn(model, "fused")
    assert "1" in report.unfused_norms and not report.fused_convs  # the conv is shared by all levels
    for got, want in zip(_run_levels(fused, xs), expected):
        torch.testing.assert_close(got, want, **F64)


def test_identical_per_level_lists_collapse_to_one_frozen_norm():
    g = torch.Generator().manual_seed(8)
    levels = CycleMABNList(3, 6)
    model = _retinanet_like(levels)
    with torch.no_grad():
        var = torch.rand(6, generator=g, dtype=torch.float64) + 0.2
        for norm in levels:
            norm.running_var.copy_(var)
        levels.weight.copy_(torch.randn(6, generator=g, dtype=torch.float64))
    xs = [torch.randn(1, 4, 5, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    expected = _run_levels(model, xs)
    frozen, report = fold_mabn(model, "frozen")
    assert report.collapsed_norms == ["1"] and type(frozen[1]) is FrozenBatchNorm2d
    fused, report = fold_mabn(model, "fused")
    assert report.fused_convs == ["0"] and not report.unfused_norms and isinstance(fused[1], nn.Identity)
    for folded in (frozen, fused):
        for got, want in zip(_run_levels(folded, xs), expected):
            torch.testing.assert_close(got, want, **F64)


# ----------------------------------------------------------------------------- config rewrite


def test_frozen_config_loads_in_stock_get_cfg(tmp_path):
    cfg = tiny_cfg()
    assert sorted(mabn_norm_keys(cfg)) == [
        "MODEL.FPN.NORM", "MODEL.RESNETS.NORM", "MODEL.RETINANET.NORM", "MODEL.ROI_BOX_HEAD.NORM",
        "MODEL.ROI_MASK_HEAD.NORM",
    ]
    folded = frozen_config(cfg, weights="/some/model_folded.pth")
    assert not mabn_norm_keys(folded) and "MABN" not in folded.MODEL and "BRN" not in folded.MODEL
    assert folded.MODEL.RESNETS.NORM == "FrozenBN" and folded.MODEL.RETINANET.NORM == "FrozenBN"
    assert folded.MODEL.WEIGHTS == "/some/model_folded.pth"
    assert cfg.MODEL.RESNETS.NORM == "MABN" and "MABN" in cfg.MODEL  # the input is not changed
    path = tmp_path / "folded.yaml"
    path.write_text(folded.dump())
    stock = get_cfg()
    stock.merge_from_file(str(path))  # raises on any key stock detectron2 does not define
    assert stock.MODEL.FPN.NORM == "FrozenBN"


def test_frozen_stages_fold_to_stock_frozen_bn_layout():
    cfg = tiny_cfg()
    cfg.MODEL.BACKBONE.FREEZE_AT = 2  # stem and res2 frozen at build time
    model = build_model(cfg).eval()
    frozen, report = fold_mabn(model)
    assert "backbone.bottom_up.stem.conv1" in report.plain_convs
    assert "backbone.bottom_up.stem.conv1.norm" not in report.frozen_norms  # frozen already
    check_state_dict_matches(build_model(frozen_config(cfg)), frozen.state_dict(), "FREEZE_AT=2")


def test_frozen_config_names_bn_for_per_level_retinanet_norms():
    from mabn_d2.deploy.fold import FoldReport

    report = FoldReport(mode="frozen", per_level_norms=["head.cls_subnet.1"])
    folded = frozen_config(tiny_cfg(arch="RetinaNet"), report)
    assert folded.MODEL.RETINANET.NORM == "BN" and folded.MODEL.RESNETS.NORM == "FrozenBN"


def test_frozen_config_refuses_other_custom_norms():
    cfg = tiny_cfg()
    cfg.MODEL.FPN.NORM = "BRN"
    with pytest.raises(ExportError, match="MODEL.FPN.NORM='BRN'"):
        frozen_config(cfg)


def test_staged_output_dir_publishes_all_or_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_output_dir(str(target)) as stage:
            Path(stage, "a.txt").write_text("a")
            raise RuntimeError("boom")
    assert not target.exists() and os.listdir(tmp_path) == []
    with staged_output_dir(str(target)) as stage:
        Path(stage, "a.txt").write_text("a")
    assert sorted(os.listdir(target)) == ["a.txt"] and os.listdir(tmp_path) == ["out"]
    with staged_output_dir(str(target)) as stage:  # an existing folder is replaced as a whole
        Path(stage, "b.txt").write_text("b")
    assert sorted(os.listdir(target)) == ["b.txt"] and os.listdir(tmp_path) == ["out"]


def test_output_dir_policy(tmp_path):
    check_output_dir(str(tmp_path / "new"), overwrite=False)  # absent: fine
    (tmp_path / "empty").mkdir()
    check_output_dir(str(tmp_path / "empty"), overwrite=False)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for name in ("model_folded.pth", "config_folded.yaml", "model_fused.pth", "model.ts"):
        (earlier / name).write_text("x")
    with pytest.raises(ExportError, match=r"earlier is not empty \(config_folded.yaml, model.ts, .*pass --overwrite"):
        check_output_dir(str(earlier), overwrite=False)
    check_output_dir(str(earlier), overwrite=True)
    (earlier / "model_final.pth").write_text("a training checkpoint")
    with pytest.raises(ExportError, match=r"holds files the fold tool does not write \(model_final.pth\)"):
        check_output_dir(str(earlier), overwrite=True)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ExportError, match=f"output folder {a_file} exists and is not a folder"):
        check_output_dir(str(a_file), overwrite=True)


# ----------------------------------------------------------------------------- bad inputs


def _assert_no_output(output: Path):
    assert not output.exists() or os.listdir(output) == []
    assert not [p for p in os.listdir(output.parent) if ".staging-" in p]


def _run_tool(capsys, *argv):
    rc = _load_tool().main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_tool_missing_checkpoint(saved, tmp_path, capsys):
    folder, _ = saved
    missing = tmp_path / "nope.pth"
    rc, err = _run_tool(capsys, "--config-file", folder / "config.yaml", "--weights", missing, "--output-dir", tmp_path / "out")
    assert rc == 1 and f"checkpoint not found: {missing}" in err
    _assert_no_output(tmp_path / "out")


def test_tool_corrupt_checkpoint(saved, tmp_path, capsys):
    folder, _ = saved
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes((folder / "model.pth").read_bytes()[:5000])  # a truncated download
    (tmp_path / "out").mkdir()  # an existing, empty output folder stays empty
    rc, err = _run_tool(capsys, "--config-file", folder / "config.yaml", "--weights", corrupt, "--output-dir", tmp_path / "out")
    assert rc == 1 and f"cannot read checkpoint {corrupt}" in err
    _assert_no_output(tmp_path / "out")


def test_tool_config_without_mabn(saved, tmp_path, capsys):
    folder, _ = saved
    config = tmp_path / "frozenbn.yaml"
    config.write_text(tiny_cfg(norm="FrozenBN").dump())
    rc, err = _run_tool(capsys, "--config-file", config, "--weights", folder / "model.pth", "--output-dir", tmp_path / "out")
    assert rc == 1 and f"config {config} sets no NORM to \"MABN\"" in err
    _assert_no_output(tmp_path / "out")


def test_tool_checkpoint_not_matching_config(saved, tmp_path, capsys):
    folder, _ = saved
    weights = folder / "model.pth"
    rc, err = _run_tool(
        capsys, "--config-file", folder / "config.yaml", "--weights", weights, "--output-dir", tmp_path / "out",
        "MODEL.ROI_HEADS.NUM_CLASSES", "5",
    )
    assert rc == 1 and f"checkpoint {weights} does not match config {folder / 'config.yaml'}" in err
    assert "roi_heads.box_predictor.cls_score.weight: checkpoint (4, 64) vs model (6, 64)" in err
    _assert_no_output(tmp_path / "out")


def test_checkpoint_missing_keys_are_named(mask_rcnn, tmp_path):
    cfg, model = mask_rcnn
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("x2_buffer")}
    weights = tmp_path / "partial.pth"
    torch.save({"model": state}, weights)
    with pytest.raises(ExportError, match=r"keys missing from the checkpoint \(backbone\.\S*x2_buffer"):
        fold_checkpoint(cfg, str(weights), str(tmp_path / "out"))
    _assert_no_output(tmp_path / "out")


def test_tool_batchnorm_weights_name_the_non_zero_mean_not_a_damaged_file(saved, tmp_path, capsys):
    folder, _ = saved
    torch.manual_seed(0)
    bn_state = build_model(tiny_cfg(norm="BN")).state_dict()
    for key, value in bn_state.items():
        if key.endswith("running_mean"):
            value.normal_()  # trained BatchNorm statistics
    weights = tmp_path / "bn.pth"
    torch.save({"model": bn_state}, weights)
    rc, err = _run_tool(capsys, "--config-file", folder / "config.yaml", "--weights", weights, "--output-dir", tmp_path / "out")
    line = _error_line(err)
    assert rc == 1 and f"checkpoint {weights} does not fit the model of config {folder / 'config.yaml'}: " in line
    # The layer's whole refusal, advice included, and no claim that the file is damaged.
    assert re.search(r": backbone\.\S+\.norm\.running_mean: MABN2d's mean is zero by definition, got a non-zero "
                     r"running_mean \(largest magnitude [\d.]+\); convert BatchNorm checkpoints with "
                     r"tools/convert_pretrained\.py \(mabn_d2\.engine\.convert_pretrained\.bn_to_mabn\) instead; ", line), line
    assert "damaged" not in line and "cannot read" not in line
    _assert_no_output(tmp_path / "out")


@pytest.mark.parametrize("key, expected", [
    # MABN state: refused by the layer as it loads.
    ("backbone.bottom_up.res3.0.conv2.norm.running_var",
     r"does not fit the model of .*: backbone\.bottom_up\.res3\.0\.conv2\.norm\.running_var: 1 of 128 values are NaN"),
    # Any other parameter: refused before folding.
    ("roi_heads.box_predictor.cls_score.weight",
     r"holds NaN or infinite values in roi_heads\.box_predictor\.cls_score\.weight \(1 of 256\)"),
])
def test_tool_refuses_non_finite_weights_naming_the_key(saved, tmp_path, capsys, key, expected):
    folder, _ = saved
    state = torch.load(folder / "model.pth", weights_only=True)["model"]
    state[key].view(-1)[0] = float("nan")
    weights = tmp_path / "nan.pth"
    torch.save({"model": state}, weights)
    rc, err = _run_tool(capsys, "--config-file", folder / "config.yaml", "--weights", weights, "--output-dir", tmp_path / "out")
    line = _error_line(err)
    assert rc == 1 and re.search(expected, line), line
    assert str(weights) in line and "damaged" not in line
    _assert_no_output(tmp_path / "out")


def test_a_training_checkpoint_changed_after_saving_is_refused_as_damaged(mask_rcnn, tmp_path):
    from mabn_d2.engine.checkpoint import MABNCheckpointer

    cfg, model = mask_rcnn
    MABNCheckpointer(model, str(tmp_path)).save("model_final", iteration=4)
    weights = tmp_path / "model_final.pth"
    data = bytearray(weights.read_bytes())
    weight = model.roi_heads.box_predictor.cls_score.weight.detach().numpy().tobytes()  # not a buffer: saved once
    data[data.index(weight) + 2] ^= 0x40
    weights.write_bytes(bytes(data))
    torch.load(weights, weights_only=True)  # loads: only the checksum tells
    with pytest.raises(ExportError, match=rf"^checkpoint {re.escape(str(weights))} is damaged: its model state does "
                                          r"not match the checksum saved with it"):
        fold_checkpoint(cfg, str(weights), str(tmp_path / "out"))
    _assert_no_output(tmp_path / "out")


def test_fused_weights_that_overflow_are_refused_before_writing(mask_rcnn, saved, tmp_path):
    """Finite weights can fold into infinite ones: weight / sqrt(running_var + eps) overflows float32."""
    cfg, _ = mask_rcnn
    folder, _ = saved
    state = torch.load(folder / "model.pth", weights_only=True)["model"]
    state["backbone.bottom_up.res2.0.conv1.norm.weight"].fill_(3e38)  # finite, as is a zero variance
    state["backbone.bottom_up.res2.0.conv1.norm.running_var"].zero_()
    weights = tmp_path / "huge.pth"
    torch.save({"model": state}, weights)
    with pytest.raises(ExportError, match=r"the fused model holds NaN or infinite values in "
                                          r"backbone\.bottom_up\.res2\.0\.conv1\.weight \("):
        fold_checkpoint(cfg, str(weights), str(tmp_path / "out"), fuse=True)
    _assert_no_output(tmp_path / "out")


def test_tool_takes_integers_for_float_keys(saved, tmp_path, capsys):
    folder, _ = saved
    missing = tmp_path / "nope.pth"
    rc, err = _run_tool(capsys, "--config-file", folder / "config.yaml", "--weights", missing, "--output-dir",
                        tmp_path / "out", "MODEL.MABN.RENORM_CLIP", "5", "MODEL.MABN.WARMUP_FRACTION", "-1")
    assert rc == 1 and _error_line(err) == f"fold_mabn: error: checkpoint not found: {missing}"  # past the config


def test_tool_missing_config(tmp_path, capsys):
    rc, err = _run_tool(capsys, "--config-file", tmp_path / "no.yaml", "--weights", "w.pth", "--output-dir", tmp_path / "out")
    assert rc == 1 and f"cannot read config {tmp_path / 'no.yaml'}" in err
    _assert_no_output(tmp_path / "out")


def _error_line(err: str) -> str:
    """The tool's one error line (stderr may also hold log records of the loading)."""
    lines = [line for line in err.splitlines() if line.startswith("fold_mabn: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _one_line(err: str) -> str:
    assert err.startswith("fold_mabn: error: ") and err.count("\n") == 1, err
    return err


def test_tool_refuses_a_non_empty_output_dir_and_replaces_it_with_overwrite(saved, tmp_path, capsys):
    folder, _ = saved
    output = tmp_path / "folded"
    output.mkdir()
    for name in ("model_folded.pth", "config_folded.yaml", "model_fused.pth", "model.ts"):  # an earlier --fuse --export
        (output / name).write_text("earlier run")
    common = ["--config-file", folder / "config.yaml", "--weights", folder / "model.pth", "--output-dir", output]
    rc, err = _run_tool(capsys, *common)
    assert rc == 1 and f"output folder {output} is not empty" in _one_line(err) and "--overwrite" in err
    assert (output / "model.ts").read_text() == "earlier run"
    rc, err = _run_tool(capsys, *common, "--overwrite")
    assert rc == 0, err
    assert sorted(os.listdir(output)) == ["config_folded.yaml", "model_folded.pth"]  # exactly this run's files
    assert sorted(os.listdir(tmp_path)) == ["folded"]  # no staging or replaced folder left


def test_tool_output_dir_that_is_a_file(saved, tmp_path, capsys):
    folder, _ = saved
    a_file = tmp_path / "model.pth"
    a_file.write_text("x")
    rc, err = _run_tool(capsys, "--config-file", folder / "config.yaml", "--weights", folder / "model.pth",
                        "--output-dir", a_file)
    assert rc == 1 and f"output folder {a_file} exists and is not a folder" in _one_line(err)


def test_tool_read_only_parent(saved, tmp_path, capsys, monkeypatch):
    folder, _ = saved
    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(0o555)
    if os.access(parent, os.W_OK):  # root ignores permission bits: make the check see what a user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(parent) else real_access(p, mode))
    try:
        rc, err = _run_tool(capsys, "--config-file", folder / "config.yaml", "--weights", folder / "model.pth",
                            "--output-dir", parent / "out")
    finally:
        parent.chmod(0o755)
    assert rc == 1 and f"cannot write output folder {parent / 'out'}: {parent} is not writable" in _one_line(err)
    assert os.listdir(parent) == []


def test_fold_reports_a_write_failure_in_one_line(mask_rcnn, saved, tmp_path, monkeypatch):
    cfg, _ = mask_rcnn
    folder, _ = saved
    import mabn_d2.deploy.pipeline as export

    def full_disk(model, path):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(export, "save_checkpoint", full_disk)
    with pytest.raises(ExportError, match=r"cannot write the folded model to .*out: .*model_folded.pth: No space left"):
        fold_checkpoint(cfg, str(folder / "model.pth"), str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_tool_cuda_device_without_cuda(saved, tmp_path, capsys):
    folder, _ = saved
    rc, err = _run_tool(capsys, "--config-file", folder / "config.yaml", "--weights", folder / "model.pth",
                        "--output-dir", tmp_path / "out", "--device", "cuda")
    assert rc == 1 and "device 'cuda' needs CUDA, which this machine does not have" in _one_line(err)
    _assert_no_output(tmp_path / "out")


SIGNAL_DURING_FOLD = textwrap.dedent(
    """
    import os, signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job may inherit SIGINT ignored
    import mabn_d2.deploy.pipeline as export
    real_save = export.save_checkpoint
    def save_then_signal(model, path):
        real_save(model, path)  # one file staged, then the signal arrives
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    export.save_checkpoint = save_then_signal
    sys.path.insert(0, "tools")
    import fold_mabn
    sys.exit(fold_mabn.main(sys.argv[2:]))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_signal_while_staging_leaves_nothing_behind(saved, tmp_path, signame):
    folder, _ = saved
    output = tmp_path / "folded"
    result = subprocess.run(
        [sys.executable, "-c", SIGNAL_DURING_FOLD, signame, "--config-file", str(folder / "config.yaml"),
         "--weights", str(folder / "model.pth"), "--output-dir", str(output), "--fuse"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode != 0 and "wrote" not in result.stdout, result.stderr[-2000:]
    if signame == "SIGTERM":
        assert result.returncode == -signal.SIGTERM
    assert os.listdir(tmp_path) == [], "a staging folder was left behind"


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_trained_mask_rcnn_folded_forms_match_original(mask_rcnn):
    cfg, model = mask_rcnn
    running_var = torch.cat([m.running_var for m in model.modules() if isinstance(m, MABN2d)])
    assert not torch.allclose(running_var, torch.ones_like(running_var))
    inputs = _inputs()
    reference = raw_predictions(model, inputs)
    frozen, report = fold_mabn(model, "frozen")
    assert len(report.frozen_norms) == len(report.plain_convs) == 32 and not report.fused_convs
    diff = compare_predictions(reference, raw_predictions(frozen, inputs))
    assert diff.detections > 0 and diff.boxes == diff.scores == diff.masks == 0 and not diff.mismatches
    fused, report = fold_mabn(model, "fused")
    assert len(report.fused_convs) == 32 and not report.unfused_norms
    diff = compare_predictions(reference, raw_predictions(fused, inputs))
    assert diff.detections > 0 and not diff.exceeded(TOLERANCES), str(diff)
    # The frozen state_dict is exactly what a stock FrozenBN model expects.
    check_state_dict_matches(build_model(frozen_config(cfg)), frozen.state_dict(), "frozen")


STOCK_PREDICT = textwrap.dedent(
    """
    import sys, torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    cfg = get_cfg()
    cfg.merge_from_file(sys.argv[1])
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.load_state_dict(torch.load(cfg.MODEL.WEIGHTS)["model"], strict=True)  # same keys and shapes
    outputs = []
    with torch.no_grad():
        for item in torch.load(sys.argv[2]):
            inst = model.inference([item], do_postprocess=False)[0]
            outputs.append({k: v for k, v in inst.get_fields().items() if k != "pred_boxes"} | {"boxes": inst.pred_boxes.tensor})
    torch.save(outputs, sys.argv[3])
    print(sorted(name for name in sys.modules if name.split(".")[0] == "mabn_d2"))
    """
)


def _instances(fields, size) -> Instances:
    inst = Instances(size, **{k: v for k, v in fields.items() if k != "boxes"})
    inst.pred_boxes = Boxes(fields["boxes"])
    return inst


@pytest.mark.slow
def test_tool_output_loads_in_stock_detectron2_without_mabn_d2(mask_rcnn, saved, tmp_path):
    cfg, model = mask_rcnn
    folder, images = saved
    output = tmp_path / "folded"
    rc = _load_tool().main([
        "--config-file", str(folder / "config.yaml"), "--weights", str(folder / "model.pth"),
        "--output-dir", str(output), "--fuse", "--verify", "2", "--images", *images, "--export", "torchscript",
    ])
    assert rc == 0
    assert sorted(os.listdir(output)) == ["config_folded.yaml", "model.ts", "model_folded.pth", "model_fused.pth"]
    assert not [p for p in os.listdir(tmp_path) if ".staging-" in p]
    text = (output / "config_folded.yaml").read_text()
    assert "MABN" not in text and f"WEIGHTS: {output / 'model_folded.pth'}" in text

    inputs = _inputs()
    torch.save(inputs, tmp_path / "inputs.pth")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", STOCK_PREDICT, str(output / "config_folded.yaml"), str(tmp_path / "inputs.pth"),
         str(tmp_path / "stock.pth")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"  # mabn_d2 was never imported
    stock = [_instances(fields, item["image"].shape[1:]) for fields, item in zip(torch.load(tmp_path / "stock.pth"), inputs)]
    diff = compare_predictions(raw_predictions(model, inputs), stock)
    assert diff.detections > 0 and diff.boxes == diff.scores == diff.masks == 0 and not diff.mismatches, str(diff)


@pytest.mark.slow
def test_torchscript_export_reproduces_eager(mask_rcnn, tmp_path):
    _, model = mask_rcnn
    item = _inputs(1)[0]
    for mode in ("frozen", "fused"):
        folded, _ = fold_mabn(model, mode)
        path = tmp_path / f"{mode}.ts"
        diff = export_torchscript(folded, item, str(path))
        assert path.is_file() and diff.detections > 0 and not diff.exceeded(TOLERANCES), str(diff)
        assert isinstance(torch.jit.load(str(path)), torch.jit.ScriptModule)


@pytest.mark.slow
def test_onnx_export_passes_the_checker(mask_rcnn, tmp_path):
    onnx = pytest.importorskip("onnx")
    _, model = mask_rcnn
    fused, _ = fold_mabn(model, "fused")
    path = tmp_path / "model.onnx"
    exporter, diff = export_onnx(fused, _inputs(1)[0], str(path))
    assert exporter in ("dynamo", "torchscript")
    onnx.checker.check_model(str(path))
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"Conv", "RoiAlign"} <= ops and "BatchNormalization" not in ops  # the norms live in the convs
    if diff is not None:  # onnxruntime installed
        assert diff.detections > 0 and not diff.exceeded(ONNXRUNTIME_TOLERANCES), str(diff)
    assert not fused.training and not model.training


@pytest.mark.slow
def test_trained_retinanet_keeps_per_level_statistics_and_loads_as_stock_bn():
    cfg = tiny_cfg(arch="RetinaNet")
    model = trained_model(cfg, steps=3)
    inputs = _inputs()
    reference = raw_predictions(model, inputs)
    frozen, report = fold_mabn(model, "frozen")
    assert len(report.per_level_norms) == 4 and not report.collapsed_norms  # 2 convs x (cls, bbox)
    folded_cfg = frozen_config(cfg, report)
    assert folded_cfg.MODEL.RETINANET.NORM == "BN" and folded_cfg.MODEL.RESNETS.NORM == "FrozenBN"
    stock = build_model(folded_cfg).eval()
    check_state_dict_matches(stock, frozen.state_dict(), "retinanet")
    stock.load_state_dict(frozen.state_dict())
    for candidate in (frozen, stock):
        diff = compare_predictions(reference, raw_predictions(candidate, inputs))
        assert diff.detections > 0 and diff.boxes == diff.scores == 0 and not diff.mismatches, str(diff)
    fused, report = fold_mabn(model, "fused")
    assert sorted(report.unfused_norms) == sorted(report.per_level_norms)
    diff = compare_predictions(reference, raw_predictions(fused, inputs))
    assert diff.detections > 0 and not diff.exceeded(TOLERANCES), str(diff)


@pytest.mark.slow
def test_verify_fails_above_tolerance_and_writes_nothing(mask_rcnn, saved, tmp_path):
    cfg, _ = mask_rcnn
    folder, images = saved
    output = tmp_path / "out"
    with pytest.raises(ExportError, match="does not reproduce the original"):
        fold_checkpoint(cfg, str(folder / "model.pth"), str(output), fuse=True, verify=1, images=images,
                        tolerances={"boxes": 0.0, "scores": 0.0, "masks": 0.0})
    _assert_no_output(output)


@pytest.mark.slow
def test_verify_reads_the_config_test_set(mask_rcnn, saved, tmp_path):
    from detectron2.data import DatasetCatalog

    cfg, _ = mask_rcnn
    folder, images = saved
    name = "mabn_fold_test_images"
    if name not in DatasetCatalog:
        records = [{"file_name": path, "image_id": i, "height": 120, "width": 150} for i, path in enumerate(images)]
        DatasetCatalog.register(name, lambda: records)
    cfg = cfg.clone()
    cfg.DATASETS.TEST = (name,)
    result = fold_checkpoint(cfg, str(folder / "model.pth"), str(tmp_path / "out"), verify=2)
    diff = result.verified["frozen"]
    assert diff.images == 2 and diff.detections > 0 and diff.boxes == diff.scores == diff.masks == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["config_folded.yaml", "model_folded.pth"]
