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
