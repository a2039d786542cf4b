"""Triton kernels of MABN's training step: two launches forward, two backward.

Forward: `forward_statistics_kernel` reduces sum(x^2) per channel and, in the program that
finishes a channel block last, runs MABN's per-channel statistics (ring-buffer write, SMA,
re-normalization factor and clip, EMA update, non-finite guard); `channel_affine_kernel` then
normalizes. Backward: `backward_statistics_kernel` reduces sum(dy*x) and sum(dy) with the Psi
epilogue (ring buffer and its SMA, weight and bias gradients); `channel_affine_kernel` forms dx.

Layouts: a contiguous NCHW tensor is read as N*C rows of H*W, a channels_last one as N*H*W
rows of C, so both are coalesced. A reduction splits every channel block over several
programs for parallelism; each writes its partial sums to a workspace and bumps the block's
arrival counter, and the last arrival sums the partials in a fixed order (deterministic) and
resets the counter for the next launch. Sums accumulate in the state dtype (float32, or
float64 for float64 models) whatever the activation dtype. Imported only when the Triton path
runs, so that TRITON_INTERPRET is read when the kernels are defined.
"""
import triton
import triton.language as tl

__all__ = ["forward_statistics_kernel", "backward_statistics_kernel", "channel_affine_kernel"]

# Rows of the per-channel tensor the forward hands to the backward ([STATS_ROWS, C]).
STATS_ALPHA, STATS_INVSTD, STATS_R, STATS_CHI2, STATS_ROWS = 0, 1, 2, 3, 4
# Rows of the backward's per-channel results ([GRADS_ROWS, C]).
GRADS_WEIGHT, GRADS_BIAS, GRADS_X_COEF, GRADS_ROWS = 0, 1, 2, 3


@triton.jit
def _exact_div(a, b):
    """IEEE division (Triton's `/` on float32 is an approximation on GPUs)."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def _exact_sqrt(x):
    """IEEE square root (`tl.sqrt` on float32 is an approximation on GPUs)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.math.sqrt_rn(x)


@triton.jit
def _keep_finite(new, old):
    """Per-channel guard: a non-finite statistic leaves the stored value unchanged."""
    return tl.where(tl.abs(new) < float("inf"), new, old)


