"""MABN's training step on Triton kernels: an autograd Function with four launches per step.

Same math and state semantics as the public-operation `MABNFunction` (see the algorithm spec):
the forward is one reduction whose epilogue updates the ring buffer and running_var, then one
normalizing pass; the backward is one reduction whose epilogue updates the Psi ring buffer,
then one pass for dx. Phase and hyper-parameters come from the host (`MABNPhase`), nothing is
read back from the device, and only x (plus [4, C] per-channel numbers) is saved for backward.
Launch shapes are computed once per tensor shape and cached, to keep the per-call Python short.
"""
import dataclasses
import functools
from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from .functional import MABNPhase

__all__ = [
    "LaunchTuning", "TUNING", "TritonMABNFunction", "triton_mabn_unsupported_reason",
    "reduction_plan", "elementwise_plan",
]

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension


@dataclasses.dataclass(frozen=True)
class LaunchTuning:
    """Block-size knobs (elements per program tile, programs per SM for reductions)."""

    reduce_tile: int = 2048
    elementwise_tile: int = 2048
    programs_per_sm: int = 8
    max_channel_block: int = 64  # channels per program in channels_last reductions
    num_warps: int = 4


TUNING = LaunchTuning()


@dataclasses.dataclass(frozen=True)
class ReductionPlan:
    block_r: int  # rows (channels_last) or H*W positions (NCHW) per tile
    block_c: int  # channels per program
    channel_blocks: int
    num_tiles: int  # tiles per channel block
    num_splits: int  # programs per channel block

    @property
    def grid(self) -> Tuple[int, int]:
        return (self.channel_blocks, self.num_splits)


@dataclasses.dataclass(frozen=True)
class ElementwisePlan:
    rows: int
    row_len: int
    block_m: int
    block_k: int

    @property
    def grid(self) -> Tuple[int, int]:
        return (_cdiv(self.rows, self.block_m), _cdiv(self.row_len, self.block_k))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=512)
