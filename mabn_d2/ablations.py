"""The paper's two MABN ablations as drop-in norm modules.

Each removes one ingredient of MABN so a study can show what that ingredient buys:

* `MABNForwardOnly2d` keeps the moving averages in the forward pass only; the backward uses
  the current batch's Psi_B (noisy at small batches) instead of its moving average.
* `MABNCentered2d` drops weight centralization: it keeps the mean statistics, normalizing by
  moving averages of mu_B and sigma2_B and using moving averages of g_B and Psi_B in the
  backward. It is meant for plain (non-centered) convolutions.

Both share MABN2d's buffer, warm-up, re-normalization and EMA semantics (mabn-algorithm.md).
"""
import dataclasses
from typing import Optional, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .layers.functional import MABNFunction, MABNPhase, mabn_phase
from .layers.mabn import MABN2d

__all__ = ["MABNForwardOnly2d", "MABNCentered2d", "centered_mabn_inference"]

_DIMS = (0, 2, 3)


def _channel_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def _keep_finite(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(new), new, old)


def _check_input(module: nn.Module, x: torch.Tensor) -> None:
    name = type(module).__name__
    if x.dim() != 4:
        raise ValueError(f"{name} expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != module.num_features:
        raise ValueError(f"{name}({module.num_features}) got an input with {x.shape[1]} channels")


class _ForwardOnlyFunction(MABNFunction):
    """MABNFunction whose backward always takes the batch Psi_B.

    The forward (and the ring-buffer writes) are MABN's own; only the phase handed to the
    backward is changed, so the two cannot drift apart.
    """

    @staticmethod
    def forward(ctx, *args):  # type: ignore[override]
        y = MABNFunction.forward(ctx, *args)
        ctx.phase = dataclasses.replace(ctx.phase, use_batch_statistics=True)
        return y


class MABNForwardOnly2d(MABN2d):
    """MABN with moving averages in the forward pass only (ablation).

    Same parameters, state and forward output as `MABN2d`; the input gradient uses the batch
    Psi_B of the current iteration. gz_buffer is still filled, so the state matches MABN2d's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x)
        if not self.training or x.numel() == 0:
            return super().forward(x)
        self._iteration += 1
        self.num_batches_tracked.add_(1)
        phase = mabn_phase(self._iteration, self.buffer_size, self.warmup_iters, self.renorm_warmup_iters)
        return _ForwardOnlyFunction.apply(
            x, self.weight, self.bias, self.running_mean, self.running_var, self.x2_buffer,
            self.gz_buffer, phase, self.momentum, self.eps, self.renorm_clip,
        )


def centered_mabn_inference(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Eval-mode `MABNCentered2d`: gamma * (x - running_mean) / sqrt(running_var + eps) + beta."""
    return nn.functional.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)


