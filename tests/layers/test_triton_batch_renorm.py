"""Batch Renormalization's Triton kernels under Triton's CPU interpreter.

Checked against Ioffe's formula written out in float64 (autograd through the batch mean and
variance, r and d constants) and against BatchRenorm2d's public-operation path.
"""
import copy

import pytest
import torch

from mabn_d2.layers import BatchRenorm2d
from mabn_d2.layers.triton import launch as triton_launch
from mabn_d2.layers.backend import use_backend
from mabn_d2.layers.triton.batch_renorm import TritonBatchRenormFunction

from .triton_interpreter import requires_triton_interpreter

pytestmark = requires_triton_interpreter

# Several programs per channel block, several channel blocks, epilogue loops one row at a time.
SPLIT_TILES = triton_launch.LaunchTuning(
    reduce_tile=16, elementwise_tile=128, programs_per_sm=4, max_channel_block=2, epilogue_rows=1
)


def ioffe_step(x, gamma, beta, mean_run, var_run, r_max, d_max, eps, ema_update_rate):
    """y (differentiable in x, gamma, beta) and the updated running statistics."""
    mu = x.mean(dim=(0, 2, 3))
    var = x.var(dim=(0, 2, 3), unbiased=False)
    sigma = torch.sqrt(var + eps)
    sigma_run = torch.sqrt(var_run + eps)
    r = torch.clamp(sigma.detach() / sigma_run, 1 / r_max, r_max)
    d = torch.clamp((mu.detach() - mean_run) / sigma_run, -d_max, d_max)
    view = (1, -1, 1, 1)
    y = gamma.view(view) * ((x - mu.view(view)) / sigma.view(view) * r.view(view) + d.view(view)) + beta.view(view)
    n = x.numel() // x.shape[1]
    new_mean = mean_run + ema_update_rate * (mu.detach() - mean_run)
    new_var = var_run + ema_update_rate * (var.detach() * n / (n - 1) - var_run)
    return y, new_mean, new_var, r


def batch(t, channels=3, dtype=torch.float64):
    generator = torch.Generator().manual_seed(t)
    x = torch.randn(2, channels, 4, 5, dtype=torch.float64, generator=generator) * (1 + 2 * (t % 3)) + 4 + t % 2
    return x.to(dtype), torch.randn(x.shape, dtype=torch.float64, generator=generator).to(dtype)


@pytest.mark.parametrize("tuning", [triton_launch.TUNING, SPLIT_TILES], ids=["default_tiles", "split_reductions"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_kernels_follow_ioffe_in_float64(channels_last, tuning, monkeypatch):
    monkeypatch.setattr(triton_launch, "TUNING", tuning)
    gamma = torch.tensor([1.2, 0.8, -0.5], dtype=torch.float64, requires_grad=True)
    beta = torch.tensor([0.1, 0.0, 0.3], dtype=torch.float64, requires_grad=True)
    mean_run, var_run = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    limits = [(1.0, 0.0), (1.0, 0.0), (1.25, 0.25), (1.5, 0.5), (1.5, 0.5), (1.5, 0.5)]
    clipped = 0
    for t, (r_max, d_max) in enumerate(limits, start=1):
        x, dy = batch(t)
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        x_ref = x.detach().clone().requires_grad_(True)
        y_ref, mean_ref, var_ref, r_ref = ioffe_step(x_ref, gamma, beta, mean_run, var_run, r_max, d_max, 1e-5, 0.1)
        expected = torch.autograd.grad(y_ref, (x_ref, gamma, beta), dy)
        clipped += int(((r_ref == r_max) | (r_ref == 1 / r_max)).sum()) if r_max > 1 else 0
        x = x.detach().requires_grad_(True)
        y = TritonBatchRenormFunction.apply(x, gamma, beta, mean_run, var_run, 0.1, 1e-5, r_max, d_max)
        got = torch.autograd.grad(y, (x, gamma, beta), dy)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-11, msg=f"y at iteration {t}")
        for name, a, b in zip(("dx", "dweight", "dbias"), got, expected):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"{name} at iteration {t}")
        torch.testing.assert_close(mean_run, mean_ref, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(var_run, var_ref, rtol=1e-12, atol=1e-13)
        assert got[0].stride() == x.stride()
    assert clipped > 0, "r never clipped"
    assert not triton_launch.arrival_counters(torch.device("cpu"), 1).any()


def _pair(**kwargs):
    layer = BatchRenorm2d(3, ema_update_rate=0.1, r_max=1.5, d_max=0.5, warmup_iters=1, r_max_ramp_iters=2,
                          d_max_ramp_iters=2, **kwargs)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.2, 0.8, -0.5]))
        layer.bias.copy_(torch.tensor([0.1, 0.0, 0.3]))
    return layer, copy.deepcopy(layer)


def _step(layer, backend, x, dy):
    x = x.detach().clone().requires_grad_(True)
    with use_backend(backend):
        y = layer(x)
    return (y, *torch.autograd.grad(y, (x, layer.weight, layer.bias), dy))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_paths_agree_including_a_non_finite_batch(dtype):
    triton_layer, torch_layer = _pair()
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for t in range(1, 6):
        x, dy = batch(t, dtype=dtype)
        if t == 4:
            x[0, 0, 1, 1] = float("nan")
        got, want = _step(triton_layer, "triton", x, dy), _step(torch_layer, "torch", x, dy)
        assert got[0].dtype == dtype
        for name, a, b in zip(("y", "dx", "dweight", "dbias"), got, want):
            torch.testing.assert_close(a.float(), b.float(), **tolerance, equal_nan=True, msg=f"{name} at {t}")
        for name in ("running_mean", "running_var"):
            value = getattr(triton_layer, name)
            assert value.dtype == torch.float32 and torch.isfinite(value).all()
            torch.testing.assert_close(value, getattr(torch_layer, name), rtol=1e-5, atol=1e-6, msg=name)
    assert triton_layer.iteration == torch_layer.iteration == 5


def test_forced_triton_on_an_unsupported_layer_fails_before_touching_the_state():
    layer = BatchRenorm2d(3).double()
    with use_backend("triton"), pytest.raises(RuntimeError, match="float64 state"):
        layer(torch.randn(2, 3, 4, 4))
    assert layer.iteration == 0
