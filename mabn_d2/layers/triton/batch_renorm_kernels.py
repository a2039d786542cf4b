"""Triton kernels of Batch Renormalization's training step: two launches forward, two backward.

They share MABN's reduction and affine blocks (triton/common.py) and differ in the epilogues.
Forward: sums of (x - running_mean) and its square per channel (shifted for accuracy), then
mean, variance, r and d clipped, running statistics updated (a non-finite channel keeps both),
and the output affine. Backward (r and d constants): sums of dy*(x - mean) and dy, then the
coefficients of dx = dy*scale + x*coef + offset and the weight and bias gradients.
"""
import triton
import triton.language as tl

from .common import arrive_last, clip, exact_div, exact_sqrt, partial_channel_sums, total_of_partials

__all__ = ["forward_statistics_kernel", "backward_statistics_kernel", "SIZE_ARGS"]

# Integers that change with the batch (image size, ROI count, ring slot): Triton would otherwise
# specialize on them (== 1, divisible by 16) and compile a new variant mid-training.
SIZE_ARGS = ["HW", "count", "num_tiles", "num_splits"]

# Rows of the per-channel tensor the forward hands to the backward ([STATS_ROWS, C]).
STATS_SCALE, STATS_SHIFT, STATS_MEAN, STATS_INVSTD, STATS_R, STATS_D, STATS_ROWS = 0, 1, 2, 3, 4, 5, 6
# Rows of the backward's per-channel results ([GRADS_ROWS, C]).
GRADS_WEIGHT, GRADS_BIAS, GRADS_X_COEF, GRADS_OFFSET, GRADS_ROWS = 0, 1, 2, 3, 4


@triton.jit
def _lerp(start, end, weight, one_minus_weight, FROM_END: tl.constexpr):
    """torch.lerp's formula (which end it starts from depends on the weight)."""
    if FROM_END:
        return end - (end - start) * one_minus_weight
    else:
        return start + weight * (end - start)