def reduction_plan(
    n: int, c: int, hw: int, channels_last: bool, sm_count: int, tuning: LaunchTuning
) -> ReductionPlan:
    """Tiles of about `reduce_tile` elements, channel blocks split to fill the GPU."""
    if channels_last:
        block_c = min(_next_power_of_2(c), tuning.max_channel_block)
        block_r = max(1, min(tuning.reduce_tile // block_c, _next_power_of_2(n * hw)))
        num_tiles = _cdiv(n * hw, block_r)
    else:
        block_r = min(_next_power_of_2(hw), tuning.reduce_tile)
        block_c = max(1, min(tuning.reduce_tile // block_r, _next_power_of_2(c)))
        num_tiles = n * _cdiv(hw, block_r)
    channel_blocks = _cdiv(c, block_c)
    wanted = _cdiv(tuning.programs_per_sm * sm_count, channel_blocks)
    num_splits = max(1, min(wanted, num_tiles, MAX_GRID_Y))
    return ReductionPlan(block_r, block_c, channel_blocks, num_tiles, num_splits)


@functools.lru_cache(maxsize=512)
def elementwise_plan(n: int, c: int, hw: int, channels_last: bool, tuning: LaunchTuning) -> ElementwisePlan:
    """The tensor as a [rows, row_len] matrix, tiles of about `elementwise_tile` elements."""
    rows, row_len = (n * hw, c) if channels_last else (n * c, hw)
    block_k = min(_next_power_of_2(row_len), tuning.elementwise_tile)
    block_m = max(1, min(tuning.elementwise_tile // block_k, _next_power_of_2(rows)))
    return ElementwisePlan(rows, row_len, block_m, block_k)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # Triton's CPU interpreter


_counters_cache = {}


def _arrival_counters(device: torch.device, size: int) -> torch.Tensor:
    """Zeroed int32 counters, one per channel block; every reduction leaves them zeroed.

    One set per (device, stream): launches on one stream run in order, so they never overlap.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    counters = _counters_cache.get(key)
    if counters is None or counters.numel() < size:
        counters = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
        _counters_cache[key] = counters
    return counters


@functools.lru_cache(maxsize=None)
def _kernels():
    """The kernel module, imported on first use (see its docstring)."""
    from . import triton_kernels

    return triton_kernels


def _is_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def triton_mabn_unsupported_reason(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_var: torch.Tensor,
    x2_buffer: torch.Tensor, gz_buffer: torch.Tensor,
) -> Optional[str]:
    """None when the Triton kernels can run this step, else why not (for error messages)."""
    if x.dim() != 4:
        return f"expects a 4-D input, got {x.dim()}-D"
    if x.numel() == 0:
        return "empty input (the module answers it in eval form)"
    state_dtype = running_var.dtype
    if state_dtype not in (torch.float32, torch.float64):
        return f"state dtype {state_dtype} (float32 or float64 needed)"
    if state_dtype == torch.float32 and x.dtype not in ACTIVATION_DTYPES:
        return f"input dtype {x.dtype} with float32 state"
    if state_dtype == torch.float64 and x.dtype != torch.float64:
        return f"input dtype {x.dtype} with float64 state"
    for name, t in (("weight", weight), ("bias", bias), ("x2_buffer", x2_buffer), ("gz_buffer", gz_buffer)):
        if t is None or t.dtype != state_dtype or not t.is_contiguous() or t.device != x.device:
            return f"{name} must be a contiguous {state_dtype} tensor on {x.device}"
    if not running_var.is_contiguous() or running_var.device != x.device:
        return f"running_var must be contiguous on {x.device}"
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return "input is neither contiguous NCHW nor channels_last"
    n, c, h, w = x.shape
    plan = elementwise_plan(n, c, h * w, _is_channels_last(x), TUNING)
    if plan.grid[1] > MAX_GRID_Y or plan.grid[0] >= 2**31 or plan.rows >= 2**31:
        return f"shape {tuple(x.shape)} exceeds the launch grid"
    return None


def _launch_channel_affine(
    a: torch.Tensor, scale_a: torch.Tensor, shift: Optional[torch.Tensor],
    b: Optional[torch.Tensor] = None, scale_b: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    out = torch.empty_like(a, dtype=a.dtype if b is None else b.dtype)
    n, c, h, w = a.shape
    channels_last = _is_channels_last(a)
    plan = elementwise_plan(n, c, h * w, channels_last, TUNING)
    _kernels().channel_affine_kernel[plan.grid](
        a, b if b is not None else a, scale_a, scale_b if scale_b is not None else scale_a,
        shift if shift is not None else scale_a, out, plan.rows, plan.row_len, c,
        HAS_B=b is not None, HAS_SHIFT=shift is not None, CHANNELS_LAST=channels_last,
        BLOCK_M=plan.block_m, BLOCK_K=plan.block_k, num_warps=TUNING.num_warps,
    )
    return out


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
        momentum: float,
        eps: float,
        renorm_clip: float,
    ) -> torch.Tensor:
        if x.numel() == 0:
            raise ValueError("TritonMABNFunction needs a non-empty batch (MABN2d answers an empty one in eval form)")
        kernels = _kernels()
        n, c, h, w = x.shape
        channels_last = _is_channels_last(x)
        plan = reduction_plan(n, c, h * w, channels_last, _sm_count(x.device), TUNING)
        state_dtype = running_var.dtype
        partials = torch.empty((plan.num_splits, c), dtype=state_dtype, device=x.device)
        stats = torch.empty((kernels.STATS_ROWS, c), dtype=state_dtype, device=x.device)
        kernels.forward_statistics_kernel[plan.grid](
            x, weight, running_var, x2_buffer, partials, _arrival_counters(x.device, plan.channel_blocks), stats,
            c, h * w, n * h * w, plan.num_tiles, plan.num_splits, phase.slot, x2_buffer.shape[0],
            momentum, 1.0 - momentum, eps, 1.0 / renorm_clip, renorm_clip,
            CHANNELS_LAST=channels_last, USE_BATCH_STATISTICS=phase.use_batch_statistics,
            RENORMALIZE=phase.renormalize, BLOCK_R=plan.block_r, BLOCK_C=plan.block_c,
            num_warps=TUNING.num_warps,
        )
        y = _launch_channel_affine(x, stats[kernels.STATS_ALPHA], bias)
        ctx.save_for_backward(x, weight, stats)
        ctx.gz_buffer = gz_buffer
        ctx.phase = phase
        ctx.eps = eps
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        kernels = _kernels()
        x, weight, stats = ctx.saved_tensors
        phase: MABNPhase = ctx.phase
        gz_buffer: torch.Tensor = ctx.gz_buffer
        if grad_out.stride() != x.stride():
            grad_out = grad_out.contiguous(memory_format=torch.channels_last if _is_channels_last(x) else torch.contiguous_format)
        n, c, h, w = x.shape
        channels_last = _is_channels_last(x)
        plan = reduction_plan(n, c, h * w, channels_last, _sm_count(x.device), TUNING)
        partials = torch.empty((2, plan.num_splits, c), dtype=stats.dtype, device=x.device)
        grads = torch.empty((kernels.GRADS_ROWS, c), dtype=stats.dtype, device=x.device)
        kernels.backward_statistics_kernel[plan.grid](
            grad_out, x, weight, stats, gz_buffer, partials, _arrival_counters(x.device, plan.channel_blocks), grads,
            c, h * w, n * h * w, plan.num_tiles, plan.num_splits, phase.slot, gz_buffer.shape[0], ctx.eps,
            CHANNELS_LAST=channels_last, USE_BATCH_STATISTICS=phase.use_batch_statistics,
            BLOCK_R=plan.block_r, BLOCK_C=plan.block_c, num_warps=TUNING.num_warps,
        )
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _launch_channel_affine(
                grad_out, stats[kernels.STATS_ALPHA], None, b=x, scale_b=grads[kernels.GRADS_X_COEF]
            )
        return grad_x, grads[kernels.GRADS_WEIGHT], grads[kernels.GRADS_BIAS], None, None, None, None, None, None, None
