"""BatchStatsRecorder against a direct autograd computation of mu_B, sigma2_B, g_B and Psi_B."""
import copy
import json

import pytest
import torch
from detectron2.modeling.backbone.resnet import BasicBlock
from torch import nn

from research.ablations import MABNCentered2d
from mabn_d2.layers import CenteredConv2d, MABN2d
from research.batch_stats import BatchStatsRecorder, absolute_fluctuation, moving_average, relative_fluctuation

DIMS = (0, 2, 3)


def _model(norm: nn.Module, conv_cls=nn.Conv2d) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        conv_cls(3, 4, 3, padding=1, bias=False), norm, nn.ReLU(inplace=True),  # in place after the norm
        nn.Conv2d(4, 2, 1), nn.Flatten(), nn.LazyLinear(3),
    )
    model(torch.randn(2, 3, 5, 5))  # materialise the lazy layer
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    return model


def _loss(output: torch.Tensor, step: int) -> torch.Tensor:
    target = torch.randn(output.shape, generator=torch.Generator().manual_seed(100 + step))
    return (output * target).sum() + output.pow(2).sum()


def _direct_step(model: nn.Module, layer: nn.Module, inputs: torch.Tensor, step: int) -> dict:
    """One training step; returns the four statistics computed from x and dL/dy by autograd."""
    saved = {}

    def keep(module, args, output):
        saved["x"], saved["y"] = args[0].detach(), output
        return output.clone()  # later in-place ops hit the clone; `output` keeps its own gradient

    handle = layer.register_forward_hook(keep)
    loss = _loss(model(inputs), step)
    handle.remove()
    saved["y"].register_hook(lambda grad: saved.__setitem__("dy", grad))
    loss.backward()
    x, gamma = saved["x"].double(), layer.weight.detach().double().view(1, -1, 1, 1)
    mu = x.mean(DIMS, keepdim=True)
    var = ((x - mu) ** 2).mean(DIMS, keepdim=True)
    x_hat = (x - mu) / (var + layer.eps).sqrt()
    g = saved["dy"].double() * gamma
    return {"mu_B": mu.flatten(), "sigma2_B": var.flatten(), "g_B": g.mean(DIMS), "Psi_B": (g * x_hat).mean(DIMS)}


def _recorded_step(model: nn.Module, inputs: torch.Tensor, step: int) -> None:
    _loss(model(inputs), step).backward()


def _compare(norm: nn.Module, norm_name: str = "1", conv_cls=nn.Conv2d, steps: int = 3):
    direct_model = _model(norm, conv_cls)
    recorded_model = copy.deepcopy(direct_model)
    layer, recorded_layer = direct_model.get_submodule(norm_name), recorded_model.get_submodule(norm_name)
    generator = torch.Generator().manual_seed(1)
    expected = []
    with BatchStatsRecorder(recorded_model, [norm_name]) as recorder:
        for step in range(steps):
            inputs = torch.randn(2, 3, 5, 5, generator=generator) + 0.5
            expected.append(_direct_step(direct_model, layer, inputs, step))
            _recorded_step(recorded_model, inputs, step)
            for buffer, stat in (("x2_buffer", "chi2_sma"), ("gz_buffer", "psi_sma")):
                if hasattr(recorded_layer, buffer):
                    torch.testing.assert_close(recorder.records[norm_name][-1][stat],
                                               getattr(recorded_layer, buffer).mean(0))
    for stat in expected[0]:
        got = recorder.series(norm_name, stat)
        assert got.shape == (steps, 4) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), torch.stack([e[stat] for e in expected]), rtol=1e-4, atol=1e-6,
                                   msg=stat)
    return recorder


def test_batchnorm_statistics_match_autograd():
    _compare(nn.BatchNorm2d(4))


def test_groupnorm_statistics_match_autograd():
    _compare(nn.GroupNorm(2, 4))


