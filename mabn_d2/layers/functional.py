"""The MABN math, separate from the module so it can be tested alone.

One training step is an autograd Function: the forward normalizes by the (moving average of
the) uncentred second moment chi2, the backward replaces the batch statistic Psi_B by its
moving average. MABN's mean is zero by definition, so no mean enters the math.

Every operation is a public PyTorch one with the same meaning on every device (see
`channel_ops`): one reduction and one elementwise pass in the forward, two reductions and two
elementwise passes in the backward, the input as the only activation saved for backward. No
statistic ever leaves the device, so a step never synchronises with the host.
"""
from typing import NamedTuple, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from .channel_ops import (
    accumulation_dtype, channel_normalize, channel_sum, channel_sum_of_products, channel_sum_of_squares,
)

__all__ = ["MABNPhase", "mabn_phase", "mabn_inference", "MABNFunction", "channel_view", "keep_finite"]


class MABNPhase(NamedTuple):
    """What one training iteration of an MABN layer does, decided on the host (a tuple: cheap per step)."""

    iteration: int  # 1-based count of training forwards, this one included
    slot: int  # ring-buffer row written by this iteration
    use_batch_statistics: bool  # early phase: chi2_B and Psi_B instead of their moving averages
    renormalize: bool  # apply the clipped re-normalization factor r


def mabn_phase(
    iteration: int, buffer_size: int, warmup_iters: int, renorm_warmup_iters: int
) -> MABNPhase:
    """The phase of 1-based training iteration `iteration` (see docs/algorithm.md)."""
    if iteration < 1:
        raise ValueError(f"iteration must be >= 1, got {iteration}")
    return MABNPhase(  # iteration, slot, use_batch_statistics, renormalize (positional: built every step)
        iteration,
        iteration % buffer_size,
        iteration <= buffer_size or iteration < warmup_iters,
        iteration > max(renorm_warmup_iters, warmup_iters),
    )


def running_var_decay(ema_decay: float, phase: MABNPhase) -> float:
    """EMA decay for running_var in this iteration: 0 at the first, so it starts from data.

    As in the official classification code: an EMA started from the initial 1 would still carry
    ema_decay^t of that 1 when re-normalization starts. The iteration counter is in the state,
    so resume and load stay exact.
    """
    return ema_decay if phase.iteration > 1 else 0.0


def mabn_inference(
    x: torch.Tensor, running_var: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    zero_mean: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Eval-mode MABN: the frozen affine gamma * x / sqrt(running_var + eps) + beta.

    `zero_mean` (the layer's all-zero running_mean) saves allocating a zero mean per call.
    """
    return channel_normalize(x, running_var, weight, bias, eps, mean=zero_mean)


def channel_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def keep_finite(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per-channel guard: a non-finite statistic leaves the stored value unchanged."""
    return torch.where(torch.isfinite(new), new, old)


class MABNFunction(torch.autograd.Function):
    """One MABN training step. Updates the layer state in place (ring buffers, running_var)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        running_var: torch.Tensor,
        x2_buffer: torch.Tensor,
        gz_buffer: torch.Tensor,
        phase: MABNPhase,
        ema_decay: float,
        eps: float,
        renorm_clip: float,
    ) -> torch.Tensor:
        count = x.numel() // x.shape[1]
        sum_x2 = channel_sum_of_squares(x, accumulation_dtype(x, running_var))
        chi2_batch = (sum_x2 / count).to(running_var.dtype)
        x2_buffer[phase.slot] = keep_finite(chi2_batch, x2_buffer[phase.slot])
        chi2 = chi2_batch if phase.use_batch_statistics else x2_buffer.mean(0)

        r: Optional[torch.Tensor] = None
        if phase.renormalize:
            r = ((chi2 + eps).sqrt() / (running_var + eps).sqrt()).clamp(1.0 / renorm_clip, renorm_clip)
        updated_var = running_var * ema_decay + chi2 * (1.0 - ema_decay)
        running_var.copy_(keep_finite(updated_var, running_var))

        scale = weight if r is None else weight * r
        y = channel_normalize(x, chi2, scale, bias, eps)

        ctx.save_for_backward(x, scale, chi2, r)
        ctx.gz_buffer = gz_buffer
        ctx.phase = phase
        ctx.eps = eps
        ctx.count = count
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, scale, chi2, r = ctx.saved_tensors
        phase: MABNPhase = ctx.phase
        gz_buffer: torch.Tensor = ctx.gz_buffer

        # With s = sqrt(chi2 + eps) and z = x / s: sum(dy * z) = sum(dy * x) / s.
        accumulate = accumulation_dtype(grad_out, chi2)
        inv_std = (chi2 + ctx.eps).rsqrt()
        sum_dy_z = (channel_sum_of_products(grad_out, x, accumulate) * inv_std).to(chi2.dtype)
        sum_dy = channel_sum(grad_out, accumulate) if ctx.needs_input_grad[2] else None
        psi_batch = (scale * sum_dy_z / ctx.count).to(gz_buffer.dtype)
        gz_buffer[phase.slot] = keep_finite(psi_batch, gz_buffer[phase.slot])

        grad_x = None
        if ctx.needs_input_grad[0]:
            psi = psi_batch if phase.use_batch_statistics else gz_buffer.mean(0)
            # dx = (g_z - z * Psi) / s = dy * scale / s - x * Psi / s^2, in two passes.
            grad_x = channel_normalize(grad_out, chi2, scale, None, ctx.eps)
            grad_x.addcmul_(x, channel_view(psi * inv_std.square()), value=-1)
        grad_weight = sum_dy_z if r is None else sum_dy_z * r
        return grad_x, grad_weight, sum_dy, None, None, None, None, None, None, None
