"""tools/benchmark_cuda.py and its additions to the plugin's GPU check (research.cuda_benchmarks):
the ablation layers in the check's sections, the layer timings and the Mask R-CNN step, on the CPU.

The plugin's own checks (mabn_d2.layers.cuda_check) are tested in tests/test_check_cuda.py.
"""
import os
import subprocess
import sys

import pytest
import torch

from ..conftest import REPO_ROOT, load_tool

SCRIPT = os.path.join(REPO_ROOT, "tools", "benchmark_cuda.py")
CPU = torch.device("cpu")
ABLATIONS = ("MABNForwardOnly2d", "MABNCentered2d")


@pytest.fixture(scope="module")
def check_cuda():
    import mabn_d2.layers.cuda_check as module

    return module


@pytest.fixture(scope="module")
def benchmarks():
    import research.cuda_benchmarks as module

    return module


def _tool(name):
    return load_tool(name)


@pytest.fixture(scope="module")
def check_cuda_tool():
    return _tool("check_cuda")


@pytest.fixture(scope="module")
def benchmark_tool():
    return _tool("benchmark_cuda")


# --------------------------------------------------------------------------- the ablation layers
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ablation_layers_pass_the_correctness_check_on_the_cpu(check_cuda, benchmarks, dtype):
    layers = benchmarks.short_phase_layers()
    assert tuple(layers) == ABLATIONS
    rows = [check_cuda.check_layer_against_cpu(CPU, dtype, name, factory, check_cuda.SHORT_ITERATIONS)
            for name, factory in layers.items()]
    assert all(row.status == "ok" for row in rows), check_cuda.markdown(rows)


def test_ablation_correctness_check_fails_when_the_device_run_differs(check_cuda, benchmarks, monkeypatch):
    """MABNCentered2d's float32 run off by 0.1% (its float64 reference untouched): the check fails."""
    import research.ablations as ablations

    original = ablations.channel_normalize

    def off_in_float32(x, var, scale, shift, eps, mean=None):
        y = original(x, var, scale, shift, eps, mean=mean)
        return y * 1.001 if x.dtype == torch.float32 else y

    monkeypatch.setattr(ablations, "channel_normalize", off_in_float32)
    factory = benchmarks.short_phase_layers()["MABNCentered2d"]
    rows = [check_cuda.check_layer_against_cpu(CPU, dtype, "MABNCentered2d", factory, check_cuda.SHORT_ITERATIONS)
            for dtype in (torch.float64, torch.float32)]
    assert [row.status for row in rows] == ["ok", "FAIL"], check_cuda.markdown(rows)


def test_ablation_layers_join_the_host_sync_and_autocast_sections(check_cuda, benchmarks, check_cuda_tool):
    layers = benchmarks.short_phase_layers()
    rows = check_cuda.host_sync_rows(CPU, host_read_watch=check_cuda_tool.forbid_host_reads, extra_layers=layers)
    assert [row.case.split(":")[0] for row in rows] == ["MABN2d", "BatchRenorm2d", *ABLATIONS]
    assert [row.status for row in rows] == ["ok"] * 4, check_cuda.markdown(rows)
    rows = check_cuda.autocast_rows(CPU, extra_layers=layers)
    assert len(rows) == 8
    assert all(row.status == "ok" for row in rows), check_cuda.markdown(rows)


# --------------------------------------------------------------------------- timings
def test_layer_timing_rows(benchmarks):
    rows = benchmarks.layer_time_rows(CPU, shapes=[(2, 64, 6, 8)], repeats=1)
    assert [row.case for row in rows[:5]] == [f"2x64x6x8 {n}" for n in ("MABN2d", "BatchNorm2d", "GroupNorm", "FrozenBN", "BatchRenorm2d")]
    assert "1.00x BN" in rows[1].result and "median over shapes" in rows[-1].case


