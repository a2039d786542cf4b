"""convert_pretrained: torchvision / detectron2 BN checkpoints -> MABN layout."""
import pickle

import pytest
import torch
import torchvision

from mabn_d2.convert import convert_checkpoint, load_checkpoint_state, torchvision_to_detectron2_names


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


def test_torchvision_names_map_onto_detectron2_resnet():
    state = torchvision.models.resnet18(weights=None).state_dict()
    names = torchvision_to_detectron2_names(state)
    assert "stem.conv1.weight" in names and "stem.conv1.norm.running_var" in names
    assert "res2.0.conv1.norm.weight" in names and "res3.0.shortcut.weight" in names
    assert "res3.0.shortcut.norm.running_mean" in names
    assert not any(k.startswith(("fc.", "layer", "bn1")) for k in names)


def test_converted_checkpoint_loads_into_the_mabn_finetune_model(torchvision_r50, tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from mabn_d2.engine import setup_cfg
    from mabn_d2.layers import MABN2d

    tv_state, path = torchvision_r50
    output = tmp_path / "R-50-mabn.pth"
    summary = convert_checkpoint(str(path), str(output))
    assert summary["source_format"] == "torchvision" and summary["norm_layers"] == 53
    cfg = setup_cfg("configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_mabn_finetune.yaml",
                    ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(output))
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
    state = {f"res2.0.conv1.{k}": v.numpy() for k, v in {
        "weight": torch.randn(4, 3, 1, 1), "norm.weight": torch.rand(4), "norm.bias": torch.rand(4),
        "norm.running_mean": torch.rand(4), "norm.running_var": torch.rand(4) + 1}.items()}
    src = tmp_path / "model.pkl"
    with open(src, "wb") as f:
        pickle.dump({"model": state, "__author__": "someone"}, f)
    convert_checkpoint(str(src), str(tmp_path / "out.pth"))
    out = torch.load(tmp_path / "out.pth", weights_only=True)["model"]
    key = "backbone.bottom_up.res2.0.conv1.norm."
    assert torch.count_nonzero(out[key + "running_mean"]) == 0
    torch.testing.assert_close(out[key + "running_var"], torch.as_tensor(state["res2.0.conv1.norm.running_var"]))


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint_state(str(tmp_path / "missing.pth"))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pth"):
        load_checkpoint_state(str(corrupt))
    odd = tmp_path / "odd.pth"
    torch.save({"foo.weight": torch.ones(1)}, odd)
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        convert_checkpoint(str(odd), str(tmp_path / "never.pth"))
    assert not (tmp_path / "never.pth").exists()