@triton.jit(do_not_specialize=SIZE_ARGS)
def forward_statistics_kernel(
    x_ptr, weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr, partials_ptr, counters_ptr, stats_ptr,
    C, HW, count, num_tiles, num_splits,
    momentum: tl.float64, one_minus_momentum: tl.float64, unbias: tl.float64, eps: tl.float64,
    r_low: tl.float64, r_high: tl.float64, d_max: tl.float64,
    LERP_FROM_END: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Batch mean and variance per channel, then r, d, the running-statistics update and the
    output affine (stats: scale, shift, mean, 1/std, r, d). Grid (channel blocks, splits);
    partials is [2, num_splits, C]."""
    acc_dtype: tl.constexpr = running_var_ptr.dtype.element_ty
    pid_c = tl.program_id(0)
    pid_split = tl.program_id(1)
    c_offs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    running_mean = tl.load(running_mean_ptr + c_offs, mask=c_mask, other=0.0)
    sum_sq, sum_ = partial_channel_sums(
        x_ptr, x_ptr, running_mean, c_offs, pid_split, num_splits, num_tiles, C, HW, count, acc_dtype,
        True, True, CHANNELS_LAST, BLOCK_R, BLOCK_C,
    )
    second_half = num_splits * C
    tl.store(partials_ptr + pid_split * C + c_offs, sum_sq, mask=c_mask)
    tl.store(partials_ptr + second_half + pid_split * C + c_offs, sum_, mask=c_mask)
    if arrive_last(counters_ptr, pid_c, num_splits):
        n = tl.full([], count, acc_dtype)
        total_sq = total_of_partials(partials_ptr, c_offs, c_mask, num_splits, C, acc_dtype, BLOCK_C, BLOCK_S)
        total = total_of_partials(partials_ptr + second_half, c_offs, c_mask, num_splits, C, acc_dtype, BLOCK_C, BLOCK_S)
        shifted_mean = exact_div(total, n)
        mean_sq = exact_div(total_sq, n)
        mean = running_mean + shifted_mean
        var = tl.maximum(mean_sq - shifted_mean * shifted_mean, 0.0, propagate_nan=tl.PropagateNan.ALL)
        eps_ = tl.full([], eps, acc_dtype)
        std = exact_sqrt(var + eps_)
        running_var = tl.load(running_var_ptr + c_offs, mask=c_mask, other=1.0)
        std_run = exact_sqrt(running_var + eps_)
        r = clip(exact_div(std, std_run), tl.full([], r_low, acc_dtype), tl.full([], r_high, acc_dtype))
        d_limit = tl.full([], d_max, acc_dtype)
        d = clip(exact_div(mean - running_mean, std_run), -d_limit, d_limit)
        weight_ = tl.full([], momentum, acc_dtype)
        rest = tl.full([], one_minus_momentum, acc_dtype)
        new_mean = _lerp(running_mean, mean, weight_, rest, LERP_FROM_END)
        new_var = _lerp(running_var, var * tl.full([], unbias, acc_dtype), weight_, rest, LERP_FROM_END)
        finite = (tl.abs(new_mean) < float("inf")) & (tl.abs(new_var) < float("inf"))
        tl.store(running_mean_ptr + c_offs, tl.where(finite, new_mean, running_mean), mask=c_mask)
        tl.store(running_var_ptr + c_offs, tl.where(finite, new_var, running_var), mask=c_mask)
        weight = tl.load(weight_ptr + c_offs, mask=c_mask, other=0.0)
        bias = tl.load(bias_ptr + c_offs, mask=c_mask, other=0.0)
        tl.store(stats_ptr + 0 * C + c_offs, exact_div(weight * r, std), mask=c_mask)  # STATS_SCALE
        tl.store(stats_ptr + 1 * C + c_offs, bias + weight * (d - exact_div(r * mean, std)), mask=c_mask)  # STATS_SHIFT
        tl.store(stats_ptr + 2 * C + c_offs, mean, mask=c_mask)  # STATS_MEAN
        tl.store(stats_ptr + 3 * C + c_offs, exact_div(tl.zeros_like(std) + 1.0, std), mask=c_mask)  # STATS_INVSTD
        tl.store(stats_ptr + 4 * C + c_offs, r, mask=c_mask)  # STATS_R
        tl.store(stats_ptr + 5 * C + c_offs, d, mask=c_mask)  # STATS_D
        tl.store(counters_ptr + pid_c, 0)  # ready for the next launch


@triton.jit(do_not_specialize=SIZE_ARGS)
def backward_statistics_kernel(
    grad_ptr, x_ptr, stats_ptr, partials_ptr, counters_ptr, grads_ptr, C, HW, count, num_tiles, num_splits,
    CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """sum(dy*(x - mean)) and sum(dy) per channel, then dweight, dbias and the coefficients of
    dx = dy*scale + x*coef + offset (BN's gradient with weight*r; r, d constants)."""
    acc_dtype: tl.constexpr = stats_ptr.dtype.element_ty
    pid_c = tl.program_id(0)
    pid_split = tl.program_id(1)
    c_offs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    mean = tl.load(stats_ptr + 2 * C + c_offs, mask=c_mask, other=0.0)  # STATS_MEAN
    sum_dy_xc, sum_dy = partial_channel_sums(
        grad_ptr, x_ptr, mean, c_offs, pid_split, num_splits, num_tiles, C, HW, count, acc_dtype,
        False, True, CHANNELS_LAST, BLOCK_R, BLOCK_C,
    )
    second_half = num_splits * C
    tl.store(partials_ptr + pid_split * C + c_offs, sum_dy_xc, mask=c_mask)
    tl.store(partials_ptr + second_half + pid_split * C + c_offs, sum_dy, mask=c_mask)
    if arrive_last(counters_ptr, pid_c, num_splits):
        total_dy_xc = total_of_partials(partials_ptr, c_offs, c_mask, num_splits, C, acc_dtype, BLOCK_C, BLOCK_S)
        total_dy = total_of_partials(
            partials_ptr + second_half, c_offs, c_mask, num_splits, C, acc_dtype, BLOCK_C, BLOCK_S
        )
        scale = tl.load(stats_ptr + 0 * C + c_offs, mask=c_mask, other=0.0)  # STATS_SCALE
        invstd = tl.load(stats_ptr + 3 * C + c_offs, mask=c_mask, other=0.0)  # STATS_INVSTD
        r = tl.load(stats_ptr + 4 * C + c_offs, mask=c_mask, other=1.0)  # STATS_R
        d = tl.load(stats_ptr + 5 * C + c_offs, mask=c_mask, other=0.0)  # STATS_D
        n = tl.full([], count, acc_dtype)
        sum_dy_xhat = total_dy_xc * invstd
        coefficient = -exact_div(scale * invstd * sum_dy_xhat, n)
        offset = -exact_div(scale * total_dy, n) - coefficient * mean
        tl.store(grads_ptr + 0 * C + c_offs, r * sum_dy_xhat + d * total_dy, mask=c_mask)  # GRADS_WEIGHT
        tl.store(grads_ptr + 1 * C + c_offs, total_dy, mask=c_mask)  # GRADS_BIAS
        tl.store(grads_ptr + 2 * C + c_offs, coefficient, mask=c_mask)  # GRADS_X_COEF
        tl.store(grads_ptr + 3 * C + c_offs, offset, mask=c_mask)  # GRADS_OFFSET
        tl.store(counters_ptr + pid_c, 0)  # ready for the next launch