def test_speed_targets_are_judged_for_the_triton_step_on_cuda_only(benchmarks):
    from mabn_d2.layers.backend import use_backend

    rows = benchmarks.layer_time_rows(CPU, shapes=[(2, 64, 6, 8)], repeats=1)
    assert [row.case for row in rows[-2:]] == ["BatchRenorm2d, median over shapes", "MABN2d, median over shapes"]
    assert all(row.status == "info" and "1.2x BN" in rows[-1].limit for row in rows[-2:])
    assert [row.speed_ratio for row in rows] == [False] * (len(rows) - 2) + [True] * 2  # the summary's ratios
    cuda = torch.device("cuda")
    with use_backend("auto"):
        assert benchmarks._speed_row("layer time", "c", "r", {"fast": True}, cuda).status == "ok"
        assert benchmarks._speed_row("layer time", "c", "r", {"fast": True, "slow": False}, cuda).status == "FAIL"
    with use_backend("torch"):
        assert benchmarks._speed_row("layer time", "c", "r", {"slow": False}, cuda).status == "info"


def test_timing_sections_run_once_per_backend_with_backend_free_norms_on_the_first(check_cuda, benchmarks, monkeypatch):
    from mabn_d2.layers.backend import selected_backend

    calls = []

    def recorded(section):
        def rows_of(device, *args):
            calls.append((section, selected_backend(), args))
            return [check_cuda.Row(section, f"seen {selected_backend()}", "", "", "ok")]
        return rows_of

    monkeypatch.setattr(benchmarks, "layer_time_rows", recorded("layer time"))
    monkeypatch.setattr(benchmarks, "maskrcnn_rows", recorded("Mask R-CNN step"))
    for name in ("correctness_rows", "host_sync_rows", "autocast_rows"):
        monkeypatch.setattr(check_cuda, name, lambda *a, **k: [])
    sections = benchmarks.timing_sections(CPU, repeats=3, model_repeats=2, height=64, width=96, shapes=[(2, 8, 4, 4)])
    rows = check_cuda.run_checks(CPU, backends=("torch", "auto"), extra_sections=sections)
    assert [row.case for row in rows if row.section == "Mask R-CNN step"] == ["[torch] seen torch", "[auto] seen auto"]
    assert calls == [
        ("layer time", "torch", ([(2, 8, 4, 4)], 3, None)),
        ("layer time", "auto", ([(2, 8, 4, 4)], 3, ["MABN2d", "BatchRenorm2d"])),
        ("Mask R-CNN step", "torch", (64, 96, 2, ("MABN", "BN", "GN", "BRN"))),
        ("Mask R-CNN step", "auto", (64, 96, 2, ("MABN", "BN", "BRN"))),
    ]
    assert [name for name, _ in benchmarks.timing_sections(CPU, speed=False)] == ["Mask R-CNN step"]
    assert [name for name, _ in benchmarks.timing_sections(CPU, model=False)] == ["layer time"]


def test_the_options_size_the_timing_sections(benchmark_tool, benchmarks):
    parser = benchmark_tool.build_parser()
    quick = benchmark_tool.timing_sections(parser.parse_args(["--quick", "--repeats", "9"]), CPU)
    assert [name for name, _ in quick] == ["layer time"]  # --quick: no Mask R-CNN step
    full = benchmark_tool.timing_sections(parser.parse_args(["--skip-speed"]), CPU)
    assert [name for name, _ in full] == ["Mask R-CNN step"]
    assert benchmark_tool.timing_sections(parser.parse_args(["--skip-speed", "--skip-model"]), CPU) == []


def test_quick_times_three_shapes_in_at_most_5_rounds(benchmark_tool, benchmarks, monkeypatch):
    seen = []
    monkeypatch.setattr(benchmarks, "layer_time_rows", lambda device, shapes, repeats, norms: seen.append((shapes, repeats)) or [])
    (_, rows_of), = benchmark_tool.timing_sections(benchmark_tool.build_parser().parse_args(["--quick", "--repeats", "9"]), CPU)
    rows_of(True)
    assert seen == [(benchmarks.QUICK_SHAPES, 5)] and len(benchmarks.QUICK_SHAPES) == 3


