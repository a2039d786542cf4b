"""The demo (the README's main job) on the tiny dataset: every artefact is produced and checked."""
import json
import os

import pytest
from PIL import Image

from research.demo import format_summary, run_demo

from ..test_engine import DEMO_CONFIG, TINY


@pytest.mark.slow
def test_demo_trains_evaluates_draws_folds_and_exports(demo_datasets_dir, tmp_path):
    summary = run_demo(DEMO_CONFIG, str(tmp_path), TINY + ["SOLVER.MAX_ITER", "3"], verify_images=2)
    assert {"AP", "AP50"} <= set(summary["bbox"]) and {"AP", "AP50"} <= set(summary["segm"])
    with Image.open(summary["predictions_png"]) as image:
        assert image.size[0] > 0 and image.mode == "RGB"
    names = {os.path.basename(f) for f in summary["folded"]["files"]}
    assert names == {"model_folded.pth", "config_folded.yaml", "model.ts"}
    assert all(os.path.exists(f) for f in summary["folded"]["files"])
    assert "boxes 0 px" in summary["folded"]["verified"]["frozen"]
    assert set(summary["inference_seconds_per_image"]) == {"MABN (eval, unfolded)", "folded (FrozenBN)"}
    written = json.loads((tmp_path / "demo_summary.json").read_text())
    assert written["segm"] == pytest.approx(summary["segm"], nan_ok=True)
    assert "ms / image" in format_summary(summary)
