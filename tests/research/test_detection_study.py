"""The detection study: variants, periodic evaluation curves, running_var re-estimation, warm-up warning."""
import json
import logging
import os
import math
import subprocess

import pytest
import torch
from torch import nn

from research.detection_study import (
    METRICS, VARIANTS, evaluation_curve, final_metrics, run_detection_study,
)
from mabn_d2.layers import CenteredConv2d, MABN2d
from mabn_d2.modeling.precise_stats import update_mabn_running_var
from mabn_d2.engine.reestimation import evaluation_records

from ..conftest import REPO_ROOT
from ..test_engine import TINY, _tiny_cfg


def _metrics(value):
    return dict.fromkeys(METRICS, value)


def test_evaluation_curve_maps_detectron2_iterations_to_iterations_trained(tmp_path):
    assert evaluation_curve(str(tmp_path)) == {} and final_metrics(str(tmp_path)) is None
    (tmp_path / "config.yaml").write_text("SOLVER:\n  MAX_ITER: 6\n")
    # periodic evaluations are logged at the index of the last iteration, the final one at MAX_ITER
    lines = [{"iteration": 1, "total_loss": 3.0}, {"iteration": 2, **_metrics(1.0)}, {"iteration": 5, **_metrics(2.0)}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert evaluation_curve(str(tmp_path)) == {3: _metrics(1.0), 6: _metrics(2.0)}
    assert final_metrics(str(tmp_path)) == _metrics(2.0)
    with open(tmp_path / "metrics.json", "w") as f:
        for record in lines[:2] + [{"iteration": 6, **_metrics(4.0)}]:
            f.write(json.dumps(record) + "\n")
    assert evaluation_curve(str(tmp_path)) == {3: _metrics(1.0), 6: _metrics(4.0)}
    assert set(evaluation_records(str(tmp_path / "metrics.json"), 6)) == {3, 6}


def test_an_evaluation_without_detections_counts_as_zero_ap(tmp_path):
    (tmp_path / "config.yaml").write_text("SOLVER:\n  MAX_ITER: 6\n")
    nothing = {"bbox/AP": float("nan"), "bbox/AP50": float("nan")}  # what COCOEvaluator logs then
    lines = [{"iteration": 2, **nothing}, {"iteration": 6, **_metrics(2.0)}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert evaluation_curve(str(tmp_path)) == {3: _metrics(0.0), 6: _metrics(2.0)}


def test_unfinished_run_has_no_final_metrics(tmp_path):
    (tmp_path / "config.yaml").write_text("SOLVER:\n  MAX_ITER: 9\n")
    (tmp_path / "metrics.json").write_text(json.dumps({"iteration": 2, **_metrics(1.0)}) + "\n")
    assert evaluation_curve(str(tmp_path)) == {3: _metrics(1.0)}
    assert final_metrics(str(tmp_path)) is None


def test_variants_name_existing_configs_and_sources():
    for name, variant in VARIANTS.items():
        if variant.reestimate:
            assert variant.reestimate in VARIANTS and not variant.config, name
        else:
            assert os.path.exists(os.path.join(REPO_ROOT, variant.config)), name
            assert len(variant.opts) % 2 == 0, name
    with pytest.raises(ValueError, match="unknown study variants"):
        run_detection_study("unused", ["MABN_typo"], [0])


class _TwoLayerNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = CenteredConv2d(2, 3, 3, padding=1)
        self.norm1 = MABN2d(3, buffer_size=2, warmup_iters=0, renorm_warmup_iters=0)
        self.norm2 = MABN2d(3, buffer_size=2, warmup_iters=0, renorm_warmup_iters=0)

    def forward(self, x):
        return self.norm2(torch.relu(self.norm1(self.conv(x))) * 2.0 + 1.0)


def test_update_mabn_running_var_averages_the_training_second_moment():
    torch.manual_seed(0)
    model = _TwoLayerNet().double()
    model.train()
    for _ in range(5):  # a trained state: counters past the warm-ups, filled ring buffers
        model(torch.randn(2, 2, 5, 5, dtype=torch.float64)).sum().backward()
    batches = [torch.randn(2, 2, 5, 5, dtype=torch.float64) * (i + 1) for i in range(4)]
    before = {k: v.clone() for k, v in model.state_dict().items()}

    # independent expectation: replay the same training-mode forwards on a copy, by hand
    reference = _TwoLayerNet().double()
    reference.load_state_dict(model.state_dict())
    reference.train()
    chi2_1, chi2_2 = [], []
    with torch.no_grad():
        for x in batches:
            h = reference.conv(x)
            chi2_1.append((h ** 2).mean(dim=(0, 2, 3)))
            h2 = torch.relu(reference.norm1(h)) * 2.0 + 1.0
            chi2_2.append((h2 ** 2).mean(dim=(0, 2, 3)))
            reference.norm2(h2)

    assert update_mabn_running_var(model, batches, num_iters=4) == 2
    torch.testing.assert_close(model.norm1.running_var, torch.stack(chi2_1).mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(model.norm2.running_var, torch.stack(chi2_2).mean(0), rtol=1e-12, atol=0)
    for key, value in model.state_dict().items():  # nothing but running_var changed
        if not key.endswith("running_var"):
            assert torch.equal(value, before[key]), key
    assert model.norm1.iteration == 5 and model.training


def test_update_mabn_running_var_skips_non_finite_batches_per_channel():
    layer = MABN2d(2)
    layer.running_var.fill_(7.0)
    good = torch.ones(1, 2, 2, 2) * 3.0
    bad = good.clone()
    bad[0, 1, 0, 0] = float("nan")
    update_mabn_running_var(nn.Sequential(layer), [good, bad], num_iters=2)
    torch.testing.assert_close(layer.running_var, torch.tensor([9.0, 9.0]))  # channel 1 from the good batch only
    assert update_mabn_running_var(nn.Sequential(nn.ReLU()), [good], num_iters=1) == 0
    with pytest.raises(ValueError, match="num_iters"):
        update_mabn_running_var(nn.Sequential(layer), [good], num_iters=0)


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("fractions, warns", [(("-1.0", "-1.0"), True), (("0.02", "0.1"), False)])
def test_trainer_warns_when_renormalization_starts_late(demo_datasets_dir, tmp_path, fractions, warns):
    from mabn_d2.engine.trainer import MABNTrainer

    cfg = _tiny_cfg(tmp_path, "SOLVER.MAX_ITER", "900", "MODEL.MABN.WARMUP_FRACTION", fractions[0],
                    "MODEL.MABN.RENORM_WARMUP_FRACTION", fractions[1])
    capture = _Capture()
    logger = logging.getLogger("mabn_d2.engine.trainer")
    logger.addHandler(capture)
    try:
        MABNTrainer(cfg)
    finally:
        logger.removeHandler(capture)
    warned = [m for m in capture.messages if "re-normalization starts after iteration" in m]
    assert bool(warned) == warns, capture.messages


@pytest.mark.slow
def test_study_runs_variants_with_curves_then_skips_finished_runs(demo_datasets_dir, tmp_path, monkeypatch):
    opts = TINY + ["SOLVER.MAX_ITER", "4"]
    variants = ["MABN_warmups_2_10", "MABN_paper_warmups", "MABN_paper_warmups_reestimated"]
    results = run_detection_study(str(tmp_path), variants, [0], opts, eval_period=2, reestimate_batches=2,
                                  repo_root=REPO_ROOT)
    for name in variants:
        assert sorted(results[name][0]) == [2, 4], name  # evaluated at iteration 2 and at the end
        assert set(results[name][0][4]) == set(METRICS)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # the run names the commit it trained at
        with open(os.path.join(str(tmp_path), "MABN_warmups_2_10_seed0", "code_commit.txt")) as f:
            assert f.read().strip() == head.stdout.strip()
    reestimated = os.path.join(str(tmp_path), "MABN_paper_warmups_reestimated_seed0", "metrics.json")
    with open(reestimated) as f:
        sources = [json.loads(line)["reestimated_from"] for line in f if line.strip()]
    assert [os.path.basename(s) for s in sources] == ["model_0000001.pth", "model_final.pth"]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(subprocess, "run", no_training)
    assert run_detection_study(str(tmp_path), variants, [0], opts, eval_period=2, repo_root=REPO_ROOT) == results


def test_trace_losses_is_reproducible_for_a_seed_and_moves_with_it(demo_datasets_dir):
    """tools/trace_losses.py: the same seed gives the same per-iteration losses; another seed does not."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("trace_losses", os.path.join(REPO_ROOT, "tools/trace_losses.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = ["--config-file", os.path.join(REPO_ROOT, "configs/Demo/fmnist_mask_rcnn_R_18_FPN_bn.yaml"),
            "--iterations", "2", *TINY]
    first, again = tool.main(args), tool.main(args)
    other_seed = tool.main(args + ["SEED", "1"])
    assert len(first) == 2 and all(math.isfinite(loss) for loss in first)
    assert first == again
    assert first != other_seed


def test_results_doc_is_rendered_from_a_results_folder_alone(tmp_path):
    """tools/make_results.py: committed sections verbatim (figures copied), records rendered with commit and wall."""
    import importlib.util

    from research.run_records import write_record

    spec = importlib.util.spec_from_file_location("make_results", os.path.join(REPO_ROOT, "tools/make_results.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    results = tmp_path / "results"
    (results / "small_batch_study").mkdir(parents=True)
    (results / "small_batch_study" / "section.md").write_text("## 1. Study\n\nthe tables\n\n![c](accuracy_curves.png)\n")
    (results / "small_batch_study" / "accuracy_curves.png").write_bytes(b"png")
    for variant, wall, commit in (("BN", 12.0, "abc1234"), ("GN", None, "def5678")):
        write_record(str(results / "detection_study"), {
            "study": "detection_study", "variant": variant, "seed": 0, "description": "d",
            "curve": {"4": {key: 10.0 for key in METRICS}}, "loss_windows": None, "commit": commit,
            "wall_minutes": wall, "config_opts": [], "source": "test"})
    text = tool.make_results(results, tmp_path / "docs" / "results.md")
    assert "the tables" in text and "![c](../results/small_batch_study/accuracy_curves.png)" in text
    assert not (tmp_path / "docs" / "study_accuracy_curves.png").exists()  # linked, not copied
    assert "| BN_seed0 | 12.0 | abc1234 | test |" in text
    assert "| GN_seed0 | – | def5678 | test |" in text
    assert (tmp_path / "docs" / "detection_ap_curves.png").exists()
    assert "## 5." not in text  # no paper-setting records, no section


@pytest.mark.parametrize("warmups", [("9", "45"), ("20", "160")])
def test_trainer_no_longer_warns_about_the_warmup_order(demo_datasets_dir, tmp_path, warmups):
    """Moving averages inside the LR warm-up are the official recipe (100 of 500), not a mistake."""
    from mabn_d2.engine.trainer import MABNTrainer

    cfg = _tiny_cfg(tmp_path, "SOLVER.MAX_ITER", "450", "SOLVER.WARMUP_ITERS", "90",
                    "MODEL.MABN.WARMUP_FRACTION", "-1.0", "MODEL.MABN.RENORM_WARMUP_FRACTION", "-1.0",
                    "MODEL.MABN.WARMUP_ITERS", warmups[0], "MODEL.MABN.RENORM_WARMUP_ITERS", warmups[1])
    capture = _Capture()
    logger = logging.getLogger("mabn_d2.engine.trainer")
    logger.addHandler(capture)
    try:
        MABNTrainer(cfg)
    finally:
        logger.removeHandler(capture)
    assert not [m for m in capture.messages if "out of order" in m], capture.messages