# --------------------------------------------------------------------------- the tool's table
def test_the_benchmark_table_on_the_cpu_has_the_ablation_rows(check_cuda, benchmark_tool, monkeypatch, capsys, tmp_path):
    """tools/benchmark_cuda.py end to end on the CPU path (its timings skipped): the plugin's rows
    and the ablation layers' in every layer section, all passing, in the table and the file."""
    monkeypatch.setattr(check_cuda, "select_device", lambda name: CPU)
    output = tmp_path / "table.md"
    code = benchmark_tool.main(["--backends", "torch", "--skip-smoke", "--skip-speed", "--skip-model",
                                "--output", str(output)])
    out = capsys.readouterr().out
    assert code == 0, out
    table = output.read_text()
    for section in ("correctness", "no host sync", "autocast"):
        for layer in ("MABN2d", "BatchRenorm2d", *ABLATIONS):
            assert f"| {section} | [torch] {layer}" in table, (section, layer)
            assert f"ok   {section}: [torch] {layer}" in out, (section, layer)  # streamed to stdout
    assert table.count("| correctness |") == 11 and table.count("| no host sync |") == 4 and table.count("| autocast |") == 8
    assert "| FAIL |" not in table and "all checks passed" in out


def test_the_summary_lists_the_speed_ratios_of_the_timing_sections(check_cuda, benchmarks, benchmark_tool,
                                                                    monkeypatch, capsys):
    monkeypatch.setattr(check_cuda, "select_device", lambda name: CPU)
    for name in ("correctness_rows", "host_sync_rows", "autocast_rows"):
        monkeypatch.setattr(check_cuda, name, lambda *a, **k: [])
    monkeypatch.setattr(benchmarks, "layer_time_rows", lambda device, *a: [
        check_cuda.Row("layer time", "2x64x6x8 MABN2d", "train 0.1 ms = 0.95x BN"),
        benchmarks._speed_row("layer time", "MABN2d, median over shapes", "train 0.95x BN; eval 1.01x FrozenBN",
                              {"t": True}, device)])
    monkeypatch.setattr(benchmarks, "maskrcnn_rows", lambda device, *a: [
        benchmarks._speed_row("Mask R-CNN step", "MABN, 2 images", "0.100 s = 1.05x BN", {"<= 1.1x BN": True}, device),
        check_cuda.Row("Mask R-CNN step", "BN, 2 images", "0.095 s = 1.00x BN")])
    code = benchmark_tool.main(["--backends", "torch", "--skip-smoke"])
    out = capsys.readouterr().out
    assert code == 0
    ratios = out[out.index("speed ratios:"):]
    assert "MABN2d, median over shapes: train 0.95x BN" in ratios and "MABN, 2 images: 0.100 s = 1.05x BN" in ratios
    assert "2x64x6x8" not in ratios and "BN, 2 images" not in ratios.replace("MABN, 2 images", "")


def test_without_cuda_the_benchmark_says_so_in_one_line():
    program = f"import runpy, sys\nsys.argv = ['benchmark_cuda.py']\nrunpy.run_path({SCRIPT!r}, run_name='__main__')\n"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("benchmark_cuda: no CUDA GPU"), result.stderr


@pytest.mark.slow
def test_every_check_runs_on_the_cpu_with_small_model_images(check_cuda, benchmarks, check_cuda_tool):
    sections = benchmarks.timing_sections(CPU, repeats=1, model_repeats=1, height=64, width=96, shapes=[(2, 64, 6, 8)])
    rows = check_cuda.run_checks(CPU, host_read_watch=check_cuda_tool.forbid_host_reads,
                                 extra_layers=benchmarks.short_phase_layers(), extra_sections=sections)
    assert not [row for row in rows if row.status == "FAIL"], check_cuda.markdown(rows)
    sections = [row.section for row in rows]
    assert [sections.count(s) for s in ("correctness", "no host sync", "autocast", "layer time")] == [11, 4, 8, 7]
    assert sum(f"{check_cuda.DEFAULT_ITERATIONS} it." in row.case for row in rows) == 2
    steps = [row for row in rows if row.section == "Mask R-CNN step"]
    assert [row.case.split(",")[0] for row in steps] == ["[torch] MABN", "[torch] BN", "[torch] GN", "[torch] BRN"]
    assert "1.00x BN" in steps[1].result
