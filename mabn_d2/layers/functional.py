"""The MABN math, separate from the module so it can be tested alone.

One training step is an autograd Function: the forward normalizes by the (moving average of
the) uncentred second moment chi2, the backward replaces the batch statistic Psi_B by its
moving average. Both passes are built from ATen's fused batch-norm kernels with a zero mean
(one reduction pass and one elementwise pass each), which is what makes MABN as fast as
BatchNorm; no statistic ever leaves the device, so a step never synchronises with the host.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

__all__ = ["MABNPhase", "mabn_phase", "mabn_inference", "MABNFunction", "channel_view", "keep_finite"]

_aten = torch.ops.aten


@dataclass(frozen=True)
class MABNPhase:
    """What one training iteration of an MABN layer does, decided on the host."""

    iteration: int  # 1-based count of training forwards, this one included
    slot: int  # ring-buffer row written by this iteration
    use_batch_statistics: bool  # early phase: chi2_B and Psi_B instead of their moving averages
    renormalize: bool  # apply the clipped re-normalization factor r


def mabn_phase(
    iteration: int, buffer_size: int, warmup_iters: int, renorm_warmup_iters: int
) -> MABNPhase:
    """The phase of 1-based training iteration `iteration` (see docs: the algorithm spec)."""
    if iteration < 1:
        raise ValueError(f"iteration must be >= 1, got {iteration}")
    return MABNPhase(
        iteration=iteration,
        slot=iteration % buffer_size,
        use_batch_statistics=iteration <= buffer_size or iteration < warmup_iters,
        renormalize=iteration > max(renorm_warmup_iters, warmup_iters),
    )


def mabn_inference(
    x: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    zero_mean: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Eval-mode MABN: the frozen affine gamma * x / sqrt(running_var + eps) + beta.

    `zero_mean` (a zero tensor of shape [C]) can be passed to avoid allocating one per call.
    """
    if zero_mean is None:
        zero_mean = torch.zeros_like(running_var)
    return torch.nn.functional.batch_norm(x, zero_mean, running_var, weight, bias, False, 0.0, eps)


def channel_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def keep_finite(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per-channel guard: a non-finite statistic leaves the stored value unchanged."""
    return torch.where(torch.isfinite(new), new, old)


def _channel_sum_of_products(
    a: torch.Tensor, b: torch.Tensor, zeros: torch.Tensor, ones: torch.Tensor
) -> torch.Tensor:
    """sum_{N,H,W}(a * b) per channel in one fused pass (BatchNorm's eval backward kernel)."""
    return _aten.native_batch_norm_backward(
        a, b, None, zeros, ones, None, None, False, 0.0, [False, True, False]
    )[1]


class MABNFunction(torch.autograd.Function):
    """One MABN training step. Updates the layer state in place (ring buffers, running_var)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        x2_buffer: torch.Tensor,
        gz_buffer: torch.Tensor,
        phase: MABNPhase,
        momentum: float,
        eps: float,
        renorm_clip: float,
    ) -> torch.Tensor:
        count = x.numel() // x.shape[1]
        zeros = running_mean  # MABN's mean is zero by construction
        ones = torch.ones_like(running_var)

        chi2_batch = _channel_sum_of_products(x, x, zeros, ones).to(running_var.dtype) / count
        x2_buffer[phase.slot] = keep_finite(chi2_batch, x2_buffer[phase.slot])
        chi2 = chi2_batch if phase.use_batch_statistics else x2_buffer.mean(0)

        r: Optional[torch.Tensor] = None
        if phase.renormalize:
            r = ((chi2 + eps).sqrt() / (running_var + eps).sqrt()).clamp(1.0 / renorm_clip, renorm_clip)
        updated_var = running_var * momentum + chi2 * (1.0 - momentum)
        running_var.copy_(keep_finite(updated_var, running_var))

        scale = weight if r is None else weight * r
        y = torch.native_batch_norm(x, scale, bias, zeros, chi2, False, 0.0, eps)[0]

        ctx.save_for_backward(x, scale, zeros, chi2, r)
        ctx.gz_buffer = gz_buffer
        ctx.phase = phase
        ctx.eps = eps
        ctx.count = count
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, scale, zeros, chi2, r = ctx.saved_tensors
        phase: MABNPhase = ctx.phase
        gz_buffer: torch.Tensor = ctx.gz_buffer
        need_input_grad = ctx.needs_input_grad[0]

        # One fused pass: grad_in = dy * gamma * r / s, sum(dy * z) and sum(dy).
        grad_scaled, sum_dy_z, sum_dy = _aten.native_batch_norm_backward(
            grad_out, x, scale, zeros, chi2, None, None, False, ctx.eps, [need_input_grad, True, True]
        )
        psi_batch = (scale * sum_dy_z / ctx.count).to(gz_buffer.dtype)
        gz_buffer[phase.slot] = keep_finite(psi_batch, gz_buffer[phase.slot])

        grad_x = None
        if need_input_grad:
            psi = psi_batch if phase.use_batch_statistics else gz_buffer.mean(0)
            grad_x = grad_scaled.addcmul_(x, channel_view(psi / (chi2 + ctx.eps)), value=-1)
        grad_weight = sum_dy_z if r is None else sum_dy_z * r
        return grad_x, grad_weight, sum_dy, None, None, None, None, None, None, None, None
