"""The study's official recipe (scaled by its stated rules), its one-change arms and the chi2 control."""
import json

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.solver import build_lr_scheduler
from detectron2.utils.events import EventStorage
from torch import nn

from mabn_d2.config import add_mabn_config, mabn_kwargs_from_cfg
from mabn_d2.layers import CenteredConv2d, MABN2d
from research.paper_setting import (
    ARMS, Chi2Recorder, MicroBatchTrainer, arm_config, official_schedule, summarize_chi2, variant_schedule,
)


def _cfg(arm: str, schedule):
    cfg = get_cfg()
    add_mabn_config(cfg)
    cfg.merge_from_list(arm_config(ARMS[arm], schedule))
    return cfg


def _lr_factors(cfg, steps):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_lr_scheduler(cfg, optimizer)
    factors = []
    for _ in range(steps):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return factors


def test_official_recipe_at_400_steps_follows_the_stated_rules():
    schedule = official_schedule(400, 100)
    assert (schedule.lr_warmup, schedule.sma_start, schedule.renorm_start, schedule.jitter) == (80, 20, 160, 0.0)
    cfg = _cfg("MABN_per_gpu", schedule)
    assert cfg.SOLVER.STEPS == (267, 356) and cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupMultiStepLR"
    assert cfg.SOLVER.BIAS_LR_FACTOR == 2.0 and cfg.SOLVER.WEIGHT_DECAY_BIAS == 0.0
    assert cfg.SOLVER.WEIGHT_DECAY_NORM == 1e-4 and not cfg.SOLVER.CLIP_GRADIENTS.ENABLED
    kwargs = mabn_kwargs_from_cfg(cfg)
    assert (kwargs["warmup_iters"], kwargs["renorm_warmup_iters"]) == (20, 160)
    lr = _lr_factors(cfg, 400)
    base = 1.0  # the scheduler multiplies the optimizer's LR (1.0 here)
    assert lr[0] == pytest.approx(base / 3)  # linear warm-up from 1/3
    assert lr[20] == pytest.approx(0.5 * base)  # the switch: half the peak, inside the warm-up
    assert lr[80] == pytest.approx(base) and lr[266] == pytest.approx(base)
    assert lr[267] == pytest.approx(0.1 * base) and lr[356] == pytest.approx(0.01 * base)


def test_the_variant_recipe_is_kept_under_its_name():
    schedule = variant_schedule(240, 80)
    cfg = get_cfg()
    add_mabn_config(cfg)
    cfg.merge_from_file("configs/Demo/fmnist_mask_rcnn_R_18_FPN_mabn.yaml")
    cfg.merge_from_list(arm_config(ARMS["MABN_per_gpu"], schedule))
    assert (schedule.recipe, schedule.jitter, cfg.SOLVER.WARMUP_ITERS) == ("variant", 0.4, 26)
    assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupCosineLR"
    assert mabn_kwargs_from_cfg(cfg)["warmup_iters"] == 30


def _differences(arm: str, schedule):
    base, other = ARMS["MABN_per_gpu"], ARMS[arm]
    changes = []
    if base.config != other.config or base.norm_state != other.norm_state:
        changes.append("state")
    if base.jitter_for(schedule) != other.jitter_for(schedule):
        changes.append("jitter")
    if base.phase_steps(schedule)[0] != other.phase_steps(schedule)[0]:
        changes.append("switch")
    if base.phase_steps(schedule)[1] != other.phase_steps(schedule)[1]:
        changes.append("renorm")
    return changes


@pytest.mark.parametrize("arm, change", [("MABN_per_gpu_no_renorm", "renorm"), ("MABN_per_gpu_late_switch", "switch"),
                                         ("MABN_per_gpu_jitter", "jitter"), ("MABN_shared", "state")])
def test_every_attribution_arm_changes_one_thing(arm, change):
    schedule = official_schedule(400, 100)
    assert _differences(arm, schedule) == [change]
    solver = list(schedule.solver_opts)
    for name in ("MABN_per_gpu", arm):  # the same solver; only MODEL.MABN keys follow
        opts = ARMS[name].opts(schedule)
        assert opts[:len(solver)] == solver and all(k.startswith("MODEL.MABN.") for k in opts[len(solver)::2])


def test_late_switch_is_after_the_lr_warm_up_and_shared_counts_layer_iterations():
    schedule = official_schedule(400, 100)
    assert ARMS["MABN_per_gpu_late_switch"].phase_steps(schedule) == (100, 160)
    shared = mabn_kwargs_from_cfg(_cfg("MABN_shared", schedule))
    assert (shared["warmup_iters"], shared["renorm_warmup_iters"]) == (160, 1280)  # 8 layer iterations per step
    off = mabn_kwargs_from_cfg(_cfg("MABN_per_gpu_no_renorm", schedule))
    assert off["renorm_warmup_iters"] > 400


