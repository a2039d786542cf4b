"""MABN's health scalars and log lines: values against the layers' own state, phases at the right iterations."""
import logging

import pytest
import torch
from detectron2.engine import SimpleTrainer
from torch import nn

from mabn_d2.engine.health import MABNHealthHook, layer_phase, mabn_health_scalars
from mabn_d2.layers import MABN2d


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.norm = MABN2d(4, buffer_size=2, warmup_iters=4, renorm_warmup_iters=7, renorm_clip=1.05)
        self.norm2 = MABN2d(4, buffer_size=2, warmup_iters=4, renorm_warmup_iters=7, renorm_clip=1.05)
        self.norm.allow_uncentered = self.norm2.allow_uncentered = True  # the opt-out, where it exists

    def forward(self, batch):
        x = torch.stack([d["x"] for d in batch])
        return {"loss": self.norm2(self.norm(self.conv(x))).pow(2).mean()}


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _data(nan_at=()):
    """Batches of two images; the batches numbered in `nan_at` (from 0) carry a NaN pixel."""
    generator = torch.Generator().manual_seed(1)
    index = 0
    while True:
        batch = [{"x": torch.randn(2, 5, 5, generator=generator) * 3} for _ in range(2)]
        if index in nan_at:
            batch[1]["x"][0, 2, 2] = float("nan")
        index += 1
        yield batch


def test_phase_follows_the_warmups():
    layer = MABN2d(3, buffer_size=2, warmup_iters=4, renorm_warmup_iters=7)
    phases = []
    for _ in range(9):
        layer.train()(torch.randn(2, 3, 2, 2))
        phases.append(layer_phase(layer))
    # iterations 1-3 batch statistics, 4-7 moving averages, 8 on re-normalized (1-based)
    assert phases == [0, 0, 0, 1, 1, 1, 1, 2, 2]


def test_scalars_against_the_state():
    net = _Net().train()
    data = _data()
    for _ in range(9):
        net(next(data))
    layers = [net.norm, net.norm2]
    scalars = mabn_health_scalars(layers)
    ratios, clipped = [], 0
    for layer in layers:
        sma = layer.x2_buffer.mean(0)
        ratios.append((layer.x2_buffer[layer.iteration % 2] / sma).log())
        r = ((sma + layer.eps) / (layer.running_var + layer.eps)).sqrt()
        clipped += int(((r <= 1 / 1.05) | (r >= 1.05)).sum())
    log_ratio = torch.cat(ratios)
    assert scalars["mabn/phase"] == 2.0
    assert scalars["mabn/chi2_log_ratio_abs_median"] == pytest.approx(float(log_ratio.abs().median()), rel=1e-5)
    assert scalars["mabn/chi2_log_ratio_median"] == pytest.approx(float(log_ratio.median()), rel=1e-5, abs=1e-7)
    assert scalars["mabn/r_clipped_fraction"] == pytest.approx(clipped / 8)
    assert 0 < scalars["mabn/chi2_log_ratio_abs_median"]
    assert scalars["mabn/nonfinite_skipped"] == 0.0


def test_skipped_batches_are_the_largest_layer_count():
    """A NaN batch reaches both layers and counts once; a layer's own extra skip raises the maximum."""
    net = _Net().train()
    data = _data(nan_at=(2,))
    for _ in range(4):
        net(next(data))["loss"].backward()
    assert net.norm.nonfinite_skipped[0] == net.norm2.nonfinite_skipped[0] == 1
    assert mabn_health_scalars([net.norm, net.norm2])["mabn/nonfinite_skipped"] == 1.0
    net.norm2(torch.full((1, 4, 2, 2), float("inf")))
    assert mabn_health_scalars([net.norm, net.norm2])["mabn/nonfinite_skipped"] == 2.0


def test_the_hook_writes_scalars_every_period_and_logs_each_phase_change_once():
    net = _Net().train()
    data = _data()
    trainer = SimpleTrainer(net, data, torch.optim.SGD(net.parameters(), lr=0.0))
    trainer.register_hooks([MABNHealthHook(period=3)])
    capture = _Capture()
    logger = logging.getLogger("mabn_d2.engine.health")
    logger.setLevel(logging.INFO)
    logger.addHandler(capture)
    try:
        trainer.train(0, 10)
    finally:
        logger.removeHandler(capture)
    history = trainer.storage.history("mabn/phase")
    assert [it for _, it in history.values()] == [2, 5, 8, 9]  # every 3 iterations and the last
    assert [v for v, _ in history.values()] == [0.0, 1.0, 2.0, 2.0]
    assert trainer.storage.history("mabn/r_clipped_fraction").latest() >= 0.0
    assert [v for v, _ in trainer.storage.history("mabn/nonfinite_skipped").values()] == [0.0] * 4
    changes = [m for m in capture.messages if "every MABN layer normalizes" in m]
    # detectron2 counts iterations from 0: the layers' 4th training forward is iteration 3
    assert changes == ["MABN: from iteration 3 every MABN layer normalizes with moving averages",
                       "MABN: from iteration 7 every MABN layer normalizes with moving averages with re-normalization"]
    assert sum("MABN layers served by PyTorch operations (MABN_D2_BACKEND=auto" in m for m in capture.messages) == 1


