"""The paper's two MABN ablations as drop-in norm modules.

Each removes one ingredient of MABN so a study can show what that ingredient buys:

* `MABNForwardOnly2d` keeps the moving averages in the forward pass only; the backward uses
  the current batch's Psi_B (noisy at small batches) instead of its moving average.
* `MABNCentered2d` drops weight centralization: it keeps the mean statistics, normalizing by
  moving averages of mu_B and sigma2_B and using moving averages of g_B and Psi_B in the
  backward. It is meant for plain (non-centered) convolutions.

Both share MABN2d's buffer, warm-up, re-normalization and EMA semantics.
"""
from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from mabn_d2.layers.base import MABNPhase, MovingAverageNorm, running_var_decay
from mabn_d2.layers.channel_ops import (
    CHANNEL_REDUCTION_DIMS as _DIMS,
    accumulation_dtype, channel_normalize, channel_sum, channel_sum_of_products, channel_view, keep_finite,
)
from mabn_d2.layers.mabn import MABN2d, MABNFunction

__all__ = ["MABNForwardOnly2d", "MABNCentered2d", "centered_mabn_inference"]



class _ForwardOnlyFunction(MABNFunction):
    """MABNFunction whose backward always takes the batch Psi_B.

    The forward (and the ring-buffer writes) are MABN's own; only the phase handed to the
    backward is changed, so the two cannot drift apart.
    """

    @staticmethod
    def forward(ctx, *args):  # type: ignore[override]
        y = MABNFunction.forward(ctx, *args)
        ctx.phase = ctx.phase._replace(use_batch_statistics=True)
        return y


class MABNForwardOnly2d(MABN2d):
    """MABN with moving averages in the forward pass only (ablation).

    Same parameters, state and forward output as `MABN2d`; the input gradient uses the batch
    Psi_B of the current iteration. gz_buffer is still filled, so the state matches MABN2d's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if not self.training or x.numel() == 0:
            return super().forward(x)
        phase = self._next_phase()
        return _ForwardOnlyFunction.apply(
            x, self.weight, self.bias, self.running_var, self.x2_buffer, self.gz_buffer,
            phase, running_var_decay(self.ema_decay, phase), self.eps, self.renorm_clip,
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
    return channel_normalize(x, running_var, weight, bias, eps, mean=running_mean)


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
        ema_decay: float,
        eps: float,
        renorm_clip: float,
    ) -> torch.Tensor:
        var_batch, mean_batch = torch.var_mean(x.to(accumulation_dtype(x, running_var)), dim=_DIMS, correction=0)
        slot = phase.slot
        mean_buffer[slot] = keep_finite(mean_batch.to(mean_buffer.dtype), mean_buffer[slot])
        var_buffer[slot] = keep_finite(var_batch.to(var_buffer.dtype), var_buffer[slot])
        if phase.use_batch_statistics:
            mean, var = mean_batch.to(running_var.dtype), var_batch.to(running_var.dtype)
        else:
            mean, var = mean_buffer.mean(0), var_buffer.mean(0)

        r: Optional[torch.Tensor] = None
        if phase.renormalize:
            r = ((var + eps).sqrt() / (running_var + eps).sqrt()).clamp(1.0 / renorm_clip, renorm_clip)
        running_mean.copy_(keep_finite(running_mean * ema_decay + mean * (1.0 - ema_decay), running_mean))
        running_var.copy_(keep_finite(running_var * ema_decay + var * (1.0 - ema_decay), running_var))
        scale = weight if r is None else weight * r
        y = channel_normalize(x, var, scale, bias, eps, mean=mean)

        ctx.save_for_backward(x, scale, mean, var, r)
        ctx.grad_mean_buffer = grad_mean_buffer
        ctx.psi_buffer = psi_buffer
        ctx.phase = phase
        ctx.eps = eps
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, scale, mean, var, r = ctx.saved_tensors
        phase: MABNPhase = ctx.phase
        count = x.numel() // x.shape[1]
        # With s = sqrt(var + eps) and x_hat = (x - mean) / s: sum(dy * x_hat) = (sum(dy * x) - mean * sum(dy)) / s.
        accumulate = accumulation_dtype(grad_out, var)
        inv_std = (var + ctx.eps).rsqrt()
        sum_dy = channel_sum(grad_out, accumulate).to(var.dtype)
        sum_dy_x = channel_sum_of_products(grad_out, x, accumulate).to(var.dtype)
        sum_dy_xhat = (sum_dy_x - mean * sum_dy) * inv_std
        g_mean_batch = scale * sum_dy / count  # mean(g), g = dy * scale
        psi_batch = scale * sum_dy_xhat / count  # mean(g * x_hat)
        buffers = (ctx.grad_mean_buffer, ctx.psi_buffer)
        for buffer, value in zip(buffers, (g_mean_batch, psi_batch)):
            buffer[phase.slot] = keep_finite(value.to(buffer.dtype), buffer[phase.slot])

        grad_x = None
        if ctx.needs_input_grad[0]:
            if phase.use_batch_statistics:
                g_mean, psi = g_mean_batch, psi_batch
            else:
                g_mean, psi = buffers[0].mean(0), buffers[1].mean(0)
            # (g - g_mean - x_hat * psi) / s  =  dy * scale / s + (mean * psi / s^2 - g_mean / s) - x * psi / s^2
            inv_var = inv_std.square()
            shift = mean * psi * inv_var - g_mean * inv_std
            grad_x = channel_normalize(grad_out, var, scale, shift, ctx.eps)
            grad_x.addcmul_(x, channel_view(psi * inv_var), value=-1)
        grad_weight = sum_dy_xhat if r is None else sum_dy_xhat * r
        return (grad_x, grad_weight, sum_dy) + (None,) * 10


class MABNCentered2d(MovingAverageNorm):
    """MABN that keeps the mean statistics instead of relying on weight centralization (ablation).

    Normalizes by moving averages of the batch mean and batch variance, and replaces g_B and
    Psi_B in the backward by their moving averages; otherwise as MABN2d (buffer length,
    warm-ups, clipped re-normalization factor r, EMA with decay `ema_decay`).
    At inference: gamma * (x - running_mean) / sqrt(running_var + eps) + beta.

    Deliberately not an MABN2d subclass: code that treats MABN2d as zero-mean (build-time
    weight centralization, folding with running_mean = 0) must not apply to it.

    State: running_mean / running_var (EMAs of the statistics used), num_batches_tracked, and
    ring buffers [buffer_size, C] of mu_B (mean_buffer), sigma2_B (x2_buffer: the second moment
    of the centred input), g_B (grad_mean_buffer) and Psi_B (gz_buffer).
    """

    ring_buffers = ("mean_buffer", "x2_buffer", "grad_mean_buffer", "gz_buffer")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if not self.training or x.numel() == 0:
            return centered_mabn_inference(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)
        phase = self._next_phase()
        return CenteredMABNFunction.apply(
            x, self.weight, self.bias, self.running_mean, self.running_var, self.mean_buffer,
            self.x2_buffer, self.grad_mean_buffer, self.gz_buffer, phase,
            running_var_decay(self.ema_decay, phase), self.eps, self.renorm_clip,
        )
