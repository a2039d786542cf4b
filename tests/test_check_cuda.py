"""tools/check_cuda.py and its checks (mabn_d2.layers.cuda_check): every part that runs without a GPU, on the CPU.

Correctness, host-sync and autocast checks take a device; here they run on "cpu" and must pass,
and they must fail when the layer math or its host behaviour is broken. Without a CUDA GPU the
script exits non-zero with a one-line message and imports no detectron2 first. The ablation
layers and the timings (tools/benchmark_cuda.py, research.cuda_benchmarks) are tested in
tests/research/test_cuda_benchmarks.py.
"""
import os
import subprocess
import sys

import pytest
import torch

from .conftest import REPO_ROOT, load_tool

SCRIPT = os.path.join(REPO_ROOT, "tools", "check_cuda.py")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def check_cuda():
    """The checks (mabn_d2.layers.cuda_check); tools/check_cuda.py is their command line."""
    import mabn_d2.layers.cuda_check as module

    return module


@pytest.fixture(scope="module")
def check_cuda_tool():
    return load_tool("check_cuda")


def _statuses(rows):
    return {(row.section, row.case): row.status for row in rows}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_correctness_checks_pass_on_the_cpu(check_cuda, dtype):
    rows = [check_cuda.check_mabn_against_spec(
        CPU, dtype, check_cuda.SHORT_PHASES, check_cuda.SHORT_ITERATIONS, check_cuda.SHORT_JUMP, channels_last)
        for channels_last in (False, True)]
    rows += [check_cuda.check_layer_against_cpu(CPU, dtype, name, factory, check_cuda.SHORT_ITERATIONS)
             for name, factory in check_cuda.short_phase_layers().items()]
    assert [row.case.split(" ")[0] for row in rows] == ["MABN2d", "MABN2d", "BatchRenorm2d"]
    assert all(row.status == "ok" for row in rows), check_cuda.markdown(rows)


def test_brn_correctness_check_fails_when_the_device_run_differs(check_cuda, monkeypatch):
    """The generic check compares the layer with its own float64 CPU run: a device-side change shows."""
    import mabn_d2.layers.batch_renorm as brn_module

    original = brn_module.batch_renorm_step

    def off_in_float32(x, *args, **kwargs):
        y = original(x, *args, **kwargs)
        return y * 1.001 if x.dtype == torch.float32 else y

    monkeypatch.setattr(brn_module, "batch_renorm_step", off_in_float32)
    factory = check_cuda.short_phase_layers()["BatchRenorm2d"]
    row = check_cuda.check_layer_against_cpu(CPU, torch.float32, "BatchRenorm2d", factory, check_cuda.SHORT_ITERATIONS)
    assert row.status == "FAIL", row


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


def test_default_phases_are_the_layers_defaults(check_cuda):
    import inspect

    from mabn_d2.layers import MABN2d

    signature = inspect.signature(MABN2d.__init__).parameters
    assert check_cuda.DEFAULT_PHASES == {name: signature[name].default for name in check_cuda.DEFAULT_PHASES}
    assert set(check_cuda.DEFAULT_PHASES) == set(check_cuda.SHORT_PHASES)
    renorm = check_cuda.DEFAULT_PHASES["renorm_warmup_iters"]
    assert renorm < check_cuda.DEFAULT_JUMP < check_cuda.DEFAULT_ITERATIONS  # the default run reaches clipped r


def test_host_sync_checks_pass_on_the_cpu(check_cuda, check_cuda_tool):
    rows = check_cuda.host_sync_rows(CPU, host_read_watch=check_cuda_tool.forbid_host_reads)
    assert [row.case.split(":")[0] for row in rows] == ["MABN2d", "BatchRenorm2d"]
    assert [row.status for row in rows] == ["ok"] * 2, check_cuda.markdown(rows)


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
    assert len(rows) == 4  # (bf16, fp16) x (MABN2d, BatchRenorm2d)
    assert all(row.status == "ok" for row in rows), check_cuda.markdown(rows)