def test_the_hook_reports_skipped_batches_as_a_running_total():
    """Batches 1 and 4 (iterations 1 and 4) carry NaN: the averages keep their finite values,
    training goes on (parameters not stepped, so NaN gradients do not reach them; loss not
    checked) and the written total steps up at the periods after."""

    class _Trainer(SimpleTrainer):
        def _write_metrics(self, *args, **kwargs):  # detectron2 ends a run on a NaN loss; the layers must not
            pass

    net = _Net().train()
    untouched = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    trainer = _Trainer(net, _data(nan_at=(1, 4)), untouched)
    trainer.register_hooks([MABNHealthHook(period=3)])
    trainer.train(0, 9)
    history = trainer.storage.history("mabn/nonfinite_skipped")
    assert [(it, v) for v, it in history.values()] == [(2, 1.0), (5, 2.0), (8, 2.0)]
    for layer in (net.norm, net.norm2):
        for name in ("running_var", "x2_buffer", "gz_buffer"):
            assert torch.isfinite(getattr(layer, name)).all(), name


def test_a_model_without_mabn_is_left_alone():
    net = nn.Linear(2, 1)

    class _Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, batch):
            return {"loss": self.net(torch.ones(1, 2)).sum()}

    model = _Model()
    trainer = SimpleTrainer(model, iter(lambda: [0], None), torch.optim.SGD(model.parameters(), lr=0.0))
    trainer.register_hooks([MABNHealthHook(period=1)])
    trainer.train(0, 2)
    assert "mabn/phase" not in trainer.storage.histories()
    with pytest.raises(ValueError, match="period"):
        MABNHealthHook(period=0)


def test_the_results_section_reads_phase_changes_and_costs_from_the_records(tmp_path):
    from research.health_report import health_section, logged_phase_changes, phase_changes, plot_health_scalars

    phase = [[1, 0.0], [3, 0.0], [5, 1.0], [7, 1.0], [9, 2.0]]
    assert phase_changes(phase) == [(5, 1), (9, 2)]
    demo = {
        "command": "python tools/health_demo.py ...", "config": "demo.yaml", "torch": "x", "max_iter": 10,
        "warmup_iters": 4, "renorm_warmup_iters": 8, "buffer_size": 2, "period": 2,
        "scalars": {"mabn/phase": phase, "mabn/r_clipped_fraction": [[it, 0.1 * it] for it, _ in phase],
                    "mabn/chi2_log_ratio_abs_median": [[it, 0.5] for it, _ in phase],
                    "mabn/nonfinite_skipped": [[it, 0.0] for it, _ in phase]},
        "log": ["MABN: from iteration 5 every MABN layer normalizes with moving averages",
                "MABN: from iteration 9 every MABN layer normalizes with moving averages with re-normalization"],
    }
    overhead = {"command": "python tools/benchmark_train.py --health-overhead", "torch": "x", "config": "demo.yaml",
                "device": "CPU", "period": 10, "blocks": 2, "warmup_steps": 1,
                "block_seconds": {"on": [10.0, 12.0], "off": [11.0, 11.0]}, "median_ratio": 1.0,
                "ratio_min": 10 / 11, "ratio_max": 12 / 11, "hook_seconds_per_step": 0.002,
                "hook_share_of_step": 0.0002, "mabn_layers": 36, "hook_read_seconds_median": 0.02}
    assert logged_phase_changes(demo["log"]) == [(5, 1), (9, 2)]
    text = "\n".join(health_section(demo, overhead, "figure.png"))
    assert "The log names both phase changes" in text
    assert "| 2 moving averages with re-normalization | 9–9 | 0.500 |" in text
    assert "| 2 | 12.00 | 11.00 | 1.091 |" in text and "the range includes 1" in text
    demo["log"] = demo["log"][:1]
    assert "The log names 1 of the 2 phase changes" in "\n".join(health_section(demo, None, "figure.png"))
    plot_health_scalars(demo, str(tmp_path / "f.png"))
    assert (tmp_path / "f.png").stat().st_size > 5_000


@pytest.mark.slow
def test_the_overhead_benchmark_times_both_arms_and_the_hook(demo_datasets_dir, tmp_path):
    """tools/benchmark_train.py --health-overhead on the tiny demo: one block per arm, JSON written."""
    import importlib.util
    import json
    import os

    from .conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("benchmark_train", os.path.join(REPO_ROOT, "tools", "benchmark_train.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    output = tmp_path / "health_overhead.json"
    tiny = ["DATASETS.TRAIN", "('fmnist_coco_tiny_train',)", "DATASETS.TEST", "()", "MODEL.FPN.OUT_CHANNELS", "64",
            "MODEL.ROI_BOX_HEAD.CONV_DIM", "64", "MODEL.ROI_BOX_HEAD.FC_DIM", "128", "MODEL.ROI_MASK_HEAD.CONV_DIM", "64",
            "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96"]
    config = os.path.join(REPO_ROOT, "configs", "Demo", "fmnist_mask_rcnn_R_18_FPN_mabn.yaml")
    report = tool.main(["--health-overhead", "--config-file", config, "--blocks", "2", "--period", "2", "--warmup-steps", "1",
                        "--output", str(output), *tiny])
    result = json.loads(output.read_text())
    assert len(result["ratios"]) == 2 and all(r > 0 for r in result["ratios"])
    assert result["steps_per_arm"] == 4 and result["mabn_layers"] > 0 and result["hook_read_seconds_median"] > 0
    assert result["command"].startswith("python tools/benchmark_train.py --health-overhead")
    assert "step time ratio on/off" in report
