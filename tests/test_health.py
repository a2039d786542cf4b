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


def _data():
    generator = torch.Generator().manual_seed(1)
    while True:
        yield [{"x": torch.randn(2, 5, 5, generator=generator) * 3} for _ in range(2)]


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
    changes = [m for m in capture.messages if "every MABN layer normalizes" in m]
    # detectron2 counts iterations from 0: the layers' 4th training forward is iteration 3
    assert changes == ["MABN: from iteration 3 every MABN layer normalizes with moving averages",
                       "MABN: from iteration 7 every MABN layer normalizes with moving averages with re-normalization"]
    assert sum("MABN layers served by PyTorch operations (MABN_D2_BACKEND=auto" in m for m in capture.messages) == 1


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
