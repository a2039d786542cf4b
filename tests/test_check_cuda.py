"""tools/check_cuda.py and its checks (research.cuda_check): every part that runs without a GPU, on the CPU.

Correctness, host-sync, autocast and timing checks take a device; here they run on "cpu" and
must pass, and they must fail when the layer math or its host behaviour is broken. Without a
CUDA GPU the script exits non-zero with a one-line message and imports no detectron2 first.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from .conftest import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "tools", "check_cuda.py")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def check_cuda():
    """The checks (research.cuda_check); tools/check_cuda.py is their command line."""
    import research.cuda_check as module

    return module


@pytest.fixture(scope="module")
def check_cuda_tool():
    spec = importlib.util.spec_from_file_location("check_cuda_tool", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _statuses(rows):
    return {(row.section, row.case): row.status for row in rows}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_correctness_checks_pass_on_the_cpu(check_cuda, dtype):
    rows = [check_cuda.check_mabn_against_spec(
        CPU, dtype, check_cuda.SHORT_PHASES, check_cuda.SHORT_ITERATIONS, check_cuda.SHORT_JUMP, channels_last)
        for channels_last in (False, True)]
    rows += [check_cuda.check_layer_against_cpu(CPU, dtype, name, factory, check_cuda.SHORT_ITERATIONS)
             for name, factory in check_cuda.short_phase_layers().items()]
    assert all(row.status == "ok" for row in rows), check_cuda.markdown(rows)


def test_correctness_check_fails_when_the_math_is_wrong(check_cuda, monkeypatch):
    import mabn_d2.layers.mabn as mabn_module

    original = mabn_module.channel_normalize

    def off_by_a_little(x, var, scale, shift, eps, mean=None):
        return original(x, var, scale * 1.001, shift, eps, mean)

    monkeypatch.setattr(mabn_module, "channel_normalize", off_by_a_little)
    row = check_cuda.check_mabn_against_spec(
        CPU, torch.float32, check_cuda.SHORT_PHASES, check_cuda.SHORT_ITERATIONS, check_cuda.SHORT_JUMP
    )
    assert row.status == "FAIL", row


def test_correctness_check_requires_clipped_renormalization(check_cuda):
    row = check_cuda.check_mabn_against_spec(CPU, torch.float64, check_cuda.DEFAULT_PHASES, 30, 20)
    assert row.status == "FAIL" and "never clipped" in row.result


def test_host_sync_checks_pass_on_the_cpu(check_cuda, check_cuda_tool):
    rows = check_cuda.host_sync_rows(CPU, host_read_watch=check_cuda_tool.forbid_host_reads)
    assert [row.status for row in rows] == ["ok"] * 4, check_cuda.markdown(rows)


def test_host_sync_check_catches_a_host_read(check_cuda, check_cuda_tool):
    from mabn_d2.layers import MABN2d

    class ReadsItsStatistics(MABN2d):
        def forward(self, x):
            if self.training and float(self.running_var.max()) > 1e6:
                raise AssertionError("unreachable")
            return super().forward(x)

    row = check_cuda.check_no_host_sync(CPU, "reads", ReadsItsStatistics(6, **check_cuda.SHORT_PHASES), 3,
                                        host_read_watch=check_cuda_tool.forbid_host_reads)
    assert row.status == "FAIL" and "host read" in row.result


def test_autocast_checks_pass_on_the_cpu(check_cuda):
    rows = check_cuda.autocast_rows(CPU)
    assert len(rows) == 8
    assert all(row.status == "ok" for row in rows), check_cuda.markdown(rows)


def test_autocast_check_catches_reduced_precision_state(check_cuda):
    from mabn_d2.layers import MABN2d

    row = check_cuda.check_autocast(CPU, torch.bfloat16, "bf16 state", MABN2d(6, **check_cuda.SHORT_PHASES).bfloat16(), 3)
    assert row.status == "FAIL", row


def test_layer_timing_rows(check_cuda):
    rows = check_cuda.layer_time_rows(CPU, shapes=[(2, 64, 6, 8)], repeats=1)
    assert [row.case for row in rows[:5]] == [f"2x64x6x8 {n}" for n in ("MABN2d", "BatchNorm2d", "GroupNorm", "FrozenBN", "BatchRenorm2d")]
    assert "1.00x BN" in rows[1].result and "median over shapes" in rows[-1].case


def test_speed_targets_are_judged_for_the_triton_step_on_cuda_only(check_cuda):
    from mabn_d2.layers.backend import use_backend

    rows = check_cuda.layer_time_rows(CPU, shapes=[(2, 64, 6, 8)], repeats=1)
    assert [row.case for row in rows[-2:]] == ["BatchRenorm2d, median over shapes", "MABN2d, median over shapes"]
    assert all(row.status == "info" and "1.2x BN" in rows[-1].limit for row in rows[-2:])
    cuda = torch.device("cuda")
    with use_backend("auto"):
        assert check_cuda._speed_row("layer time", "c", "r", {"fast": True}, cuda).status == "ok"
        assert check_cuda._speed_row("layer time", "c", "r", {"fast": True, "slow": False}, cuda).status == "FAIL"
    with use_backend("torch"):
        assert check_cuda._speed_row("layer time", "c", "r", {"slow": False}, cuda).status == "info"


def test_a_failing_check_becomes_a_row(check_cuda):
    def broken():
        raise RuntimeError("CUDA error: an illegal memory access\nmore lines")

    row = check_cuda._guarded("correctness", "case", broken)
    assert row.status == "FAIL" and row.result == "RuntimeError: CUDA error: an illegal memory access"
    table = check_cuda.markdown([row])
    assert table.count("\n") == 2 and "| FAIL |" in table


def test_each_section_runs_once_per_backend_and_says_which(check_cuda, monkeypatch):
    from mabn_d2.layers.backend import selected_backend

    def rows_under_the_backend(section):
        return lambda *args, **kwargs: [check_cuda.Row(section, f"seen {selected_backend()}", "", "", "ok")]

    for name, section in (("correctness_rows", "correctness"), ("host_sync_rows", "no host sync"),
                          ("autocast_rows", "autocast"), ("layer_time_rows", "layer time"), ("maskrcnn_rows", "Mask R-CNN step")):
        monkeypatch.setattr(check_cuda, name, rows_under_the_backend(section))

    def failing(*args, **kwargs):
        raise ValueError("no kernels for this\nsecond line")

    monkeypatch.setattr(check_cuda, "autocast_rows", failing)
    rows = check_cuda.run_checks(CPU, backends=("torch", "auto"))
    assert [row.case for row in rows if row.section == "correctness"] == ["[torch] seen torch", "[auto] seen auto"]
    assert [row.case for row in rows if row.section == "Mask R-CNN step"] == ["[torch] seen torch", "[auto] seen auto"]
    failed = [row for row in rows if row.section == "autocast"]
    assert [(row.case, row.status, row.result) for row in failed] == [
        ("[torch] all cases", "FAIL", "ValueError: no kernels for this"), ("[auto] all cases", "FAIL", "ValueError: no kernels for this")]
    assert check_cuda.available_backends()[0] == "torch"


@pytest.mark.slow
def test_every_check_runs_on_the_cpu_with_small_model_images(check_cuda, check_cuda_tool):
    rows = check_cuda.run_checks(CPU, repeats=1, model_repeats=1, height=64, width=96, shapes=[(2, 64, 6, 8)],
                                 host_read_watch=check_cuda_tool.forbid_host_reads)
    assert not [row for row in rows if row.status == "FAIL"], check_cuda.markdown(rows)
    sections = [row.section for row in rows]
    assert [sections.count(s) for s in ("correctness", "no host sync", "autocast", "layer time")] == [11, 4, 8, 7]
    assert sum("1100 it." in row.case for row in rows) == 2  # the default warm-ups, re-normalization included
    steps = [row for row in rows if row.section == "Mask R-CNN step"]
    assert [row.case.split(",")[0] for row in steps] == ["[torch] MABN", "[torch] BN", "[torch] GN", "[torch] BRN"]
    assert "1.00x BN" in steps[1].result


def _run_script(code_before: str = "", args=()):
    """Run the script in a fresh interpreter after `code_before` (CUDA hidden)."""
    argv = ["check_cuda.py", *args]
    program = code_before + f"\nimport runpy, sys\nsys.argv = {argv!r}\nrunpy.run_path({SCRIPT!r}, run_name='__main__')\n"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=300)


def test_without_cuda_the_script_says_so_in_one_line_and_exits_non_zero():
    blocked = "import sys\nsys.modules['detectron2'] = None  # the check must not need it to say this"
    for code in ("", blocked):
        result = _run_script(code)
        assert result.returncode == 2
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "no CUDA GPU" in lines[0], result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("device,needle", [("cpu", "must be a CUDA device"), ("gpu0", "not a device name")])
def test_a_device_that_is_not_cuda_is_refused_in_one_line(device, needle):
    result = _run_script(args=("--device", device))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_without_detectron2_the_script_says_so_in_one_line():
    code = (
        "import sys, torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "torch.cuda.device_count = lambda: 1\n"
        "sys.modules['detectron2'] = None\n"
    )
    result = _run_script(code)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "detectron2" in lines[0] and "PYTHONPATH" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- smoke stage and reporting
def test_smoke_stage_passes_every_variant_on_the_interpreter_and_checks_the_counters(check_cuda):
    from tests.layers.triton_interpreter import interpreter_active

    if not interpreter_active():
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)")
    rows = check_cuda.smoke_rows(CPU, shape=(2, 5, 3, 4))
    assert len(rows) == 4 * 2 * 2 + 1  # dtypes x layouts x layers, then the counters
    assert all(row.status == "ok" for row in rows), check_cuda.markdown(rows)
    assert rows[-1].case == "arrival counters after every launch" and rows[-1].result == "0 left set"


def test_smoke_stage_fails_fast_in_one_line(check_cuda, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(check_cuda, "select_device", lambda name: CPU)
    monkeypatch.setattr(check_cuda, "smoke_rows", lambda device: [
        check_cuda.Row("smoke", "MABN2d bf16 8x96x33x35", "y differs from the public path at iteration 3", "", "FAIL"),
        check_cuda.Row("smoke", "arrival counters after every launch", "0 left set", "0", "ok")])

    def never(*args, **kwargs):
        raise AssertionError("the checks ran after a failed smoke stage")

    monkeypatch.setattr(check_cuda, "run_checks", never)
    code = check_cuda.main(["--backends", "torch", "triton", "--output", str(tmp_path / "rows.md")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "smoke stage failed (1 of 2)" in err[0] and "iteration 3" in err[0]
    assert "y differs" in (tmp_path / "rows.md").read_text()


def test_rows_stream_as_measured_into_stdout_and_the_file_and_the_summary_fits_8_kb(check_cuda, monkeypatch,
                                                                                      capsys, tmp_path):
    monkeypatch.setattr(check_cuda, "select_device", lambda name: CPU)
    printed_before = []

    def section(name, count, status):
        def rows_of(*args, **kwargs):
            printed_before.append(capsys.readouterr().out)  # what was on stdout when this section started
            return [check_cuda.Row(name, f"case {i} " + "x" * 150, "result " + "y" * 300, "limit", status)
                    for i in range(count)]
        return rows_of

    monkeypatch.setattr(check_cuda, "correctness_rows", section("correctness", 200, "FAIL"))
    monkeypatch.setattr(check_cuda, "host_sync_rows", section("no host sync", 3, "ok"))
    monkeypatch.setattr(check_cuda, "autocast_rows", section("autocast", 3, "ok"))
    monkeypatch.setattr(check_cuda, "layer_time_rows", lambda *a, **k: [
        check_cuda.Row("layer time", "MABN2d, median over shapes", "train 0.95x BN; eval 1.01x FrozenBN", "t", "ok")])
    monkeypatch.setattr(check_cuda, "maskrcnn_rows", lambda *a, **k: [
        check_cuda.Row("Mask R-CNN step", "MABN, 2 images", "0.100 s = 1.05x BN", "<= 1.1x BN", "ok")])
    output = tmp_path / "rows.md"
    code = check_cuda.main(["--backends", "torch", "--skip-smoke", "--output", str(output)])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL correctness: [torch] case 199" in printed_before[1]  # streamed before the next section ran
    summary = out[out.index("\nsummary:"):]
    assert len(summary.encode()) <= 8192, len(summary.encode())
    assert "correctness: 0 ok, 200 failed" in summary and "no host sync: 3 ok, 0 failed" in summary
    assert "more (see the output file)" in summary
    assert "MABN2d, median over shapes: train 0.95x BN" in summary and "MABN, 2 images: 0.100 s = 1.05x BN" in summary
    text = output.read_text()
    assert text.count("| correctness |") == 200 and "y" * 300 in text  # details in full in the file


def test_missing_packages_are_named(check_cuda_tool, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "yacs", None)
    missing = check_cuda_tool.missing_packages()
    assert "pycocotools" in missing and "yacs" in missing and "torchvision" not in missing