class _Net(nn.Module):
    """conv -> MABN -> conv -> BN; the loss reads both."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = CenteredConv2d(2, 3, 3, padding=1)
        self.mabn = MABN2d(3, buffer_size=2, warmup_iters=2, renorm_warmup_iters=100)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.inputs = {}

    def forward(self, batch):
        x = torch.stack([d["x"] for d in batch])
        a = self.conv1(x)
        self.inputs.setdefault("mabn", []).append(a.detach())
        b = self.conv2(self.mabn(a))
        self.inputs.setdefault("bn", []).append(b.detach())
        return {"loss": self.bn(b).pow(2).mean()}


def _run(norm_state, steps, tmp_path, micro=4):
    model = _Net().train()
    generator = torch.Generator().manual_seed(1)
    data = [[{"x": torch.randn(2, 5, 5, generator=generator) * (1 + i)} for i in range(8)] for _ in range(steps)]
    path = tmp_path / f"{norm_state}.jsonl"
    recorder = Chi2Recorder(model, str(path), micro)
    trainer = MicroBatchTrainer(model, iter(data), torch.optim.SGD(model.parameters(), lr=0.0), micro, norm_state,
                                recorder)
    with EventStorage(0):
        for step in range(steps):
            trainer.iter = step
            model.inputs = {}
            trainer.run_step()
            yield model, [json.loads(line) for line in path.read_text().splitlines()][-1]


def _log_medians(first, pooled):
    ratio = (first / pooled).log()
    return [float(ratio.abs().median()), float(ratio.median())]


def test_the_control_compares_micro_batch_0_with_the_step_pooled_statistic(tmp_path):
    for step, (model, row) in enumerate(_run("shared", 4, tmp_path)):
        a, b = torch.cat(model.inputs["mabn"]), torch.cat(model.inputs["bn"])
        a0, b0 = model.inputs["mabn"][0], model.inputs["bn"][0]
        # chi2 for MABN (mean square), the variance for BN, pooled over all 8 images of the step
        expected_mabn = _log_medians(a0.pow(2).mean((0, 2, 3)), a.pow(2).mean((0, 2, 3)))
        expected_bn = _log_medians(b0.var((0, 2, 3), unbiased=False), b.var((0, 2, 3), unbiased=False))
        assert row["step"]["mabn"] == pytest.approx(expected_mabn, rel=1e-4, abs=1e-6)
        assert row["step"]["bn"] == pytest.approx(expected_bn, rel=1e-4, abs=1e-6)
        # shared: 4 layer iterations per step; micro-batch 0 of step 1 is the layer's 5th, past its buffer of 2
        assert ("mabn" in row["sma"]) == (step >= 1) and "bn" not in row["sma"]


def test_one_forward_over_the_step_gives_the_same_control_for_the_first_layer(tmp_path):
    (_, shared), = list(_run("shared", 1, tmp_path))
    (_, sync), = list(_run("sync", 1, tmp_path))
    assert sync["step"]["mabn"] == pytest.approx(shared["step"]["mabn"], rel=1e-4, abs=1e-6)
    assert sync["sma"] == {}


def test_summarize_chi2_keeps_both_statistics_per_window(tmp_path):
    path = tmp_path / "chi2.jsonl"
    rows = [{"iteration": i, "sma": {"x": [0.5, -0.1]} if i >= 2 else {}, "step": {"x": [0.2, 0.0], "y": [0.4, 0.1]}}
            for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = summarize_chi2(str(path), [0, 2, 4])
    assert summary["sma"] == {"2-4": {"all layers": (0.5, -0.1)}}
    assert summary["step"]["0-2"]["all layers"] == (0.3, 0.05)


def test_the_demo_variants_take_the_official_solver_scaled_to_450_iterations():
    from research.detection_study import VARIANTS

    for name in ("BN_official", "MABN_official", "MABN_bn_heads_official"):
        variant = VARIANTS[name]
        cfg = get_cfg()
        add_mabn_config(cfg)
        cfg.merge_from_file(variant.config)
        cfg.merge_from_list(list(variant.opts))
        assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.WARMUP_ITERS) == (450, 2, 90)
        assert cfg.SOLVER.STEPS == (300, 400) and not cfg.SOLVER.CLIP_GRADIENTS.ENABLED
        assert cfg.SOLVER.BIAS_LR_FACTOR == 2.0 and cfg.SOLVER.WEIGHT_DECAY_NORM == 1e-4
        assert "TEST.EVAL_PERIOD" not in variant.opts  # the study's own period applies
        kwargs = mabn_kwargs_from_cfg(cfg)
        assert (kwargs["warmup_iters"], kwargs["renorm_warmup_iters"]) == (22, 180)
    assert ARMS  # the module imports together with the study's
