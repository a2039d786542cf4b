"""The benchmark scripts run end to end (smoke tests: their timings are not asserted)."""
import importlib.util
import os

import pytest

from ..conftest import REPO_ROOT


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layer_benchmark_reports_every_norm():
    report = _tool("benchmark_layers").main(["--quick"])
    for norm in ("MABN2d", "BatchNorm2d", "GroupNorm", "FrozenBN", "BatchRenorm2d"):
        assert f"| {norm} |" in report
    assert "MABN2d median over shapes" in report


@pytest.mark.slow
def test_training_benchmark_runs_mabn_in_its_steady_state():
    report = _tool("benchmark_train").main(["--height", "96", "--width", "128", "--repeats", "1",
                                            "--variants", "MABN", "BN"])
    assert "| MABN |" in report and "| BN |" in report and "nan" not in report.lower()


@pytest.mark.slow
def test_inference_benchmark_quick():
    report = _tool("benchmark_inference").main(["--quick", "--repeats", "1"])
    assert "FrozenBN" in report


def test_host_overhead_benchmark_stubs_the_launches_and_restores_everything():
    import torch

    from mabn_d2.layers import MABN2d
    from mabn_d2.layers import backend as backend_module
    from mabn_d2.layers.triton import launch as triton_launch, mabn as triton_mabn
    from research.host_overhead import host_overhead, host_overhead_report, stubbed_triton_launches

    saved = (triton_mabn.kernel_module, triton_launch.kernel_module, backend_module._device_reason)
    with stubbed_triton_launches():
        layer = MABN2d(4)
        x = torch.randn(2, 4, 3, 3, requires_grad=True)
        y = layer(x)  # the Triton path on the CPU, no kernel ran: the output is an empty tensor's garbage
        y.sum().backward()
        assert layer.iteration == 1
    assert (triton_mabn.kernel_module, triton_launch.kernel_module, backend_module._device_reason) == saved
    times = host_overhead(repeats=1, inner=3)
    assert set(times) == {"MABN2d", "BatchRenorm2d", "BatchNorm2d", "autograd.Function"}
    assert all(t > 0 for t in times.values())
    assert "| BatchNorm2d |" in host_overhead_report(repeats=1) and "vs BatchNorm2d" in host_overhead_report(1)