class CenteredMABNFunction(torch.autograd.Function):
    """One training step of `MABNCentered2d`; updates the layer state in place.

    forward:  x_hat = (x - mu) / sqrt(sigma2 + eps),  y = gamma * r * x_hat + beta
    backward: g = dy * gamma * r,  dx = (g - g_bar - x_hat * Psi) / sqrt(sigma2 + eps)
    where (mu, sigma2, g_bar, Psi) are the batch statistics in the early phase and their
    moving averages over the ring buffers afterwards; r is a constant, as in MABN.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        mean_buffer: torch.Tensor,
        var_buffer: torch.Tensor,
        grad_mean_buffer: torch.Tensor,
        psi_buffer: torch.Tensor,
        phase: MABNPhase,
        momentum: float,
        eps: float,
        renorm_clip: float,
    ) -> torch.Tensor:
        var_batch, mean_batch = torch.var_mean(x, dim=_DIMS, correction=0)
        slot = phase.slot
        mean_buffer[slot] = _keep_finite(mean_batch.to(mean_buffer.dtype), mean_buffer[slot])
        var_buffer[slot] = _keep_finite(var_batch.to(var_buffer.dtype), var_buffer[slot])
        if phase.use_batch_statistics:
            mean, var = mean_batch.to(running_var.dtype), var_batch.to(running_var.dtype)
        else:
            mean, var = mean_buffer.mean(0), var_buffer.mean(0)

        r: Optional[torch.Tensor] = None
        if phase.renormalize:
            r = ((var + eps).sqrt() / (running_var + eps).sqrt()).clamp(1.0 / renorm_clip, renorm_clip)
        running_mean.copy_(_keep_finite(running_mean * momentum + mean * (1.0 - momentum), running_mean))
        running_var.copy_(_keep_finite(running_var * momentum + var * (1.0 - momentum), running_var))

        std = (var + eps).sqrt()
        x_hat = (x - _channel_view(mean)) / _channel_view(std)
        scale = weight if r is None else weight * r
        y = torch.addcmul(_channel_view(bias), x_hat, _channel_view(scale))

        ctx.save_for_backward(x_hat, scale, std, r)
        ctx.grad_mean_buffer = grad_mean_buffer
        ctx.psi_buffer = psi_buffer
        ctx.phase = phase
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x_hat, scale, std, r = ctx.saved_tensors
        phase: MABNPhase = ctx.phase
        slot = phase.slot
        g = grad_out * _channel_view(scale)
        g_mean_batch = g.mean(_DIMS)
        psi_batch = (g * x_hat).mean(_DIMS)
        buffers = (ctx.grad_mean_buffer, ctx.psi_buffer)
        for buffer, value in zip(buffers, (g_mean_batch, psi_batch)):
            buffer[slot] = _keep_finite(value.to(buffer.dtype), buffer[slot])

        grad_x = None
        if ctx.needs_input_grad[0]:
            if phase.use_batch_statistics:
                g_mean, psi = g_mean_batch, psi_batch
            else:
                g_mean, psi = buffers[0].mean(0), buffers[1].mean(0)
            grad_x = (g - _channel_view(g_mean) - x_hat * _channel_view(psi)) / _channel_view(std)
        grad_weight = (grad_out * x_hat).sum(_DIMS)
        if r is not None:
            grad_weight = grad_weight * r
        grad_bias = grad_out.sum(_DIMS)
        return (grad_x, grad_weight, grad_bias) + (None,) * 10


class MABNCentered2d(MABN2d):
    """MABN that keeps the mean statistics instead of relying on weight centralization (ablation).

    Normalizes by moving averages of the batch mean and batch variance, and replaces g_B and
    Psi_B in the backward by their moving averages; otherwise identical to MABN2d (buffer
    length, warm-ups, clipped re-normalization factor r, EMA with decay `momentum`).
    At inference: gamma * (x - running_mean) / sqrt(running_var + eps) + beta.

    State beyond MABN2d's: running_mean is the EMA of the mean actually used; x2_buffer holds
    the batch variance (the second moment of the centred input); mean_buffer and
    grad_mean_buffer hold mu_B and g_B.
    """

    def __init__(self, num_features: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.register_buffer("mean_buffer", torch.zeros(self.buffer_size, num_features))
        self.register_buffer("grad_mean_buffer", torch.zeros(self.buffer_size, num_features))

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        self.mean_buffer.zero_()
        self.grad_mean_buffer.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x)
        if not self.training or x.numel() == 0:
            return centered_mabn_inference(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)
        self._iteration += 1
        self.num_batches_tracked.add_(1)
        phase = mabn_phase(self._iteration, self.buffer_size, self.warmup_iters, self.renorm_warmup_iters)
        return CenteredMABNFunction.apply(
            x, self.weight, self.bias, self.running_mean, self.running_var, self.mean_buffer,
            self.x2_buffer, self.grad_mean_buffer, self.gz_buffer, phase, self.momentum, self.eps,
            self.renorm_clip,
        )
