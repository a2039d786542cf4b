"""Host side of the Triton paths: launch shapes, workspaces, input checks, the affine launch.

Launch shapes are pure functions of the tensor shape, cached, so a training step spends
little Python on them; nothing here reads a tensor's values (no host synchronisation).
"""
import contextlib
import dataclasses
import functools
import importlib
import os
import threading
from types import ModuleType
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

__all__ = [
    "LaunchTuning", "TUNING", "ReductionPlan", "ElementwisePlan", "reduction_plan", "elementwise_plan", "ring_block",
    "sm_count", "arrival_counters", "kernel_module", "is_channels_last", "unsupported_input_reason",
    "launch_channel_affine", "matching_layout", "launch_guard", "launch_reduction",
    "counters_left_set", "set_counter_check", "COUNTER_CHECK_ENV_VAR", "StepPlan", "step_plan", "stream_scratch",
    "once_differentiable_when_graphed",
]

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension
_CPU = torch.device("cpu")


def _is_cuda(device: torch.device) -> bool:
    """device.type == "cuda", without building the type's string (per launch) for the CPU."""
    return device != _CPU and device.type == "cuda"


@dataclasses.dataclass(frozen=True)
class LaunchTuning:
    """Block-size knobs: elements per program tile, reduction programs per SM."""

    reduce_tile: int = 2048
    elementwise_tile: int = 2048
    programs_per_sm: int = 8
    max_channel_block: int = 64  # channels per program in channels_last reductions
    epilogue_rows: int = 256  # most partial-sum or ring-buffer rows an epilogue loads at once
    num_warps: int = 4

    def __post_init__(self):
        for name in ("reduce_tile", "elementwise_tile", "max_channel_block", "epilogue_rows", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"LaunchTuning.{name} must be a power of two (Triton block shapes), got {value}")
        # hashed on every cached plan lookup: once here, not field by field per launch
        object.__setattr__(self, "_hash", hash(dataclasses.astuple(self)))

    def __hash__(self) -> int:
        return self._hash


TUNING = LaunchTuning()


@dataclasses.dataclass(frozen=True)
class ReductionPlan:
    block_r: int  # rows (channels_last) or H*W positions (NCHW) per tile
    block_c: int  # channels per program
    channel_blocks: int
    num_tiles: int  # tiles per channel block
    num_splits: int  # programs per channel block
    block_s: int  # partial-sum rows per load in the epilogue

    @functools.cached_property  # read per launch: computed once
    def grid(self) -> Tuple[int, int]:
        return (self.channel_blocks, self.num_splits)


@dataclasses.dataclass(frozen=True)
class ElementwisePlan:
    rows: int
    row_len: int
    block_m: int
    block_k: int

    @functools.cached_property  # read per launch: computed once
    def grid(self) -> Tuple[int, int]:
        return (_cdiv(self.rows, self.block_m), _cdiv(self.row_len, self.block_k))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=512)