@triton.jit
def _partial_channel_sums(
    a_ptr, b_ptr, c_offs, pid_split, num_splits, num_tiles, C, HW, count, acc_dtype: tl.constexpr,
    SQUARE: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """This program's share of sum(a*b) and sum(a) per channel (b is a when SQUARE).

    Tiles are taken round-robin. channels_last: tile `t` is [BLOCK_R rows of N*H*W,
    BLOCK_C channels]; NCHW: [BLOCK_C channels, BLOCK_R positions of H*W] of one image.
    Offsets are int64.
    """
    if CHANNELS_LAST:
        acc_ab = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_dtype)
    else:
        acc_ab = tl.zeros([BLOCK_C, BLOCK_R], dtype=acc_dtype)
    acc_a = tl.zeros_like(acc_ab)
    hw_tiles = tl.cdiv(HW, BLOCK_R)
    for tile in range(pid_split, num_tiles, num_splits):
        if CHANNELS_LAST:
            rows = tl.cast(tile, tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
            offs = rows[:, None] * C + c_offs[None, :]
            mask = (rows < count)[:, None] & (c_offs < C)[None, :]
        else:
            image = tile // hw_tiles
            hw = (tile % hw_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
            offs = (tl.cast(image, tl.int64) * C + c_offs[:, None]) * HW + hw[None, :]
            mask = (c_offs < C)[:, None] & (hw < HW)[None, :]
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
        if SQUARE:
            acc_ab += a * a
        else:
            acc_ab += a * tl.load(b_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
            acc_a += a
    if CHANNELS_LAST:
        return tl.sum(acc_ab, axis=0), tl.sum(acc_a, axis=0)
    else:
        return tl.sum(acc_ab, axis=1), tl.sum(acc_a, axis=1)


@triton.jit
def _arrive_last(counters_ptr, pid_c, num_splits):
    """True in the last program of a channel block to finish; partial-sum stores are visible to it."""
    tl.debug_barrier()  # every thread's partial-sum store precedes the release below
    arrivals = tl.atomic_add(counters_ptr + pid_c, 1, sem="acq_rel")
    return arrivals == num_splits - 1


@triton.jit
def _total_of_partials(partials_ptr, c_offs, c_mask, num_splits, C, acc_dtype: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sum of the per-program partials [num_splits, C], in program order (deterministic)."""
    total = tl.zeros([BLOCK_C], dtype=acc_dtype)
    for split in range(num_splits):
        # .cg reads through L2, where the other programs' stores landed.
        total += tl.load(partials_ptr + split * C + c_offs, mask=c_mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def _ring_buffer_statistic(
    buffer_ptr, batch_value, c_offs, c_mask, slot, buffer_size, C, USE_BATCH_STATISTICS: tl.constexpr
):
    """Writes the batch statistic into ring-buffer row `slot` (non-finite entries keep the
    old value) and returns the statistic in use: the batch value early, the buffer mean later."""
    row_ptr = buffer_ptr + slot * C + c_offs
    kept = _keep_finite(batch_value, tl.load(row_ptr, mask=c_mask, other=0.0))
    tl.store(row_ptr, kept, mask=c_mask)
    statistic = batch_value
    if not USE_BATCH_STATISTICS:
        total = tl.zeros_like(batch_value)
        for row in range(buffer_size):
            stored = tl.load(buffer_ptr + row * C + c_offs, mask=c_mask, other=0.0)
            total += tl.where(row == slot, kept, stored)
        statistic = _exact_div(total, tl.full([], buffer_size, batch_value.dtype))
    return statistic


@triton.jit(do_not_specialize=["slot"])
def forward_statistics_kernel(
    x_ptr, weight_ptr, running_var_ptr, x2_buffer_ptr, partials_ptr, counters_ptr, stats_ptr,
    C, HW, count, num_tiles, num_splits, slot, buffer_size,
    momentum: tl.float64, one_minus_momentum: tl.float64, eps: tl.float64,
    clip_low: tl.float64, clip_high: tl.float64,
    CHANNELS_LAST: tl.constexpr, USE_BATCH_STATISTICS: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """chi2_B = mean(x^2) per channel, then MABN's forward statistics in the epilogue.

    Grid (channel blocks, splits). Updates x2_buffer[slot] and running_var in place and writes
    stats[STATS_ROWS, C]: alpha = weight*r/sqrt(chi2+eps), 1/sqrt(chi2+eps), r, chi2.
    """
    acc_dtype: tl.constexpr = running_var_ptr.dtype.element_ty
    pid_c = tl.program_id(0)
    pid_split = tl.program_id(1)
    c_offs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    sum_sq, _ = _partial_channel_sums(
        x_ptr, x_ptr, c_offs, pid_split, num_splits, num_tiles, C, HW, count, acc_dtype,
        True, CHANNELS_LAST, BLOCK_R, BLOCK_C,
    )
    tl.store(partials_ptr + pid_split * C + c_offs, sum_sq, mask=c_mask)
    if _arrive_last(counters_ptr, pid_c, num_splits):
        total = _total_of_partials(partials_ptr, c_offs, c_mask, num_splits, C, acc_dtype, BLOCK_C)
        chi2_batch = _exact_div(total, tl.full([], count, acc_dtype))
        chi2 = _ring_buffer_statistic(
            x2_buffer_ptr, chi2_batch, c_offs, c_mask, slot, buffer_size, C, USE_BATCH_STATISTICS
        )
        eps_ = tl.full([], eps, acc_dtype)
        std = _exact_sqrt(chi2 + eps_)
        running_var = tl.load(running_var_ptr + c_offs, mask=c_mask, other=1.0)
        r = tl.zeros_like(chi2) + 1.0
        if RENORMALIZE:
            ratio = _exact_div(std, _exact_sqrt(running_var + eps_))
            r = tl.clamp(
                ratio, tl.full([], clip_low, acc_dtype), tl.full([], clip_high, acc_dtype),
                propagate_nan=tl.PropagateNan.ALL,
            )
        updated = running_var * tl.full([], momentum, acc_dtype) + chi2 * tl.full([], one_minus_momentum, acc_dtype)
        tl.store(running_var_ptr + c_offs, _keep_finite(updated, running_var), mask=c_mask)
        invstd = _exact_div(tl.zeros_like(std) + 1.0, std)
        weight = tl.load(weight_ptr + c_offs, mask=c_mask, other=0.0)
        tl.store(stats_ptr + 0 * C + c_offs, weight * r * invstd, mask=c_mask)  # STATS_ALPHA
        tl.store(stats_ptr + 1 * C + c_offs, invstd, mask=c_mask)  # STATS_INVSTD
        tl.store(stats_ptr + 2 * C + c_offs, r, mask=c_mask)  # STATS_R
        tl.store(stats_ptr + 3 * C + c_offs, chi2, mask=c_mask)  # STATS_CHI2
        tl.store(counters_ptr + pid_c, 0)  # ready for the next launch


@triton.jit(do_not_specialize=["slot"])
def backward_statistics_kernel(
    grad_ptr, x_ptr, weight_ptr, stats_ptr, gz_buffer_ptr, partials_ptr, counters_ptr, grads_ptr,
    C, HW, count, num_tiles, num_splits, slot, buffer_size, eps: tl.float64,
    CHANNELS_LAST: tl.constexpr, USE_BATCH_STATISTICS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """sum(dy*x) and sum(dy) per channel, then Psi_B, its ring buffer and SMA in the epilogue.

    Grid (channel blocks, splits); partials is [2, num_splits, C]. Updates gz_buffer[slot] and
    writes grads[GRADS_ROWS, C]: dweight, dbias and the coefficient of x in dx
    (dx = dy * alpha + x * coefficient, coefficient = -Psi/(chi2+eps)).
    """
    acc_dtype: tl.constexpr = stats_ptr.dtype.element_ty
    pid_c = tl.program_id(0)
    pid_split = tl.program_id(1)
    c_offs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    sum_dy_x, sum_dy = _partial_channel_sums(
        grad_ptr, x_ptr, c_offs, pid_split, num_splits, num_tiles, C, HW, count, acc_dtype,
        False, CHANNELS_LAST, BLOCK_R, BLOCK_C,
    )
    second_half = num_splits * C
    tl.store(partials_ptr + pid_split * C + c_offs, sum_dy_x, mask=c_mask)
    tl.store(partials_ptr + second_half + pid_split * C + c_offs, sum_dy, mask=c_mask)
    if _arrive_last(counters_ptr, pid_c, num_splits):
        total_dy_x = _total_of_partials(partials_ptr, c_offs, c_mask, num_splits, C, acc_dtype, BLOCK_C)
        total_dy = _total_of_partials(partials_ptr + second_half, c_offs, c_mask, num_splits, C, acc_dtype, BLOCK_C)
        invstd = tl.load(stats_ptr + 1 * C + c_offs, mask=c_mask, other=0.0)  # STATS_INVSTD
        r = tl.load(stats_ptr + 2 * C + c_offs, mask=c_mask, other=1.0)  # STATS_R
        chi2 = tl.load(stats_ptr + 3 * C + c_offs, mask=c_mask, other=1.0)  # STATS_CHI2
        weight = tl.load(weight_ptr + c_offs, mask=c_mask, other=0.0)
        sum_dy_z = total_dy_x * invstd
        psi_batch = _exact_div(weight * r * sum_dy_z, tl.full([], count, acc_dtype))
        psi = _ring_buffer_statistic(
            gz_buffer_ptr, psi_batch, c_offs, c_mask, slot, buffer_size, C, USE_BATCH_STATISTICS
        )
        coefficient = -_exact_div(psi, chi2 + tl.full([], eps, acc_dtype))
        tl.store(grads_ptr + 0 * C + c_offs, sum_dy_z * r, mask=c_mask)  # GRADS_WEIGHT
        tl.store(grads_ptr + 1 * C + c_offs, total_dy, mask=c_mask)  # GRADS_BIAS
        tl.store(grads_ptr + 2 * C + c_offs, coefficient, mask=c_mask)  # GRADS_X_COEF
        tl.store(counters_ptr + pid_c, 0)  # ready for the next launch


@triton.jit
def channel_affine_kernel(
    a_ptr, b_ptr, scale_a_ptr, scale_b_ptr, shift_ptr, out_ptr, rows, row_len, C,
    HAS_B: tl.constexpr, HAS_SHIFT: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out = a * scale_a[c] (+ b * scale_b[c]) (+ shift[c]), elementwise, in the state dtype.

    The tensors are read as a [rows, row_len] matrix: N*C rows of H*W (NCHW, channel = row % C)
    or N*H*W rows of C (channels_last, channel = column). Grid (row blocks, column blocks).
    """
    compute: tl.constexpr = scale_a_ptr.dtype.element_ty
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = row < rows
    col_ok = col < row_len
    mask = row_ok[:, None] & col_ok[None, :]
    offs = row.to(tl.int64)[:, None] * row_len + col[None, :]
    if CHANNELS_LAST:
        channel = col[None, :]
        channel_ok = col_ok[None, :]
    else:
        channel = (row % C)[:, None]
        channel_ok = row_ok[:, None]
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(compute)
    out = a * tl.load(scale_a_ptr + channel, mask=channel_ok, other=0.0)
    if HAS_B:
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(compute)
        out += b * tl.load(scale_b_ptr + channel, mask=channel_ok, other=0.0)
    if HAS_SHIFT:
        out += tl.load(shift_ptr + channel, mask=channel_ok, other=0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
