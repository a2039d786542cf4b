"""Triton building blocks shared by the moving-average norms' kernels.

Layouts: a contiguous NCHW tensor is read as N*C rows of H*W, a channels_last one as N*H*W
rows of C, so both are coalesced. A per-channel reduction splits every channel block over
several programs for parallelism; each writes its partial sums to a workspace and bumps the
block's arrival counter (`arrive_last`), and the last arrival sums the partials in a fixed
order (deterministic), runs the norm's epilogue and resets the counter for the next launch.
Sums accumulate in the state dtype (float32, or float64 for float64 models) whatever the
activation dtype. Imported only when a Triton path runs, so that TRITON_INTERPRET is read
when the kernels are defined.
"""
import triton
import triton.language as tl

__all__ = [
    "exact_div", "exact_sqrt", "clip", "keep_finite", "partial_channel_sums", "arrive_last", "total_of_partials",
    "channel_affine_kernel",
]


@triton.jit
def exact_div(a, b):
    """IEEE division (Triton's `/` on float32 is an approximation on GPUs)."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def exact_sqrt(x):
    """IEEE square root (`tl.sqrt` on float32 is an approximation on GPUs)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.math.sqrt_rn(x)


@triton.jit
def clip(x, low, high):
    """x clipped to [low, high], NaN kept (torch.clamp's behaviour). Written as max/min because
    tl.clamp lowers symmetric float64 bounds to a float32-only intrinsic."""
    return tl.minimum(tl.maximum(x, low, propagate_nan=tl.PropagateNan.ALL), high, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def keep_finite(new, old):
    """Per-channel guard: a non-finite statistic leaves the stored value unchanged."""
    return tl.where(tl.abs(new) < float("inf"), new, old)


@triton.jit
def partial_channel_sums(
    a_ptr, b_ptr, shift, c_offs, pid_split, num_splits, num_tiles, C, HW, count, acc_dtype: tl.constexpr,
    SQUARE: tl.constexpr, HAS_SHIFT: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """This program's share of sum(a*b) and sum(a) per channel, where b is a when SQUARE.

    With HAS_SHIFT the per-channel `shift` ([BLOCK_C]) is subtracted from x first (a when
    SQUARE, else b), which keeps variance-like sums away from cancellation. Tiles are taken
    round-robin: channels_last tile `t` is [BLOCK_R rows of N*H*W, BLOCK_C channels], NCHW
    [BLOCK_C channels, BLOCK_R positions of H*W] of one image. Offsets are int64.
    """
    if CHANNELS_LAST:
        acc_ab = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_dtype)
    else:
        acc_ab = tl.zeros([BLOCK_C, BLOCK_R], dtype=acc_dtype)
    if HAS_SHIFT:
        if CHANNELS_LAST:
            shift_tile = shift[None, :]
        else:
            shift_tile = shift[:, None]
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
            if HAS_SHIFT:
                a = tl.where(mask, a - shift_tile, 0.0)
            acc_ab += a * a
        else:
            b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
            if HAS_SHIFT:
                b = tl.where(mask, b - shift_tile, 0.0)
            acc_ab += a * b
        acc_a += a
    if CHANNELS_LAST:
        return tl.sum(acc_ab, axis=0), tl.sum(acc_a, axis=0)
    else:
        return tl.sum(acc_ab, axis=1), tl.sum(acc_a, axis=1)


@triton.jit
def arrive_last(counters_ptr, pid_c, num_splits):
    """True in the last program of a channel block to finish; partial-sum stores are visible to it."""
    tl.debug_barrier()  # every thread's partial-sum store precedes the release below
    arrivals = tl.atomic_add(counters_ptr + pid_c, 1, sem="acq_rel")
    return arrivals == num_splits - 1


@triton.jit
def total_of_partials(
    partials_ptr, c_offs, c_mask, num_splits, C, acc_dtype: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr
):
    """Column sums of the per-program partials [num_splits, C], BLOCK_S rows per load (many
    loads in flight, not one per program), in a fixed order (deterministic)."""
    total = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_dtype)
    for start in range(0, num_splits, BLOCK_S):
        split = start + tl.arange(0, BLOCK_S)
        mask = (split < num_splits)[:, None] & c_mask[None, :]
        # .cg reads through L2, where the other programs' stores landed.
        offs = split[:, None] * C + c_offs[None, :]
        total += tl.load(partials_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return tl.sum(total, axis=0)


@triton.jit(do_not_specialize=["rows", "row_len"])
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
