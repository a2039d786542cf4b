"""The export check compares the exported file with eager on several images: a trace records the
branches and sizes of the one input it ran on, so one image cannot tell a file that holds for any
input from one that holds for its own input only."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances
from torch import nn

from mabn_d2.deploy.export_formats import (
    EXPORT_CHECK_IMAGES, ONNXRUNTIME_TOLERANCES, TORCHSCRIPT_LOAD_NOTE, export_onnx, export_torchscript,
)
from mabn_d2.deploy.pipeline import fold_checkpoint
from mabn_d2.deploy.verify import TOLERANCES

from .test_fold import mask_rcnn  # noqa: F401  (module fixture: a tiny Mask R-CNN trained 4 steps)


class BrightnessBranch(nn.Module):
    """One detection per image whose score halves on bright images: a Python branch that a
    trace freezes at the value of its own input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, inputs):
        results = []
        for item in inputs:
            image = item["image"]
            features = self.conv(image[None] / 255).mean(dim=(2, 3))[0]
            boxes = torch.cumsum(features.abs() * 10, 0)[None]  # x0 <= y0 <= x1 <= y1
            scores = torch.sigmoid(features[:1])
            if float(image.mean()) > 127:
                scores = scores / 2
            instances = Instances(tuple(image.shape[-2:]), pred_boxes=Boxes(boxes), scores=scores,
                                  pred_classes=torch.zeros(1, dtype=torch.long))
            results.append({"instances": instances})
        return results


def _image(level: float, size=(24, 32), seed: int = 0) -> dict:
    noise = torch.rand(3, *size, generator=torch.Generator().manual_seed(seed)) * 40
    return {"image": (noise + level).clamp(0, 255)}


def test_torchscript_check_compares_every_image_and_catches_a_trace_that_holds_for_one(tmp_path):
    model = BrightnessBranch().eval()
    dark, dark2, bright = _image(30), _image(50, seed=1), _image(200, seed=2)
    diff = export_torchscript(model, [dark, dark2, _image(40, size=(40, 20), seed=3)], str(tmp_path / "ok.ts"))
    assert (diff.images, diff.detections) == (3, 3) and not diff.exceeded(TOLERANCES), str(diff)

    diff = export_torchscript(model, [dark, bright], str(tmp_path / "branch.ts"))
    assert diff.images == 2 and diff.scores > 0.1, str(diff)  # the traced branch is the dark one
    assert any(reason.startswith("max |scores difference|") for reason in diff.exceeded(TOLERANCES))
    # The same file checked on its tracing image alone looks exact.
    assert not export_torchscript(model, dark, str(tmp_path / "one.ts")).exceeded(TOLERANCES)


def test_onnx_file_takes_any_image_size_and_is_checked_on_each(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = BrightnessBranch().eval()
    path = tmp_path / "model.onnx"
    inputs = [_image(30), _image(60, size=(40, 20), seed=1), _image(90, size=(16, 48), seed=2)]
    _, diff = export_onnx(model, inputs, str(path))
    assert (diff.images, diff.detections) == (3, 3) and not diff.exceeded(ONNXRUNTIME_TOLERANCES), str(diff)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 3 and all(d.dim_param and not d.dim_value for d in dims[1:]), dims  # H, W open


def _write_images(folder, sizes):
    from PIL import Image

    rng = np.random.default_rng(1)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = folder / f"image{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.mark.slow
def test_fold_checkpoint_checks_the_export_on_the_verify_images(mask_rcnn, tmp_path):  # noqa: F811
    cfg, model = mask_rcnn
    torch.save({"model": model.state_dict(), "iteration": 4}, tmp_path / "model.pth")
    images = _write_images(tmp_path, [(120, 150), (150, 120), (100, 160)])
    output = tmp_path / "verified"
    result = fold_checkpoint(cfg, str(tmp_path / "model.pth"), str(output), export="torchscript",
                             verify=3, images=images)
    assert result.verified["frozen"].images == 3
    exported = result.exported["torchscript"]
    assert "vs eager: 3 images" in exported and exported.endswith(TORCHSCRIPT_LOAD_NOTE), exported

    result = fold_checkpoint(cfg, str(tmp_path / "model.pth"), str(tmp_path / "default"), export="torchscript",
                             images=images)
    assert not result.verified and f"vs eager: {EXPORT_CHECK_IMAGES} images" in result.exported["torchscript"]

    # What the note says: torch.jit.load finds torchvision's ops once torchvision is imported.
    load = "import sys, torch\n{}torch.jit.load(sys.argv[1])\nprint('loaded')"
    for prefix, ok in (("", False), ("import torchvision\n", True)):
        run = subprocess.run([sys.executable, "-c", load.format(prefix), str(output / "model.ts")],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
        assert (run.stdout.strip() == "loaded") == ok, run.stderr[-2000:]
        assert ok or "torchvision::" in run.stderr
