"""Batch Renormalization's training step on Triton kernels (four launches per step).

Same math as BatchRenorm2d's public-operation path: BN with y = weight*(x_hat*r + d) + bias,
r and d clipped and constant in backward, running statistics updated in place (a non-finite
channel keeps both). r_max and d_max come from the host schedule; nothing is read back.
"""
from typing import Optional, Tuple

import torch

from .launch import (
    arrival_counters, kernel_module, launch_channel_affine, launch_guard, launch_reduction, matching_layout,
    once_differentiable_when_graphed, step_plan, unsupported_input_reason,
)

__all__ = ["TritonBatchRenormFunction", "triton_brn_unsupported_reason"]


def triton_brn_unsupported_reason(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor
) -> Optional[str]:
    """None when the Triton kernels can run this Batch Renormalization step, else why not."""
    state = (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var))
    return unsupported_input_reason(x, running_var.dtype, state)


class TritonBatchRenormFunction(torch.autograd.Function):
    """One Batch Renormalization training step on Triton kernels. Updates the running statistics."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        ema_update_rate: float,
        eps: float,
        r_max: float,
        d_max: float,
    ) -> torch.Tensor:
        if x.numel() == 0:
            raise ValueError("TritonBatchRenormFunction needs a non-empty batch")
        kernels = kernel_module("batch_renorm_kernels")
        plan = step_plan(x)
        reduction, count = plan.reduction, plan.count
        with launch_guard(x.device):
            # one allocation: statistics first (alignment fixed by C), then the partial sums
            workspace = torch.empty((kernels.STATS_ROWS + 2 * reduction.num_splits, plan.channels),
                                    dtype=running_var.dtype, device=x.device)
            stats, partials = workspace[:kernels.STATS_ROWS], workspace[kernels.STATS_ROWS:]
            launch_reduction(kernels.forward_statistics_kernel, reduction.grid, x.device, "BatchRenorm2d forward",
                (x, weight, bias, running_mean, running_var, partials,
                 arrival_counters(x.device, reduction.channel_blocks), stats, *plan.reduction_sizes,
                 ema_update_rate, 1.0 - ema_update_rate, count / max(count - 1, 1), eps, 1.0 / r_max, r_max, d_max),
                dict(plan.reduction_blocks, LERP_FROM_END=ema_update_rate >= 0.5),
            )
            y = launch_channel_affine(plan, x, stats[kernels.STATS_SCALE], stats[kernels.STATS_SHIFT])
        ctx.save_for_backward(x, stats)
        return y

    @staticmethod
    @once_differentiable_when_graphed
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        kernels = kernel_module("batch_renorm_kernels")
        x, stats = ctx.saved_tensors
        grad_out = matching_layout(grad_out, x)
        plan = step_plan(x)
        reduction = plan.reduction
        with launch_guard(x.device):
            workspace = torch.empty((kernels.GRADS_ROWS + 2 * reduction.num_splits, plan.channels), dtype=stats.dtype,
                                    device=x.device)
            grads, partials = workspace[:kernels.GRADS_ROWS], workspace[kernels.GRADS_ROWS:]
            launch_reduction(kernels.backward_statistics_kernel, reduction.grid, x.device, "BatchRenorm2d backward",
                (grad_out, x, stats, partials, arrival_counters(x.device, reduction.channel_blocks), grads,
                 *plan.reduction_sizes), plan.reduction_blocks,
            )
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = launch_channel_affine(plan, grad_out, stats[kernels.STATS_SCALE], grads[kernels.GRADS_OFFSET],
                                               b=x, scale_b=grads[kernels.GRADS_X_COEF])
        return grad_x, grads[kernels.GRADS_WEIGHT], grads[kernels.GRADS_BIAS], None, None, None, None, None, None