def test_autocast_check_catches_reduced_precision_state(check_cuda):
    from mabn_d2.layers import MABN2d

    row = check_cuda.check_autocast(CPU, torch.bfloat16, "bf16 state", MABN2d(6, **check_cuda.SHORT_PHASES).bfloat16(), 3)
    assert row.status == "FAIL", row


def test_a_failing_check_becomes_a_row(check_cuda):
    def broken():
        raise RuntimeError("CUDA error: an illegal memory access\nmore lines")

    row = check_cuda._guarded("correctness", "case", broken)
    assert row.status == "FAIL" and row.result == "RuntimeError: CUDA error: an illegal memory access"
    table = check_cuda.markdown([row])
    assert table.count("\n") == 2 and "| FAIL |" in table


def test_each_section_runs_once_per_backend_and_says_which(check_cuda, monkeypatch):
    """The layer sections and a caller's extra sections, each once per backend, under that backend;
    the caller's layers reach the layer sections and `first_backend` is true for the first only."""
    from mabn_d2.layers.backend import selected_backend

    seen_layers, firsts = [], []

    def rows_under_the_backend(section):
        def rows_of(*args, **kwargs):
            seen_layers.append((section, kwargs.get("extra_layers")))
            return [check_cuda.Row(section, f"seen {selected_backend()}", "", "", "ok")]
        return rows_of

    for name, section in (("correctness_rows", "correctness"), ("host_sync_rows", "no host sync"),
                          ("autocast_rows", "autocast")):
        monkeypatch.setattr(check_cuda, name, rows_under_the_backend(section))

    def extra_section(first):
        firsts.append(first)
        return [check_cuda.Row("extra", f"seen {selected_backend()}", "", "", "ok")]

    def failing(*args, **kwargs):
        raise ValueError("no kernels for this\nsecond line")

    monkeypatch.setattr(check_cuda, "autocast_rows", failing)
    layers = {"Extra2d": lambda c: torch.nn.BatchNorm2d(c)}
    rows = check_cuda.run_checks(CPU, backends=("torch", "auto"), extra_layers=layers,
                                 extra_sections=[("extra", extra_section)])
    assert [row.section for row in rows] == ["correctness"] * 2 + ["no host sync"] * 2 + ["autocast"] * 2 + ["extra"] * 2
    assert [row.case for row in rows if row.section == "correctness"] == ["[torch] seen torch", "[auto] seen auto"]
    assert [row.case for row in rows if row.section == "extra"] == ["[torch] seen torch", "[auto] seen auto"]
    assert firsts == [True, False]
    assert seen_layers == [("correctness", layers)] * 2 + [("no host sync", layers)] * 2
    failed = [row for row in rows if row.section == "autocast"]
    assert [(row.case, row.status, row.result) for row in failed] == [
        ("[torch] all cases", "FAIL", "ValueError: no kernels for this"), ("[auto] all cases", "FAIL", "ValueError: no kernels for this")]
    assert check_cuda.available_backends()[0] == "torch"


def test_extra_layers_join_every_layer_section(check_cuda, check_cuda_tool):
    """A caller's layer gets correctness, host-sync and autocast rows beside the plugin's."""
    from mabn_d2.layers import MABN2d

    layers = {"Another MABN2d": lambda c: MABN2d(c, **check_cuda.SHORT_PHASES)}
    assert list(check_cuda.short_phase_layers(layers)) == ["BatchRenorm2d", "Another MABN2d"]
    rows = check_cuda.host_sync_rows(CPU, host_read_watch=check_cuda_tool.forbid_host_reads, extra_layers=layers)
    rows += check_cuda.autocast_rows(CPU, dtypes=(torch.bfloat16,), extra_layers=layers)
    assert [row.case.split(":")[0].split(" under")[0] for row in rows] == [
        "MABN2d", "BatchRenorm2d", "Another MABN2d", "MABN2d", "BatchRenorm2d", "Another MABN2d"]
    assert all(row.status == "ok" for row in rows), check_cuda.markdown(rows)


