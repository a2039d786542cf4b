"""MABN's training step on Triton kernels: an autograd Function with four launches per step.

Same math and state semantics as the public-operation `MABNFunction` (see the algorithm spec):
the forward is one reduction whose epilogue updates the ring buffer and running_var, then one
normalizing pass; the backward is one reduction whose epilogue updates the Psi ring buffer,
then one pass for dx. Phase and hyper-parameters come from the host (`MABNPhase`), nothing is
read back from the device, and only x (plus [4, C] per-channel numbers) is saved for backward.
"""
from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from .functional import MABNPhase
from .triton_launch import (
    arrival_counters, kernel_module, launch_channel_affine, matching_layout, plan_reduction_for, ring_block,
    unsupported_input_reason, launch_guard, launch_reduction,
)

__all__ = ["TritonMABNFunction", "triton_mabn_unsupported_reason"]


def triton_mabn_unsupported_reason(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_var: torch.Tensor,
    x2_buffer: torch.Tensor, gz_buffer: torch.Tensor,
) -> Optional[str]:
    """None when the Triton kernels can run this MABN step, else why not (for error messages)."""
    state = (("weight", weight), ("bias", bias), ("running_var", running_var), ("x2_buffer", x2_buffer),
             ("gz_buffer", gz_buffer))
    return unsupported_input_reason(x, running_var.dtype, state)


class TritonMABNFunction(torch.autograd.Function):
    """One MABN training step on Triton kernels. Updates the layer state in place."""

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
        if x.numel() == 0:
            raise ValueError("TritonMABNFunction needs a non-empty batch (MABN2d answers an empty one in eval form)")
        kernels = kernel_module("triton_mabn_kernels")
        with launch_guard(x.device):
            n, c, h, w = x.shape
            plan, channels_last = plan_reduction_for(x)
            # One allocation per launch: the statistics handed to backward, then the per-program partial
            # sums. Statistics first, so both pointers' alignment depends on C only (one compiled variant).
            workspace = torch.empty((kernels.STATS_ROWS + plan.num_splits, c), dtype=running_var.dtype,
                                    device=x.device)
            stats, partials = workspace[:kernels.STATS_ROWS], workspace[kernels.STATS_ROWS:]
            launch_reduction(kernels.forward_statistics_kernel, plan.grid, x.device, "MABN2d forward",
                x, weight, running_var, x2_buffer, partials, arrival_counters(x.device, plan.channel_blocks), stats,
                c, h * w, n * h * w, plan.num_tiles, plan.num_splits, phase.slot, x2_buffer.shape[0],
                ema_decay, 1.0 - ema_decay, eps, 1.0 / renorm_clip, renorm_clip,
                CHANNELS_LAST=channels_last, USE_BATCH_STATISTICS=phase.use_batch_statistics,
                RENORMALIZE=phase.renormalize, BLOCK_R=plan.block_r, BLOCK_C=plan.block_c, BLOCK_S=plan.block_s,
                BLOCK_RING=ring_block(x2_buffer.shape[0], plan.block_c),
            )
            y = launch_channel_affine(x, stats[kernels.STATS_ALPHA], bias, channels_last=channels_last)
        ctx.save_for_backward(x, weight, stats)
        ctx.gz_buffer = gz_buffer
        ctx.phase = phase
        ctx.eps = eps
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        kernels = kernel_module("triton_mabn_kernels")
        x, weight, stats = ctx.saved_tensors
        phase: MABNPhase = ctx.phase
        gz_buffer: torch.Tensor = ctx.gz_buffer
        grad_out = matching_layout(grad_out, x)
        with launch_guard(x.device):
            n, c, h, w = x.shape
            plan, channels_last = plan_reduction_for(x)
            workspace = torch.empty((kernels.GRADS_ROWS + 2 * plan.num_splits, c), dtype=stats.dtype, device=x.device)
            grads, partials = workspace[:kernels.GRADS_ROWS], workspace[kernels.GRADS_ROWS:]
            launch_reduction(kernels.backward_statistics_kernel, plan.grid, x.device, "MABN2d backward",
                grad_out, x, weight, stats, gz_buffer, partials, arrival_counters(x.device, plan.channel_blocks), grads,
                c, h * w, n * h * w, plan.num_tiles, plan.num_splits, phase.slot, gz_buffer.shape[0], ctx.eps,
                CHANNELS_LAST=channels_last, USE_BATCH_STATISTICS=phase.use_batch_statistics,
                BLOCK_R=plan.block_r, BLOCK_C=plan.block_c, BLOCK_S=plan.block_s,
                BLOCK_RING=ring_block(gz_buffer.shape[0], plan.block_c),
            )
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = launch_channel_affine(
                    grad_out, stats[kernels.STATS_ALPHA], None, b=x, scale_b=grads[kernels.GRADS_X_COEF],
                    channels_last=channels_last,
                )
        return grad_x, grads[kernels.GRADS_WEIGHT], grads[kernels.GRADS_BIAS], None, None, None, None, None, None, None