def reduction_plan(n: int, c: int, hw: int, channels_last: bool, sms: int, tuning: LaunchTuning) -> ReductionPlan:
    """Tiles of about `reduce_tile` elements; channel blocks split to fill `sms` SMs.

    Block shapes (Triton constexprs, one compiled variant each) depend on C and H*W only, never
    on N: the ROI heads' batch changes every iteration and must not trigger compiles.
    """
    if channels_last:
        block_c = min(_next_power_of_2(c), tuning.max_channel_block)
        block_r = max(1, tuning.reduce_tile // block_c)
        num_tiles = _cdiv(n * hw, block_r)
    else:
        block_r = min(_next_power_of_2(hw), tuning.reduce_tile)
        block_c = max(1, min(tuning.reduce_tile // block_r, _next_power_of_2(c)))
        num_tiles = n * _cdiv(hw, block_r)
    channel_blocks = _cdiv(c, block_c)
    wanted = _cdiv(tuning.programs_per_sm * sms, channel_blocks)
    num_splits = max(1, min(wanted, num_tiles, MAX_GRID_Y))
    block_s = max(1, min(tuning.epilogue_rows, tuning.reduce_tile // block_c))
    return ReductionPlan(block_r, block_c, channel_blocks, num_tiles, num_splits, block_s)


def ring_block(buffer_size: int, block_c: int) -> int:
    """Ring-buffer rows per load when an epilogue averages a [buffer_size, C] buffer."""
    return _ring_block(buffer_size, block_c, TUNING)


@functools.lru_cache(maxsize=64)
def _ring_block(buffer_size: int, block_c: int, tuning: LaunchTuning) -> int:
    return max(1, min(_next_power_of_2(buffer_size), tuning.epilogue_rows, tuning.reduce_tile // block_c))


@functools.lru_cache(maxsize=512)
def elementwise_plan(n: int, c: int, hw: int, channels_last: bool, tuning: LaunchTuning) -> ElementwisePlan:
    """The tensor as a [rows, row_len] matrix, tiles of about `elementwise_tile` elements (block
    shapes independent of N, as in `reduction_plan`)."""
    rows, row_len = (n * hw, c) if channels_last else (n * c, hw)
    block_k = min(_next_power_of_2(row_len), tuning.elementwise_tile)
    block_m = max(1, tuning.elementwise_tile // block_k)
    return ElementwisePlan(rows, row_len, block_m, block_k)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # Triton's CPU interpreter


def launch_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make `device` current for the launches in the block.

    Triton launches on torch.cuda.current_device() and that device's current stream, not on the
    tensors' device; under this guard both are the ones PyTorch uses for the layer's tensors
    (a model on cuda:1 while cuda:0 is current computes on cuda:1).
    """
    if not _is_cuda(device) or (torch.cuda.is_initialized() and device.index == torch.cuda.current_device()):
        return _NO_GUARD
    return torch.cuda.device(device)


_NO_GUARD = contextlib.nullcontext()


def is_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Everything a training step's launches need that follows from the input's geometry alone.

    Built once per (shape, strides, device) and tuning, and reused, so a step spends no Python on plans: the
    size arguments and block constants of both launch kinds are ready-made tuples and dicts, and
    `launch_constants` caches what each layer type derives from the plan (its own keys).
    """

    reduction: ReductionPlan
    affine: ElementwisePlan
    channels_last: bool
    channels: int
    hw: int
    count: int  # N * H * W, the elements each channel reduces over
    # derived from the fields above, ready to pass to a launch
    reduction_sizes: Tuple[int, ...] = dataclasses.field(init=False, compare=False)  # C, HW, count, tiles, splits
    affine_sizes: Tuple[int, int, int] = dataclasses.field(init=False, compare=False)  # rows, row_len, C
    reduction_blocks: Dict[str, object] = dataclasses.field(init=False, compare=False)
    affine_blocks: Dict[Tuple[bool, bool], Dict[str, object]] = dataclasses.field(init=False, compare=False)
    launch_constants: Dict[Tuple, object] = dataclasses.field(init=False, compare=False)

    def __post_init__(self):
        r, a = self.reduction, self.affine
        derived = dict(
            reduction_sizes=(self.channels, self.hw, self.count, r.num_tiles, r.num_splits),
            affine_sizes=(a.rows, a.row_len, self.channels),
            reduction_blocks=dict(CHANNELS_LAST=self.channels_last, BLOCK_R=r.block_r, BLOCK_C=r.block_c,
                                  BLOCK_S=r.block_s),
            affine_blocks={
                (has_b, has_shift): dict(HAS_B=has_b, HAS_SHIFT=has_shift, CHANNELS_LAST=self.channels_last,
                                         BLOCK_M=a.block_m, BLOCK_K=a.block_k, num_warps=TUNING.num_warps)
                for has_b in (False, True) for has_shift in (False, True)
            },
            launch_constants={},
        )
        for name, value in derived.items():
            object.__setattr__(self, name, value)


_step_plans: Dict[Tuple, StepPlan] = {}
_plans_tuning = TUNING  # the tuning the cached plans were built with


def step_plan(x: torch.Tensor) -> StepPlan:
    """The cached StepPlan of a 4-D activation (a dict lookup once the geometry has been seen)."""
    global _plans_tuning
    if _plans_tuning is not TUNING:  # the tuning was replaced (tests): plans built with the old one are stale
        _step_plans.clear()
        _plans_tuning = TUNING
    key = (x.shape, x.stride(), x.device)
    plan = _step_plans.get(key)
    if plan is None:
        n, c, h, w = x.shape
        channels_last = is_channels_last(x)
        plan = StepPlan(reduction_plan(n, c, h * w, channels_last, sm_count(x.device), TUNING),
                        elementwise_plan(n, c, h * w, channels_last, TUNING), channels_last, c, h * w, n * h * w)
        if len(_step_plans) >= 4096:  # the ROI heads' batch changes every step: bound the cache
            _step_plans.clear()
        _step_plans[key] = plan
    return plan


_counters: Dict[Tuple[torch.device, int], torch.Tensor] = {}


def arrival_counters(device: torch.device, size: int) -> torch.Tensor:
    """Zeroed int32 counters, one per channel block; every reduction leaves them zeroed.

    One set per (device, stream): launches on one stream run in order, so they never overlap.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if _is_cuda(device) else 0
    counters = _counters.get((device, stream))
    if counters is None or counters.numel() < size:
        counters = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
        _counters[(device, stream)] = counters
    return counters


_scratch: Dict[Tuple, torch.Tensor] = {}


def stream_scratch(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A flat workspace of at least `numel` elements, reused by every backward on this stream.

    Reuse is safe in stream order: launches on one stream run one after the other, and autograd
    runs a CUDA device's backward nodes on one thread, so a backward's reduction and the launch
    that reads its result are never interleaved with another backward's on the same stream (on
    the CPU, under the interpreter, the set is per thread). It saves an allocation per backward.
    """
    if _is_cuda(device):
        key = (device, torch.cuda.current_stream(device).cuda_stream, dtype)
    else:
        key = (device, threading.get_ident(), dtype)
    scratch = _scratch.get(key)
    if scratch is None or scratch.numel() < numel:
        scratch = torch.empty(numel, dtype=dtype, device=device)
        _scratch[key] = scratch
    return scratch


COUNTER_CHECK_ENV_VAR = "MABN_D2_CHECK_COUNTERS"
_check_counters = os.environ.get(COUNTER_CHECK_ENV_VAR, "0") not in ("", "0")


def set_counter_check(enabled: bool) -> None:
    """Debug switch (also $MABN_D2_CHECK_COUNTERS=1): after every reduction, read the arrival
    counters back (a host sync) and raise if one was left set."""
    global _check_counters
    _check_counters = bool(enabled)


def counters_left_set(device: Optional[torch.device] = None) -> int:
    """How many arrival counters (all streams of `device`, or of every device) are not zero (a host sync)."""
    return sum(int(torch.count_nonzero(counters)) for (d, _), counters in _counters.items()
               if device is None or d == device)


def launch_reduction(kernel, grid: Tuple[int, int], device: torch.device, owner: str, args: Tuple,
                     constants: Dict[str, object]) -> None:
    """`kernel[grid](*args, **constants)`, a statistics kernel; its arrival counters are zero
    afterwards, by the kernel or by this (the arguments come packed: no re-packing per launch).

    The last program of each channel block resets its counter. A launch that raises (a compile or
    driver error) may leave counters set, which would silently corrupt every later reduction on
    this stream: they are zeroed before the error propagates.
    """
    try:
        kernel[grid](*args, **constants)
    except Exception:
        for (d, _), counters in _counters.items():
            if d == device:
                counters.zero_()
        raise
    if _check_counters:
        left = counters_left_set(device)
        if left:
            raise RuntimeError(f"{owner}: {left} arrival counters on {device} were left set by a reduction "
                               f"({COUNTER_CHECK_ENV_VAR} check); the kernels' last-arrival logic is broken")


@functools.lru_cache(maxsize=None)
def kernel_module(name: str) -> ModuleType:
    """A kernel module of this package, imported on first use (kernels are defined at import,
    and TRITON_INTERPRET must be read then, not when mabn_d2 is imported)."""
    return importlib.import_module(f"{__package__}.{name}")


def unsupported_input_reason(
    x: torch.Tensor, state_dtype: torch.dtype, state: Sequence[Tuple[str, torch.Tensor]]
) -> Optional[str]:
    """Why the kernels cannot take this activation and per-channel state, or None."""
    if x.dim() != 4:
        return f"expects a 4-D input, got {x.dim()}-D"
    if x.numel() == 0:
        return "empty input (the module answers it in eval form)"
    if state_dtype not in (torch.float32, torch.float64):
        return f"state dtype {state_dtype} (float32 or float64 needed)"
    if state_dtype == torch.float32 and x.dtype not in ACTIVATION_DTYPES:
        return f"input dtype {x.dtype} with float32 state"
    if state_dtype == torch.float64 and x.dtype != torch.float64:
        return f"input dtype {x.dtype} with float64 state"
    for name, t in state:
        if t is None or t.dtype != state_dtype or not t.is_contiguous() or t.device != x.device:
            return f"{name} must be a contiguous {state_dtype} tensor on {x.device}"
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return "input is neither contiguous NCHW nor channels_last"
    n, c, h, w = x.shape
    plan = elementwise_plan(n, c, h * w, is_channels_last(x), TUNING)
    if plan.grid[1] > MAX_GRID_Y or plan.rows >= 2**31:
        return f"shape {tuple(x.shape)} exceeds the launch grid"
    return None


def launch_channel_affine(
    plan: StepPlan, a: torch.Tensor, scale_a: torch.Tensor, shift: Optional[torch.Tensor],
    b: Optional[torch.Tensor] = None, scale_b: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """a * scale_a[c] (+ b * scale_b[c]) (+ shift[c]) in one pass, over a tensor of `plan`'s
    geometry; b's dtype and a's layout when b is given (a gradient for b), else a's dtype.

    The scales are read as the first C elements of `scale_a` / `scale_b`: row 0 of a [rows, C]
    workspace can be passed as the workspace itself, without a view.
    """
    out = torch.empty_like(a) if b is None or b.dtype == a.dtype else torch.empty_like(a, dtype=b.dtype)
    kernel_module("common").channel_affine_kernel[plan.affine.grid](
        a, a if b is None else b, scale_a, scale_a if scale_b is None else scale_b,
        scale_a if shift is None else shift, out, *plan.affine_sizes,
        **plan.affine_blocks[b is not None, shift is not None],
    )
    return out


def once_differentiable_when_graphed(backward: Callable) -> Callable:
    """A backward made once-differentiable only where it matters: under create_graph=True.

    The Triton backwards record no graph (kernels write into fresh tensors); without
    create_graph, autograd already runs them with grad mode off, so they skip
    `once_differentiable`'s no_grad wrapping on every step. With it, they are differentiable
    once, as the public-operation path.
    """
    wrapped = once_differentiable(backward)

    @functools.wraps(backward)
    def dispatch(ctx, *grads):
        if torch.is_grad_enabled():
            return wrapped(ctx, *grads)
        return backward(ctx, *grads)
    return dispatch


def matching_layout(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`grad` with x's strides (the kernels index both alike): a copy only when they differ."""
    if grad.stride() == x.stride():
        return grad
    return grad.contiguous(memory_format=torch.channels_last if is_channels_last(x) else torch.contiguous_format)
