"""What the interpreter cannot see about the Triton launches: the device they run on and how many
variants Triton compiles while the ROI count changes every iteration."""
import contextlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mabn_d2.layers.triton import batch_renorm as triton_batch_renorm, launch as triton_launch, mabn as triton_mabn
from mabn_d2.layers.base import mabn_phase

from ..conftest import REPO_ROOT
from .triton_interpreter import requires_triton_interpreter

ROI_COUNTS = (1, 7, 16, 33, 100, 512)


def _mabn_step(x):
    c = x.shape[1]
    x = x.clone().requires_grad_(True)
    state = [torch.ones(c), torch.zeros(c), torch.ones(c), torch.zeros(2, c), torch.zeros(2, c)]
    y = triton_mabn.TritonMABNFunction.apply(x, *state, mabn_phase(3, 2, 3, 5), 0.9, 1e-5, 1.5)
    y.backward(torch.ones_like(y))


def _brn_step(x):
    c = x.shape[1]
    x = x.clone().requires_grad_(True)
    y = triton_batch_renorm.TritonBatchRenormFunction.apply(
        x, torch.ones(c), torch.zeros(c), torch.zeros(c), torch.ones(c), 0.01, 1e-5, 3.0, 5.0)
    y.backward(torch.ones_like(y))


@requires_triton_interpreter
@pytest.mark.parametrize("module, step", [(triton_mabn, _mabn_step), (triton_batch_renorm, _brn_step)],
                         ids=["mabn", "brn"])
def test_every_launch_runs_under_a_guard_for_the_tensor_s_device(monkeypatch, module, step):
    entered = []

    def recording_guard(device):
        entered.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(module, "launch_guard", recording_guard)
    x = torch.randn(2, 3, 4, 5)
    step(x)
    assert entered == [x.device, x.device]  # forward and backward


def test_the_guard_makes_the_tensor_s_cuda_device_current():
    guard = triton_launch.launch_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # built without touching CUDA
    assert isinstance(triton_launch.launch_guard(torch.device("cpu")), contextlib.nullcontext)


# Runs without TRITON_INTERPRET, so the kernels are real JITFunctions; each launch is replaced by
# Triton's own binder, which returns the specialization the compile cache is keyed on.
VARIANTS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    from mabn_d2.layers.triton import launch as triton_launch
    from mabn_d2.layers.base import mabn_phase
    from mabn_d2.layers.triton.batch_renorm import TritonBatchRenormFunction
    from mabn_d2.layers.triton.mabn import TritonMABNFunction

    backend = make_backend(GPUTarget("cuda", 90, 32))
    keys = {}

    def recorder(name, kernel):
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        def run(*args, grid, warmup, **kwargs):
            _, specialization, options = binder(*args, **kwargs)
            keys.setdefault(name, set()).add(repr((specialization, sorted(options.items()))))
        return run

    for module in ("mabn_kernels", "batch_renorm_kernels", "common"):
        kernels = triton_launch.kernel_module(module)
        for name in ("forward_statistics_kernel", "backward_statistics_kernel", "channel_affine_kernel"):
            if hasattr(kernels, name):
                kernel = getattr(kernels, name)
                kernel.run = recorder(module + "." + name, kernel)
    triton_launch.sm_count = lambda device: 132  # an H100 / H200 (step_plan reads the module global)

    counts = [int(v) for v in sys.argv[1].split(",")]
    result = {}
    for layout in ("nchw", "channels_last"):
        for rois in counts:
            for hw in (7, 14):  # box head and mask head convs
                x = torch.randn(rois, 256, hw, hw, dtype=torch.bfloat16)
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                c = 256
                for phase_iter in (1, 7):
                    xm = x.clone().requires_grad_(True)
                    state = [torch.ones(c), torch.zeros(c), torch.ones(c), torch.zeros(4, c), torch.zeros(4, c)]
                    y = TritonMABNFunction.apply(xm, *state, mabn_phase(phase_iter, 4, 5, 6), 0.9, 1e-5, 1.5)
                    y.backward(torch.ones_like(y))
                xb = x.clone().requires_grad_(True)
                y = TritonBatchRenormFunction.apply(xb, torch.ones(c), torch.zeros(c), torch.zeros(c), torch.ones(c),
                                                    0.01, 1e-5, 3.0, 5.0)
                y.backward(torch.ones_like(y))
        result[layout] = {name: len(v) for name, v in keys.items()}
        keys.clear()
    print(json.dumps(result))
    """
)


def _variant_counts(counts):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", VARIANTS_SCRIPT, ",".join(map(str, counts))], env=env,
                          capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_changing_roi_counts_compile_no_new_variants():
    """Every kernel keeps the variants of one ROI count over 1, 7, 16, 33, 100, 512 ROIs."""
    pytest.importorskip("triton")
    one = _variant_counts(ROI_COUNTS[:1])
    many = _variant_counts(ROI_COUNTS)
    assert many == one, f"variants for ROI counts {ROI_COUNTS}: {many}; for one count: {one}"
    # per layout: 2 MABN phases x 2 head sizes for the statistics kernels, and the affine kernel's
    # variants (MABN forward, BRN forward, the two dx forms) x 2 head sizes
    for layout, counts in many.items():
        assert counts["mabn_kernels.forward_statistics_kernel"] <= 4, (layout, counts)
        assert counts["batch_renorm_kernels.forward_statistics_kernel"] <= 2, (layout, counts)


@requires_triton_interpreter
def test_counter_check_passes_a_real_step_and_catches_a_counter_left_set():
    triton_launch.set_counter_check(True)
    try:
        x = torch.randn(2, 3, 4, 5)
        _mabn_step(x)  # the kernels reset their counters: the check is silent
        _brn_step(x)
        assert triton_launch.counters_left_set(x.device) == 0
        triton_launch.arrival_counters(x.device, 1)[0] = 5  # as a crashed launch would leave it
        with pytest.raises(RuntimeError, match="arrival counters on cpu were left set"):
            _mabn_step(x)
    finally:
        triton_launch.set_counter_check(False)
        triton_launch.arrival_counters(torch.device("cpu"), 1).zero_()


def test_a_launch_that_raises_leaves_its_counters_zeroed():
    device = torch.device("cpu")
    counters = triton_launch.arrival_counters(device, 4)
    counters[:4] = 3

    class Failing:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("ptxas failed")
            return launch

    with pytest.raises(RuntimeError, match="ptxas failed"):
        triton_launch.launch_reduction(Failing(), (1, 1), device, "test", (), {})
    assert triton_launch.counters_left_set(device) == 0
