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

from ..base import MABNPhase
from .launch import (
    arrival_counters, kernel_module, launch_channel_affine, launch_guard, launch_reduction, matching_layout, ring_block,
    step_plan, unsupported_input_reason,
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
    """One MABN training step on Triton kernels. Updates the layer state in place.

    Host work per step is kept to what the step needs: the launch geometry comes from a cached
    `StepPlan`, each direction allocates one workspace (results, then partial sums) and passes it
    whole, and the backward reads the forward's workspace (a few [C] rows plus its partial sums,
    saved instead of a view of it); the weight and bias gradients are tensors of their own.
    """

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
        kernels = kernel_module("mabn_kernels")
        plan = step_plan(x)
        reduction = plan.reduction
        with launch_guard(x.device):
            stats = torch.empty((kernels.STATS_ROWS + reduction.num_splits, plan.channels), dtype=running_var.dtype,
                                device=x.device)
            buffer_size = x2_buffer.shape[0]
            launch_reduction(kernels.forward_statistics_kernel, reduction.grid, x.device, "MABN2d forward",
                x, weight, running_var, x2_buffer, stats, arrival_counters(x.device, reduction.channel_blocks),
                plan.channels, plan.hw, plan.count, reduction.num_tiles, reduction.num_splits, phase.slot, buffer_size,
                ema_decay, 1.0 - ema_decay, eps, 1.0 / renorm_clip, renorm_clip,
                CHANNELS_LAST=plan.channels_last, USE_BATCH_STATISTICS=phase.use_batch_statistics,
                RENORMALIZE=phase.renormalize, BLOCK_R=reduction.block_r, BLOCK_C=reduction.block_c,
                BLOCK_S=reduction.block_s, BLOCK_RING=ring_block(buffer_size, reduction.block_c),
            )
            # alpha is the workspace's row 0 (STATS_ALPHA): the workspace is the scale
            y = launch_channel_affine(x, stats, bias, channels_last=plan.channels_last, plan=plan.affine)
        ctx.save_for_backward(x, weight, stats)
        ctx.backward_args = (gz_buffer, phase, eps)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        kernels = kernel_module("mabn_kernels")
        x, weight, stats = ctx.saved_tensors
        gz_buffer, phase, eps = ctx.backward_args
        grad_out = matching_layout(grad_out, x)
        plan = step_plan(x)
        reduction = plan.reduction
        with launch_guard(x.device):
            workspace = torch.empty((kernels.GRADS_ROWS + 2 * reduction.num_splits, plan.channels),
                                    dtype=stats.dtype, device=x.device)
            grad_weight, grad_bias = torch.empty_like(weight), torch.empty_like(weight)
            buffer_size = gz_buffer.shape[0]
            launch_reduction(kernels.backward_statistics_kernel, reduction.grid, x.device, "MABN2d backward",
                grad_out, x, weight, stats, gz_buffer, workspace, grad_weight, grad_bias,
                arrival_counters(x.device, reduction.channel_blocks),
                plan.channels, plan.hw, plan.count, reduction.num_tiles, reduction.num_splits, phase.slot, buffer_size,
                eps, CHANNELS_LAST=plan.channels_last, USE_BATCH_STATISTICS=phase.use_batch_statistics,
                BLOCK_R=reduction.block_r, BLOCK_C=reduction.block_c, BLOCK_S=reduction.block_s,
                BLOCK_RING=ring_block(buffer_size, reduction.block_c),
            )
            grad_x = None
            if ctx.needs_input_grad[0]:
                # STATS_ALPHA and GRADS_X_COEF are row 0 of their workspaces: both pass whole
                grad_x = launch_channel_affine(grad_out, stats, None, b=x, scale_b=workspace,
                                               channels_last=plan.channels_last, plan=plan.affine)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None
