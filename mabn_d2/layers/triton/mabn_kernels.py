"""Triton kernels of MABN's training step: two launches forward, two backward.

Forward: `forward_statistics_kernel` reduces sum(x^2) per channel and, in the program that
finishes a channel block last, runs MABN's per-channel statistics (ring-buffer write, SMA,
re-normalization factor and clip, EMA update, non-finite guard and count); `channel_affine_kernel`
(triton/common.py) then normalizes. Backward: `backward_statistics_kernel` reduces sum(dy*x) and
sum(dy) with the Psi epilogue (ring buffer and its SMA, weight and bias gradients);
`channel_affine_kernel` forms dx. Layouts, split reductions and accumulation: triton/common.py.
"""
import triton
import triton.language as tl

from .common import arrive_last, clip, exact_div, exact_sqrt, keep_finite, partial_channel_sums, total_of_partials

__all__ = ["forward_statistics_kernel", "backward_statistics_kernel", "SIZE_ARGS"]

# Integers that change with the batch (image size, ROI count, ring slot, iteration): Triton would
# otherwise specialize on them (== 1, divisible by 16) and compile a new variant mid-training.
SIZE_ARGS = ["HW", "count", "num_tiles", "num_splits", "slot", "iteration"]

# Each launch writes one workspace: its per-channel results first, then its per-program partial
# sums (one allocation per launch, no views on the host). Rows of the forward's results, which
# the backward reads ([STATS_ROWS, C]); alpha first, so the workspace itself is the affine's scale.
STATS_ALPHA, STATS_INVSTD, STATS_R, STATS_CHI2, STATS_ROWS = 0, 1, 2, 3, 4
# The backward's workspace: dx's coefficient of x (row 0, passed whole to the affine for the same
# reason), then its partial sums; dweight and dbias go to tensors of their own (the gradients).
GRADS_X_COEF, GRADS_ROWS = 0, 1


@triton.jit
def _count_nonfinite(nonfinite_ptr, batch_value, c_mask, iteration):
    """Counts this step once in nonfinite_ptr[0] when a channel of `batch_value` is not finite.

    nonfinite_ptr[1] holds the latest iteration counted (the record of `layers/nonfinite.py`): the
    first channel block to raise it to `iteration` adds the 1, so the other blocks of this launch
    and the other pass of the same step add nothing.
    """
    bad = tl.sum((c_mask & ~(tl.abs(batch_value) < float("inf"))).to(tl.int32), axis=0) > 0
    step = tl.full([], iteration, tl.int64)
    previous = tl.atomic_max(nonfinite_ptr + 1, step, mask=bad)
    tl.atomic_add(nonfinite_ptr, tl.full([], 1, tl.int64), mask=bad & (previous < step))


@triton.jit
def _ring_buffer_statistic(
    buffer_ptr, batch_value, c_offs, c_mask, slot, buffer_size, C,
    USE_BATCH_STATISTICS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_RING: tl.constexpr,
):
    """Writes the batch statistic into ring-buffer row `slot` (non-finite entries keep the
    old value) and returns the statistic in use: the batch value early, the buffer mean later."""
    row_ptr = buffer_ptr + slot * C + c_offs
    kept = keep_finite(batch_value, tl.load(row_ptr, mask=c_mask, other=0.0))
    tl.store(row_ptr, kept, mask=c_mask)
    statistic = batch_value
    if not USE_BATCH_STATISTICS:
        total = tl.zeros([BLOCK_RING, BLOCK_C], dtype=batch_value.dtype)
        for start in range(0, buffer_size, BLOCK_RING):
            row = start + tl.arange(0, BLOCK_RING)
            mask = (row < buffer_size)[:, None] & c_mask[None, :]
            stored = tl.load(buffer_ptr + row[:, None] * C + c_offs[None, :], mask=mask, other=0.0)
            # Row `slot` as just written by this program (another thread may hold it).
            total += tl.where((row == slot)[:, None], kept[None, :], stored)
        statistic = exact_div(tl.sum(total, axis=0), tl.full([], buffer_size, batch_value.dtype))
    return statistic


