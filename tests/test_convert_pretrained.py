"""convert_pretrained: torchvision / detectron2 / Caffe2 BN checkpoints -> MABN layout, strictly."""
import logging
import os
import pickle
import re

import pytest
import torch
import torchvision

from mabn_d2.engine.convert_pretrained import (
    ConversionError,
    check_resnet_layout,
    convert_checkpoint,
    load_checkpoint_state,
    torchvision_to_detectron2_names,
)

from .conftest import REPO_ROOT, load_tool

FINETUNE_CONFIG = os.path.join(REPO_ROOT, "configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_mabn_finetune.yaml")


def _load_tool():
    return load_tool("convert_pretrained")


@pytest.fixture(scope="module")
def torchvision_r50(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(12345)
    path = tmp_path_factory.mktemp("tv") / "resnet50.pth"
    torch.save(model.state_dict(), path)
    return model.state_dict(), path


def _save(state, path):
    torch.save(state, path)
    return path


def test_torchvision_names_map_onto_detectron2_resnet():
    state = torchvision.models.resnet18(weights=None).state_dict()
    names = torchvision_to_detectron2_names(state)
    assert "stem.conv1.weight" in names and "stem.conv1.norm.running_var" in names
    assert "res2.0.conv1.norm.weight" in names and "res3.0.shortcut.weight" in names
    assert "res3.0.shortcut.norm.running_mean" in names
    assert not any(k.startswith(("fc.", "layer", "bn1")) for k in names)
    assert check_resnet_layout(names, "torchvision") == 18


def test_converted_checkpoint_loads_into_the_mabn_finetune_model(torchvision_r50, tmp_path, caplog):
    from mabn_d2 import build_model

    from mabn_d2.engine.checkpoint import MABNCheckpointer
    from mabn_d2.engine.trainer import setup_cfg
    from mabn_d2.layers import MABN2d

    tv_state, path = torchvision_r50
    output = tmp_path / "R-50-mabn.pth"
    summary = convert_checkpoint(str(path), str(output))
    assert summary["source_format"] == "torchvision" and summary["depth"] == 50 and summary["norm_layers"] == 53
    assert summary["dropped_classifier_keys"] == ["fc.bias", "fc.weight"] and summary["affine_only_norms"] == 0
    cfg = setup_cfg(FINETUNE_CONFIG, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    checkpointer = MABNCheckpointer(model)
    checkpointer.logger = logging.getLogger("test_convert.checkpointer")
    with caplog.at_level(logging.INFO, logger="test_convert.checkpointer"):
        checkpointer.load(str(output))
    ring = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "ring buffers" in r.getMessage()]
    mabn_layers = sum(isinstance(m, MABN2d) for m in model.modules())  # backbone's 53, FPN's and the heads'
    assert len(ring) == 1 and ring[0].startswith(f"{2 * mabn_layers} MABN ring buffers are not in the checkpoint")
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]  # every backbone key loaded
    new_parts = [r.getMessage() for r in caplog.records if "outside the backbone's ResNet" in r.getMessage()]
    assert len(new_parts) == 1 and "keep their initialization, as expected" in new_parts[0]

    state = torch.load(output, weights_only=True)  # a real gap is still a warning, on its own
    del state["model"]["backbone.bottom_up.res5.2.conv3.norm.running_var"]
    torch.save(state, tmp_path / "gap.pth")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="test_convert.checkpointer"):
        checkpointer.load(str(tmp_path / "gap.pth"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "backbone.bottom_up.res5.2.conv3.norm.running_var" in warnings[0]
    assert "fpn" not in warnings[0] and "x2_buffer" not in warnings[0]

    bottom_up = model.backbone.bottom_up
    torch.testing.assert_close(bottom_up.stem.conv1.weight, tv_state["conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(bottom_up.res4[2].conv2.weight, tv_state["layer3.2.conv2.weight"], rtol=0, atol=0)
    norm = bottom_up.res3[0].shortcut.norm
    assert isinstance(norm, MABN2d)
    torch.testing.assert_close(norm.running_var, tv_state["layer2.0.downsample.1.running_var"], rtol=0, atol=0)
    torch.testing.assert_close(norm.weight, tv_state["layer2.0.downsample.1.weight"], rtol=0, atol=0)
    assert torch.count_nonzero(norm.running_mean) == 0
    assert norm.iteration == 0 and int(norm.num_batches_tracked) == 0


def test_detectron2_pkl_round_trip(tmp_path):
    names = torchvision_to_detectron2_names(torchvision.models.resnet18(weights=None).state_dict())
    state = {k: v.numpy() for k, v in names.items() if not k.endswith("num_batches_tracked")}
    state["res2.0.conv1.norm.running_var"] += 1.5
    src = tmp_path / "model.pkl"
    with open(src, "wb") as f:
        pickle.dump({"model": state, "__author__": "someone"}, f)
    summary = convert_checkpoint(str(src), str(tmp_path / "out.pth"))
    assert summary["source_format"] == "detectron2" and summary["depth"] == 18
    out = torch.load(tmp_path / "out.pth", weights_only=True)["model"]
    key = "backbone.bottom_up.res2.0.conv1.norm."
    assert torch.count_nonzero(out[key + "running_mean"]) == 0
    torch.testing.assert_close(out[key + "running_var"], torch.as_tensor(state["res2.0.conv1.norm.running_var"]))


def _caffe2_r18_blobs():
    """Caffe2 ImageNet names for R-18, norms as a bare affine (_bn_s, _bn_b) as Detectron's files hold them."""
    blobs = {"conv1_w": torch.randn(64, 3, 7, 7).numpy(), "res_conv1_bn_s": torch.rand(64).numpy(),
             "res_conv1_bn_b": torch.rand(64).numpy(), "fc1000_w": torch.randn(10, 512).numpy()}
    channels = {2: 64, 3: 128, 4: 256, 5: 512}
    for stage, out in channels.items():
        for block in range(2):
            branches = ["branch2a", "branch2b"] + (["branch1"] if block == 0 and stage > 2 else [])
            for branch in branches:
                in_ch = out // 2 if (block == 0 and stage > 2 and branch != "branch2b") else out
                prefix = f"res{stage}_{block}_{branch}"
                blobs[f"{prefix}_w"] = torch.randn(out, in_ch, 3, 3).numpy()
                blobs[f"{prefix}_bn_s"] = torch.rand(out).numpy()
                blobs[f"{prefix}_bn_b"] = torch.rand(out).numpy()
    return blobs


def test_caffe2_affine_only_norms_become_unit_variance_and_are_counted(tmp_path):
    src = tmp_path / "R-18.pkl"
    with open(src, "wb") as f:
        pickle.dump({"blobs": _caffe2_r18_blobs()}, f)
    summary = convert_checkpoint(str(src), str(tmp_path / "out.pth"))
    assert summary["source_format"] == "caffe2" and summary["depth"] == 18
    assert summary["affine_only_norms"] == summary["norm_layers"] == 20
    assert summary["dropped_classifier_keys"] == ["fc1000.weight"]
    out = torch.load(tmp_path / "out.pth", weights_only=True)["model"]
    assert torch.equal(out["backbone.bottom_up.res3.0.shortcut.norm.running_var"], torch.ones(128))


def _whole_detector_state():
    from mabn_d2 import build_model

    from mabn_d2.engine.trainer import setup_cfg

    cfg = setup_cfg(os.path.join(REPO_ROOT, "configs/Demo/fmnist_mask_rcnn_R_18_FPN_bn.yaml"), [])
    return {"model": build_model(cfg).state_dict(), "iteration": 899}


@pytest.mark.parametrize("case,expected", [
    ("no_layer4", r"is not a complete ResNet: stages missing: res5 \(torchvision layer4\)$"),
    ("no_statistics", r"53 norms without BatchNorm statistics running_mean/running_var \(stem\.conv1\.norm, "),
    ("no_running_var", r"53 norms without BatchNorm statistics"),
    ("block_missing", r"15 keys of R50 missing \(res4\.2\.conv1\.weight, "),
    ("stage_too_short", r"bottleneck blocks per stage res2\.\.res5 \[3, 4, 5, 3\] match no ResNet"),
    ("whole_detector", r"keys are not part of a ResNet \(backbone\.fpn_lateral2\..*this is a whole detectron2 model"),
])
def test_incomplete_or_foreign_checkpoints_are_refused(torchvision_r50, tmp_path, case, expected):
    tv_state, _ = torchvision_r50
    states = {
        "no_layer4": lambda: {k: v for k, v in tv_state.items() if not k.startswith("layer4.")},
        "no_statistics": lambda: {k: v for k, v in tv_state.items() if "running_" not in k},
        "no_running_var": lambda: {k: v for k, v in tv_state.items() if "running_var" not in k},
        "block_missing": lambda: {k: v for k, v in tv_state.items() if not k.startswith("layer3.2.")},
        "stage_too_short": lambda: {k: v for k, v in tv_state.items() if not k.startswith("layer3.5.")},
        "whole_detector": _whole_detector_state,
    }
    source = _save(states[case](), tmp_path / f"{case}.pth")
    output = tmp_path / "never" / "out.pth"
    with pytest.raises(ConversionError, match=expected) as error:
        convert_checkpoint(str(source), str(output))
    assert str(source) in str(error.value) and "\n" not in str(error.value)
    assert not output.parent.exists()


def test_unreadable_inputs_give_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint_state(str(tmp_path / "missing.pth"))
    text = tmp_path / "notes.pth"
    text.write_text("these are my notes, not weights\n")
    with pytest.raises(ConversionError, match=r"notes\.pth: not a PyTorch or pickle checkpoint \(it starts with b'these ar'"):
        load_checkpoint_state(str(text))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ConversionError, match=r"empty\.pth: the file is empty \(0 bytes"):
        load_checkpoint_state(str(empty))
    odd = _save({"foo.weight": torch.ones(1)}, tmp_path / "odd.pth")
    with pytest.raises(ConversionError, match="unrecognised checkpoint layout"):
        convert_checkpoint(str(odd), str(tmp_path / "never.pth"))
    assert not (tmp_path / "never.pth").exists()


def test_tool_reports_one_line_and_writes_nothing(torchvision_r50, tmp_path, capsys):
    tv_state, good = torchvision_r50
    tool = _load_tool()
    partial = _save({k: v for k, v in tv_state.items() if not k.startswith("layer4.")}, tmp_path / "partial.pth")
    assert tool.main(["--input", str(partial), "--output", str(tmp_path / "out.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("convert_pretrained: error: ") and "res5" in err
    assert not (tmp_path / "out.pth").exists()
    assert tool.main(["--input", str(good), "--output", str(tmp_path / "out.pth")]) == 0
    assert '"depth": 50' in capsys.readouterr().out and (tmp_path / "out.pth").is_file()


@pytest.mark.parametrize("key, value, expected", [
    ("layer1.0.bn1.running_var", float("nan"), r"layer1\.0\.bn1\.running_var holds NaN or infinite values \(1 of 64\)"),
    ("layer2.1.bn2.running_var", -0.5,
     r"layer2\.1\.bn2\.running_var is negative \(smallest -0\.5; a running variance is >= 0\)"),
    ("layer3.0.conv1.weight", float("inf"),
     r"layer3\.0\.conv1\.weight holds NaN or infinite values \(1 of 294912\)"),  # 256 x 128 x 3 x 3
    ("bn1.bias", float("-inf"), r"bn1\.bias holds NaN or infinite values \(1 of 64\)"),
])
def test_tool_refuses_non_finite_weights_and_negative_variance(tmp_path, capsys, key, value, expected):
    state = torchvision.models.resnet18(weights=None).state_dict()
    with torch.no_grad():
        state[key].view(-1)[0] = value
    source = _save(state, tmp_path / "resnet18.pth")
    output = tmp_path / "out" / "R-18-mabn.pth"
    assert _load_tool().main(["--input", str(source), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"convert_pretrained: error: {source} holds values MABN cannot "
                                                   "start from: "), err
    assert re.search(expected, err), err
    assert not output.parent.exists()


def test_non_finite_values_are_all_counted_and_the_first_named(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    bad = [k for k in state if k.endswith("running_var")][:6]
    for key in bad:
        state[key][:2] = float("nan")
    source = _save(state, tmp_path / "resnet18.pth")
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(str(source), str(tmp_path / "never.pth"))
    message = str(error.value)
    assert all(f"{key} holds NaN or infinite values (2 of" in message for key in bad[:4]) and bad[4] not in message
    assert message.endswith("; ... (6 tensors in all)") and not (tmp_path / "never.pth").exists()


def test_finetune_config_comment_names_only_existing_options():
    text = open(FINETUNE_CONFIG).read()
    command = [line for line in text.splitlines() if "convert_pretrained.py" in line][0]
    options = [word for word in command.split() if word.startswith("--")]
    tool_source = open(os.path.join(REPO_ROOT, "tools", "convert_pretrained.py")).read()
    assert options and all(f'add_argument("{option}"' in tool_source for option in options), options