def test_mabn_statistics_and_moving_averages_after_the_step():
    # buffer 2 and warm-up 3: iterations 3.. use the moving averages
    recorder = _compare(MABN2d(4, buffer_size=2, warmup_iters=3, renorm_warmup_iters=4),
                        conv_cls=CenteredConv2d, steps=6)
    assert set(recorder.statistics("1")) >= {"chi2_sma", "psi_sma", "chi2_B"}


def test_centered_ablation_records_all_four_moving_averages():
    recorder = _compare(MABNCentered2d(4, buffer_size=2, warmup_iters=3), steps=4)
    assert {"mu_sma", "g_sma", "chi2_sma", "psi_sma"} <= set(recorder.statistics("1"))
    layer = recorder.layers["1"]
    torch.testing.assert_close(recorder.series("1", "g_sma")[-1], layer.grad_mean_buffer.mean(0))
    torch.testing.assert_close(recorder.series("1", "mu_sma")[-1], layer.mean_buffer.mean(0))


def test_detectron2_block_with_in_place_relu():
    torch.manual_seed(0)
    block = BasicBlock(4, 4, stride=1, norm="BN")
    direct_block = copy.deepcopy(block)
    inputs = torch.randn(2, 4, 5, 5)
    with BatchStatsRecorder(block) as recorder:
        assert set(recorder.layers) == {"conv1.norm", "conv2.norm"}
        _recorded_step(block, inputs, 0)
    expected = _direct_step(direct_block, direct_block.conv1.norm, inputs, 0)
    for stat, value in expected.items():
        torch.testing.assert_close(recorder.series("conv1.norm", stat)[0].double(), value, rtol=1e-4, atol=1e-6)


def test_only_training_forwards_are_recorded_and_detach_stops_recording():
    model = _model(nn.BatchNorm2d(4))
    recorder = BatchStatsRecorder(model, ["1"]).attach()
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    with torch.no_grad():
        model(torch.randn(2, 3, 5, 5))  # training mode, no backward: NaN backward statistics
    model.eval()
    model(torch.randn(2, 3, 5, 5))  # eval: not an iteration
    recorder.detach()
    model.train()
    model(torch.randn(2, 3, 5, 5))
    assert len(recorder.records["1"]) == 2
    psi = recorder.series("1", "Psi_B")
    assert torch.isfinite(psi[0]).all() and torch.isnan(psi[1]).all()


def test_save_round_trips(tmp_path):
    model = _model(nn.BatchNorm2d(4))
    with BatchStatsRecorder(model) as recorder:
        for _ in range(2):
            model(torch.randn(2, 3, 5, 5)).sum().backward()
    data = torch.load(recorder.save(tmp_path / "stats.pt"))
    assert set(data["1"]) >= {"mu_B", "sigma2_B", "g_B", "Psi_B"}
    torch.testing.assert_close(data["1"]["Psi_B"], recorder.series("1", "Psi_B"))
    loaded = json.loads(recorder.save(tmp_path / "stats.json").read_text())
    torch.testing.assert_close(torch.tensor(loaded["1"]["mu_B"]), recorder.series("1", "mu_B"))
    with pytest.raises(ValueError):
        recorder.save(tmp_path / "stats.txt")


def test_unknown_layer_name_fails_with_the_known_norm_layers():
    with pytest.raises(KeyError, match="norm layers"):
        BatchStatsRecorder(_model(nn.BatchNorm2d(4)), ["nope"])


def test_moving_average_and_relative_fluctuation():
    series = torch.randn(30, 3, generator=torch.Generator().manual_seed(0))
    sma = moving_average(series, 4)
    for t in range(30):
        torch.testing.assert_close(sma[t], series[max(0, t - 3): t + 1].mean(0))
    assert relative_fluctuation(torch.full((20,), 3.0), window=5) == 0.0
    alternating = 10.0 + torch.tensor([1.0, -1.0] * 10)  # SMA over 2 is exactly 10
    assert relative_fluctuation(alternating, window=2) == pytest.approx(0.1)
    assert absolute_fluctuation(alternating, window=2) == pytest.approx(1.0)
    assert absolute_fluctuation(3 * alternating, window=2) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        relative_fluctuation(torch.ones(3), window=4)
