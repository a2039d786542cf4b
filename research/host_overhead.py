"""Host cost of one training step on the Triton path, kernel launches stubbed out.

On a GPU, a norm layer of the ROI heads or a small feature map costs what its Python and
autograd path costs, not what its kernels cost. This times forward plus backward on a tiny CPU
tensor with the Triton launches replaced by no-ops, so only the host work is left: MABN2d and
BatchRenorm2d on their Triton path, `nn.BatchNorm2d` (its whole real step, compute included)
and a bare `autograd.Function` round trip, interleaved in one process; ratios to BatchNorm2d.
"""
import contextlib
import types
from typing import Dict, Iterator, List

import torch
from torch import nn

from mabn_d2.layers import BatchRenorm2d, MABN2d
from mabn_d2.layers import backend as backend_module
from mabn_d2.layers.triton import batch_renorm as triton_batch_renorm, launch as triton_launch, mabn as triton_mabn
from .benchmarking import interleaved_medians, markdown_table

__all__ = ["stubbed_triton_launches", "host_overhead", "host_overhead_report"]

SHAPE = (2, 8, 4, 4)


class _NoLaunch:
    """kernel[grid](...) that does nothing."""

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs) -> None:
        return None


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad


@contextlib.contextmanager
def stubbed_triton_launches() -> Iterator[None]:
    """Inside the block, CPU tensors take the Triton path and every kernel launch is a no-op."""
    stubs: Dict[str, types.SimpleNamespace] = {}
    real_kernel_module = triton_launch.kernel_module

    def stub_module(name: str) -> types.SimpleNamespace:
        if name not in stubs:
            real = real_kernel_module(name)
            constants = {k: getattr(real, k) for k in dir(real) if k.isupper()}
            stubs[name] = types.SimpleNamespace(
                forward_statistics_kernel=_NoLaunch(), backward_statistics_kernel=_NoLaunch(),
                channel_affine_kernel=_NoLaunch(), **constants)
        return stubs[name]

    saved = (triton_mabn.kernel_module, triton_batch_renorm.kernel_module, triton_launch.kernel_module,
             backend_module._device_reason, dict(backend_module._verdicts))
    triton_mabn.kernel_module = triton_batch_renorm.kernel_module = stub_module
    triton_launch.kernel_module = stub_module
    backend_module._device_reason = lambda x, backend: None
    try:
        with backend_module.use_backend("auto"):
            yield
    finally:
        (triton_mabn.kernel_module, triton_batch_renorm.kernel_module, triton_launch.kernel_module,
         backend_module._device_reason) = saved[:4]
        backend_module._verdicts.clear()
        backend_module._verdicts.update(saved[4])


def _step(layer_or_fn, x: torch.Tensor, grad: torch.Tensor):
    def step() -> None:
        y = layer_or_fn(x)
        y.backward(grad)
    return step


def host_overhead(repeats: int = 7, inner: int = 200) -> Dict[str, float]:
    """Median seconds per forward+backward (host only for the stubbed layers), interleaved rounds."""
    x = torch.randn(SHAPE).requires_grad_(True)
    grad = torch.randn(SHAPE)
    c = SHAPE[1]
    layers = {
        "MABN2d": MABN2d(c, buffer_size=2, warmup_iters=1, renorm_warmup_iters=1),  # moving averages + r
        "BatchRenorm2d": BatchRenorm2d(c),
        "BatchNorm2d": nn.BatchNorm2d(c),
    }
    with stubbed_triton_launches():
        for name in ("MABN2d", "BatchRenorm2d"):
            backend_module._verdicts[(name, x.device, x.dtype, False, torch.float32)] = None  # checked
        steps = {name: _step(layer, x, grad) for name, layer in layers.items()}
        steps["autograd.Function"] = _step(_Identity.apply, x, grad)
        for step in steps.values():  # warm-up, past MABN's batch-statistics phase
            for _ in range(5):
                step()

        def batched(step):
            def run() -> None:
                for _ in range(inner):
                    step()
            return run

        medians = interleaved_medians({name: batched(step) for name, step in steps.items()}, repeats)
    return {name: seconds / inner for name, seconds in medians.items()}


def host_overhead_report(repeats: int = 7) -> str:
    times = host_overhead(repeats)
    bn = times["BatchNorm2d"]
    rows: List[List[str]] = [[name, f"{seconds * 1e6:.1f}", f"{seconds / bn:.2f}"] for name, seconds in times.items()]
    note = (f"Forward + backward on a {'x'.join(map(str, SHAPE))} CPU tensor, Triton launches stubbed "
            "(MABN2d, BatchRenorm2d: host work only; BatchNorm2d: its whole step; autograd.Function: a bare "
            f"round trip). Medians of {repeats} interleaved rounds, one process.")
    return note + "\n\n" + markdown_table(["step", "µs", "vs BatchNorm2d"], rows)