@pytest.mark.slow
def test_every_check_runs_on_the_cpu(check_cuda, check_cuda_tool):
    rows = check_cuda.run_checks(CPU, host_read_watch=check_cuda_tool.forbid_host_reads)
    assert not [row for row in rows if row.status == "FAIL"], check_cuda.markdown(rows)
    sections = [row.section for row in rows]
    assert [sections.count(s) for s in ("correctness", "no host sync", "autocast")] == [7, 2, 4] and len(rows) == 13
    default_run = f"{check_cuda.DEFAULT_ITERATIONS} it."
    assert sum(default_run in row.case for row in rows) == 2  # the default warm-ups, re-normalization included


def test_the_tool_runs_the_plugin_checks_only(check_cuda, check_cuda_tool, monkeypatch, capsys):
    """tools/check_cuda.py: the plugin's sections with its host-read watch, no extra layers or sections."""
    calls = []

    def recorded(device, backends, reporter, host_read_watch, extra_layers, sections):
        calls.append((device, list(backends), host_read_watch, extra_layers, sections))
        return []

    monkeypatch.setattr(check_cuda, "select_device", lambda name: CPU)
    monkeypatch.setattr(check_cuda, "run_checks", recorded)
    assert check_cuda_tool.main(["--backends", "torch", "--quick"]) == 0
    assert calls == [(CPU, ["torch"], check_cuda_tool.forbid_host_reads, None, [])]
    assert "all checks passed" in capsys.readouterr().out


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
    output = tmp_path / "rows.md"
    code = check_cuda.main(["--backends", "torch", "--skip-smoke", "--output", str(output)])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL correctness: [torch] case 199" in printed_before[1]  # streamed before the next section ran
    summary = out[out.index("\nsummary:"):]
    assert len(summary.encode()) <= 8192, len(summary.encode())
    assert "correctness: 0 ok, 200 failed" in summary and "no host sync: 3 ok, 0 failed" in summary
    assert "more (see the output file)" in summary
    assert "speed ratios" not in summary  # no timing section: no empty heading
    text = output.read_text()
    assert text.count("| correctness |") == 200 and "y" * 300 in text  # details in full in the file


def test_extra_sections_of_main_join_the_table_and_their_speed_ratios_the_summary(check_cuda, monkeypatch, capsys):
    monkeypatch.setattr(check_cuda, "select_device", lambda name: CPU)
    for name in ("correctness_rows", "host_sync_rows", "autocast_rows"):
        monkeypatch.setattr(check_cuda, name, lambda *a, **k: [])
    built_with = []

    def sections_of(args, device):
        built_with.append((args.output, device))
        return [("timing", lambda first: [
            check_cuda.Row("timing", "MABN2d, median over shapes", "train 0.95x BN", "t", "ok", speed_ratio=True),
            check_cuda.Row("timing", "2x64x6x8 MABN2d", "train 0.100 ms", "", "info")])]

    code = check_cuda.main(["--backends", "torch", "--skip-smoke"], extra_sections=sections_of)
    out = capsys.readouterr().out
    assert code == 0 and built_with == [(None, CPU)]
    assert "info timing: [torch] 2x64x6x8 MABN2d" in out  # the table has both rows
    ratios = out[out.index("speed ratios:"):]
    assert "[torch] MABN2d, median over shapes: train 0.95x BN [ok; t]" in ratios and "2x64x6x8" not in ratios


def test_missing_packages_are_named(check_cuda_tool, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "yacs", None)
    missing = check_cuda_tool.missing_packages()
    assert "pycocotools" in missing and "yacs" in missing and "torchvision" not in missing
