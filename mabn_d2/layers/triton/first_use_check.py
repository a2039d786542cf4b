"""First-use checks of the Triton kernels: run them on a tiny input against the public path.

A kernel that cannot compile on this machine (no C compiler for Triton's driver helper, no
libcuda, an old GPU, an unsupported dtype) or that computes something else must not end a
training run at step 1 or, worse, train on wrong numbers. Each check builds its own tensors
(the device, dtype and layout of the real input, a few channels) and its own state, so no layer
state is touched; it runs every kernel variant a training run will meet (batch statistics,
moving averages, moving averages with re-normalization) and compares outputs, gradients and
state updates with the public-operation implementation.
"""
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..base import mabn_phase

__all__ = ["first_use_check_mabn", "first_use_check_batch_renorm"]

_CHANNELS, _SHAPE = 5, (2, 3, 4)  # N, H, W of the check's input


def _tolerance(dtype: torch.dtype) -> Tuple[float, float]:
    if dtype in (torch.float16, torch.bfloat16):
        return 5e-2, 5e-2
    if dtype == torch.float64:
        return 1e-9, 1e-10
    return 1e-3, 1e-4


def _like(x: torch.Tensor, seed: int, scale: float = 1.0, shape: Optional[Sequence[int]] = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    n, c, h, w = shape or (_SHAPE[0], _CHANNELS, _SHAPE[1], _SHAPE[2])
    t = (torch.randn(n, c, h, w, generator=generator, dtype=torch.float64) * scale + 0.3)
    layout = torch.channels_last if (not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)) \
        else torch.contiguous_format
    return t.to(device=x.device, dtype=x.dtype).contiguous(memory_format=layout)


def _disagreement(names: Sequence[str], got: Sequence[torch.Tensor], want: Sequence[torch.Tensor],
                  dtype: torch.dtype, step: str) -> Optional[str]:
    rtol, atol = _tolerance(dtype)
    for name, a, b in zip(names, got, want):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        if a.shape != b.shape or not torch.isfinite(a).all() or not torch.allclose(a, b, rtol=rtol, atol=atol):
            worst = (a - b).abs().max().item() if a.shape == b.shape else float("nan")
            return f"{name} differs from the public path at {step} (max abs difference {worst:.3g})"
    return None


def _step(function, x: torch.Tensor, dy: torch.Tensor, params: List[torch.Tensor], *args) -> List[torch.Tensor]:
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        leaves = [p.detach().requires_grad_(True) for p in params]
        y = function(x, *leaves, *args)
        grads = torch.autograd.grad(y, [x, *leaves], dy)
    return [y, *grads]


def first_use_check_mabn(x: torch.Tensor, state_dtype: torch.dtype, shape: Optional[Sequence[int]] = None, *,
                      public_function: type) -> Optional[str]:
    """None when MABN's four kernels agree with `public_function` (the layer's public-operation
    autograd Function, `MABNFunction`) in every phase, else what differs.

    Raises whatever the kernels raise (compile, driver or launch errors): the caller reports it.
    `shape`: the check's input shape (default a tiny one; tools/check_cuda.py passes large ones).
    """
    from .mabn import TritonMABNFunction

    channels = shape[1] if shape else _CHANNELS

    def fresh():
        kw = dict(device=x.device, dtype=state_dtype)
        return [torch.full((channels,), 1.3, **kw), torch.full((channels,), 0.1, **kw)], \
            [torch.ones(channels, **kw), torch.zeros(2, channels, **kw), torch.zeros(2, channels, **kw)]

    params = {"triton": fresh(), "torch": fresh()}
    names = ("y", "dx", "dweight", "dbias", "running_var", "x2_buffer", "gz_buffer")
    for iteration in (1, 2, 3, 4):  # buffer 2, warm-ups 3 / 3: batch statistics, SMA, SMA + clipped r
        phase = mabn_phase(iteration, buffer_size=2, warmup_iters=3, renorm_warmup_iters=3)
        xi, dy = _like(x, iteration, 1.0 + iteration, shape), _like(x, 100 + iteration, 1.0, shape)
        results = {}
        for key, function in (("triton", TritonMABNFunction.apply), ("torch", public_function.apply)):
            (weight, bias), state = params[key]
            results[key] = _step(lambda xx, w, b: function(xx, w, b, *state, phase, 0.9, 1e-5, 1.5),
                                 xi, dy, [weight, bias]) + [s.clone() for s in state]
        problem = _disagreement(names, results["triton"], results["torch"], x.dtype, f"iteration {iteration}")
        if problem:
            return problem
    return None


def first_use_check_batch_renorm(x: torch.Tensor, state_dtype: torch.dtype, shape: Optional[Sequence[int]] = None, *,
                              public_step: Callable[..., torch.Tensor]) -> Optional[str]:
    """None when Batch Renormalization's kernels agree with `public_step` (the layer's public-operation
    step; r and d clipped and free), else what differs."""
    from .batch_renorm import TritonBatchRenormFunction

    batch_renorm_step = public_step

    channels = shape[1] if shape else _CHANNELS

    def fresh():
        kw = dict(device=x.device, dtype=state_dtype)
        return [torch.full((channels,), 1.3, **kw), torch.full((channels,), 0.1, **kw)], \
            [torch.zeros(channels, **kw), torch.ones(channels, **kw)]

    params = {"triton": fresh(), "torch": fresh()}
    names = ("y", "dx", "dweight", "dbias", "running_mean", "running_var")
    for step, (rate, r_max, d_max) in enumerate(((0.1, 1.0, 0.0), (0.6, 1.2, 0.1), (0.1, 3.0, 5.0)), start=1):
        xi, dy = _like(x, step, 1.0 + step, shape), _like(x, 100 + step, 1.0, shape)
        results = {}
        for key, function in (("triton", TritonBatchRenormFunction.apply), ("torch", batch_renorm_step)):
            (weight, bias), state = params[key]
            results[key] = _step(lambda xx, w, b: function(xx, w, b, *state, rate, 1e-5, r_max, d_max),
                                 xi, dy, [weight, bias]) + [s.clone() for s in state]
        problem = _disagreement(names, results["triton"], results["torch"], x.dtype, f"check step {step}")
        if problem:
            return problem
    return None
