"""MABN's training step on Triton kernels: an autograd Function with four launches per step.

Same math and state semantics as the public-operation `MABNFunction` (see the algorithm spec):
the forward is one reduction whose epilogue updates the ring buffer and running_var, then one
normalizing pass; the backward is one reduction whose epilogue updates the Psi ring buffer,
then one pass for dx. Phase and hyper-parameters come from the host (`MABNPhase`), nothing is
read back from the device, and only x (plus [4, C] per-channel numbers) is saved for backward.
The statistics kernels also count a step whose chi2_B or Psi_B was not finite in the layer's
`nonfinite_skipped` record, with atomics, as `MABNFunction` does with tensor operations.
"""
from typing import Dict, NamedTuple, Optional, Tuple

import torch

from ..base import MABNPhase
from ..nonfinite import new_nonfinite_record
from .launch import (
    StepPlan, arrival_counters, kernel_module, launch_channel_affine, launch_guard, launch_reduction, matching_layout,
    once_differentiable_when_graphed, ring_block, step_plan, stream_scratch, unsupported_input_reason,
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


class MABNLaunchConstants(NamedTuple):
    """What MABN's launches need beyond the StepPlan, per (geometry, ring size, phase flags)."""

    stats_shape: Tuple[int, int]  # the forward's workspace
    grads_numel: int  # the backward's workspace, [GRADS_ROWS + 2 * splits, C] read from a stream scratch
    forward_blocks: Dict[str, object]  # the forward reduction's constexprs
    backward_blocks: Dict[str, object]


def _launch_constants(plan: StepPlan, buffer_size: int, use_batch_statistics: bool, renormalize: bool
                      ) -> MABNLaunchConstants:
    kernels = kernel_module("mabn_kernels")
    reduction = plan.reduction
    blocks = dict(plan.reduction_blocks, USE_BATCH_STATISTICS=use_batch_statistics,
                  BLOCK_RING=ring_block(buffer_size, reduction.block_c))
    return MABNLaunchConstants(
        (kernels.STATS_ROWS + reduction.num_splits, plan.channels),
        (kernels.GRADS_ROWS + 2 * reduction.num_splits) * plan.channels,
        dict(blocks, RENORMALIZE=renormalize), blocks,
    )


class TritonMABNFunction(torch.autograd.Function):
    """One MABN training step on Triton kernels. Updates the layer state in place.

    Host work per step is kept to what the step needs: launch sizes and constants come ready-made
    from the cached `StepPlan` (looked up once, in the forward); the forward allocates one
    workspace (results, then partial sums) and passes it whole, the backward reads it (a few [C]
    rows plus its partial sums, saved instead of a view of it) and works in its stream's reused
    scratch; the weight and bias gradients are tensors of their own.
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
        nonfinite: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if x.numel() == 0:
            raise ValueError("TritonMABNFunction needs a non-empty batch (MABN2d answers an empty one in eval form)")
        plan = step_plan(x)
        buffer_size = phase.buffer_size  # the layer's buffer_size, carried by the phase
        key = ("MABN", buffer_size, phase.use_batch_statistics, phase.renormalize)
        constants: MABNLaunchConstants = plan.launch_constants.get(key)
        if constants is None:
            constants = plan.launch_constants[key] = _launch_constants(
                plan, buffer_size, phase.use_batch_statistics, phase.renormalize)
        device = x.device
        if nonfinite is None:  # the kernels always count; a caller without a record gets a throwaway one
            nonfinite = new_nonfinite_record(device)
        with launch_guard(device):
            stats = running_var.new_empty(constants.stats_shape)
            launch_reduction(kernel_module("mabn_kernels").forward_statistics_kernel, plan.reduction.grid, device,
                "MABN2d forward", (x, weight, running_var, x2_buffer, stats,
                arrival_counters(device, plan.reduction.channel_blocks), nonfinite, *plan.reduction_sizes,
                phase.slot, buffer_size, phase.iteration, ema_decay, 1.0 - ema_decay, eps, 1.0 / renorm_clip, renorm_clip),
                constants.forward_blocks,
            )
            # alpha is the workspace's row 0 (STATS_ALPHA): the workspace is the scale
            y = launch_channel_affine(plan, x, stats, bias)
        ctx.save_for_backward(x, weight, stats)
        ctx.backward_args = (gz_buffer, nonfinite, phase.slot, phase.iteration, eps, plan, constants, buffer_size)
        return y

    @staticmethod
    @once_differentiable_when_graphed
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, weight, stats = ctx.saved_tensors
        gz_buffer, nonfinite, slot, iteration, eps, plan, constants, buffer_size = ctx.backward_args
        grad_out = matching_layout(grad_out, x)
        device = x.device
        with launch_guard(device):
            workspace = stream_scratch(device, stats.dtype, constants.grads_numel)
            grad_weight, grad_bias = torch.empty_like(weight), torch.empty_like(weight)
            launch_reduction(kernel_module("mabn_kernels").backward_statistics_kernel, plan.reduction.grid, device,
                "MABN2d backward", (grad_out, x, weight, stats, gz_buffer, workspace, grad_weight, grad_bias,
                arrival_counters(device, plan.reduction.channel_blocks), nonfinite, *plan.reduction_sizes, slot,
                buffer_size, iteration, eps), constants.backward_blocks,
            )
            grad_x = None
            if ctx.needs_input_grad[0]:
                # STATS_ALPHA and GRADS_X_COEF are row 0 of their workspaces: both pass whole
                grad_x = launch_channel_affine(plan, grad_out, stats, None, b=x, scale_b=workspace)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None, None