@triton.jit(do_not_specialize=SIZE_ARGS)
def forward_statistics_kernel(
    x_ptr, weight_ptr, running_var_ptr, x2_buffer_ptr, workspace_ptr, counters_ptr, nonfinite_ptr,
    C, HW, count, num_tiles, num_splits, slot, buffer_size, iteration,
    ema_decay: tl.float64, one_minus_ema_decay: tl.float64, eps: tl.float64,
    clip_low: tl.float64, clip_high: tl.float64,
    CHANNELS_LAST: tl.constexpr, USE_BATCH_STATISTICS: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_RING: tl.constexpr,
):
    """chi2_B = mean(x^2) per channel, then MABN's forward statistics in the epilogue.

    Grid (channel blocks, splits); workspace is [STATS_ROWS + num_splits, C]. Updates
    x2_buffer[slot], running_var and the non-finite record (int64 [2]) in place and writes the workspace's first STATS_ROWS rows:
    alpha = weight*r/sqrt(chi2+eps), 1/sqrt(chi2+eps), r, chi2.
    """
    stats_ptr = workspace_ptr
    partials_ptr = workspace_ptr + 4 * C  # after the STATS_ROWS rows
    acc_dtype: tl.constexpr = running_var_ptr.dtype.element_ty
    pid_c = tl.program_id(0)
    pid_split = tl.program_id(1)
    c_offs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    sum_sq, _ = partial_channel_sums(
        x_ptr, x_ptr, 0.0, c_offs, pid_split, num_splits, num_tiles, C, HW, count, acc_dtype,
        True, False, CHANNELS_LAST, BLOCK_R, BLOCK_C,
    )
    tl.store(partials_ptr + pid_split * C + c_offs, sum_sq, mask=c_mask)
    if arrive_last(counters_ptr, pid_c, num_splits):
        total = total_of_partials(partials_ptr, c_offs, c_mask, num_splits, C, acc_dtype, BLOCK_C, BLOCK_S)
        chi2_batch = exact_div(total, tl.full([], count, acc_dtype))
        _count_nonfinite(nonfinite_ptr, chi2_batch, c_mask, iteration)
        chi2 = _ring_buffer_statistic(
            x2_buffer_ptr, chi2_batch, c_offs, c_mask, slot, buffer_size, C, USE_BATCH_STATISTICS, BLOCK_C, BLOCK_RING,
        )
        eps_ = tl.full([], eps, acc_dtype)
        std = exact_sqrt(chi2 + eps_)
        running_var = tl.load(running_var_ptr + c_offs, mask=c_mask, other=1.0)
        r = tl.zeros_like(chi2) + 1.0
        if RENORMALIZE:
            ratio = exact_div(std, exact_sqrt(running_var + eps_))
            r = clip(ratio, tl.full([], clip_low, acc_dtype), tl.full([], clip_high, acc_dtype))
        updated = (running_var * tl.full([], ema_decay, acc_dtype)
                   + chi2 * tl.full([], one_minus_ema_decay, acc_dtype))
        tl.store(running_var_ptr + c_offs, keep_finite(updated, running_var), mask=c_mask)
        invstd = exact_div(tl.zeros_like(std) + 1.0, std)
        weight = tl.load(weight_ptr + c_offs, mask=c_mask, other=0.0)
        tl.store(stats_ptr + 0 * C + c_offs, weight * r * invstd, mask=c_mask)  # STATS_ALPHA
        tl.store(stats_ptr + 1 * C + c_offs, invstd, mask=c_mask)  # STATS_INVSTD
        tl.store(stats_ptr + 2 * C + c_offs, r, mask=c_mask)  # STATS_R
        tl.store(stats_ptr + 3 * C + c_offs, chi2, mask=c_mask)  # STATS_CHI2
        tl.store(counters_ptr + pid_c, 0)  # ready for the next launch


@triton.jit(do_not_specialize=SIZE_ARGS)
def backward_statistics_kernel(
    grad_ptr, x_ptr, weight_ptr, stats_ptr, gz_buffer_ptr, workspace_ptr, grad_weight_ptr, grad_bias_ptr,
    counters_ptr, nonfinite_ptr,
    C, HW, count, num_tiles, num_splits, slot, buffer_size, iteration, eps: tl.float64,
    CHANNELS_LAST: tl.constexpr, USE_BATCH_STATISTICS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_RING: tl.constexpr,
):
    """sum(dy*x) and sum(dy) per channel, then Psi_B, its ring buffer and SMA in the epilogue.

    Grid (channel blocks, splits); workspace is [GRADS_ROWS + 2 * num_splits, C]. Updates
    gz_buffer[slot] and the non-finite record, writes the coefficient of x in dx into the workspace's row 0
    (dx = dy * alpha + x * coefficient, coefficient = -Psi/(chi2+eps)), and dweight, dbias.
    """
    partials_ptr = workspace_ptr + 1 * C  # after the GRADS_ROWS row
    acc_dtype: tl.constexpr = stats_ptr.dtype.element_ty
    pid_c = tl.program_id(0)
    pid_split = tl.program_id(1)
    c_offs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    sum_dy_x, sum_dy = partial_channel_sums(
        grad_ptr, x_ptr, 0.0, c_offs, pid_split, num_splits, num_tiles, C, HW, count, acc_dtype,
        False, False, CHANNELS_LAST, BLOCK_R, BLOCK_C,
    )
    second_half = num_splits * C
    tl.store(partials_ptr + pid_split * C + c_offs, sum_dy_x, mask=c_mask)
    tl.store(partials_ptr + second_half + pid_split * C + c_offs, sum_dy, mask=c_mask)
    if arrive_last(counters_ptr, pid_c, num_splits):
        total_dy_x = total_of_partials(partials_ptr, c_offs, c_mask, num_splits, C, acc_dtype, BLOCK_C, BLOCK_S)
        total_dy = total_of_partials(
            partials_ptr + second_half, c_offs, c_mask, num_splits, C, acc_dtype, BLOCK_C, BLOCK_S
        )
        invstd = tl.load(stats_ptr + 1 * C + c_offs, mask=c_mask, other=0.0)  # STATS_INVSTD
        r = tl.load(stats_ptr + 2 * C + c_offs, mask=c_mask, other=1.0)  # STATS_R
        chi2 = tl.load(stats_ptr + 3 * C + c_offs, mask=c_mask, other=1.0)  # STATS_CHI2
        weight = tl.load(weight_ptr + c_offs, mask=c_mask, other=0.0)
        sum_dy_z = total_dy_x * invstd
        psi_batch = exact_div(weight * r * sum_dy_z, tl.full([], count, acc_dtype))
        _count_nonfinite(nonfinite_ptr, psi_batch, c_mask, iteration)
        psi = _ring_buffer_statistic(
            gz_buffer_ptr, psi_batch, c_offs, c_mask, slot, buffer_size, C, USE_BATCH_STATISTICS, BLOCK_C, BLOCK_RING,
        )
        coefficient = -exact_div(psi, chi2 + tl.full([], eps, acc_dtype))
        tl.store(workspace_ptr + c_offs, coefficient, mask=c_mask)  # GRADS_X_COEF
        tl.store(grad_weight_ptr + c_offs, sum_dy_z * r, mask=c_mask)
        tl.store(grad_bias_ptr + c_offs, total_dy, mask=c_mask)
        tl.store(counters_ptr + pid_c, 0)  # ready for the next launch
