"""Checks that run before a tool writes anything, each failing with one line that names the problem.

A tool that fails halfway leaves half a result (a config.yaml overwritten with a bad value, a
log, an empty folder); these checks find the usual mistakes first: a NORM name no builder
knows, a device this machine does not have, an output folder that cannot be written, a
MABN_D2_BACKEND the training steps cannot use, solver values detectron2 would divide by or
assert on.
"""
import math
import os
from typing import Iterator, Optional, Tuple

import torch
from detectron2.config import CfgNode

from ..layers.backend import BACKEND_ENV_VAR, selected_backend, triton_installed
from ..modeling.registry import NORMS, STOCK_NORMS, valid_norm_names
from ..norms import triton_step_norm_names
from ..utils.errors import UsageError, first_line

__all__ = ["STOCK_NORMS", "UsageError", "check_backend", "check_device", "check_norm_names", "check_solver",
           "check_writable_dir", "first_line", "norm_items", "valid_norm_names"]

LR_SCHEDULERS = ("WarmupMultiStepLR", "WarmupCosineLR", "WarmupStepWithFixedGammaLR")  # detectron2's build_lr_scheduler


def norm_items(node: CfgNode, prefix: str = "") -> Iterator[Tuple[str, object]]:
    """(dotted key, value) of every NORM key in a config."""
    for key, value in node.items():
        if isinstance(value, CfgNode):
            yield from norm_items(value, f"{prefix}{key}.")
        elif key == "NORM":
            yield f"{prefix}{key}", value


def check_norm_names(cfg: CfgNode) -> None:
    """UsageError naming the first NORM key whose value get_norm would not resolve."""
    valid = set(STOCK_NORMS) | set(NORMS)
    for key, value in norm_items(cfg):
        if isinstance(value, str) and value not in valid:
            raise UsageError(f"{key} {value!r} is not a norm name; valid names: {', '.join(valid_norm_names())}")


def check_device(device: str, processes: int = 1) -> None:
    """UsageError unless `device` exists here (and, for CUDA, `processes` GPUs do)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise UsageError(f"device {device!r} is not a torch device ({error})") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} needs CUDA, which this machine does not have "
                             "(torch.cuda.is_available() is False); use device 'cpu'")
        needed = max(processes, (parsed.index or 0) + 1)
        if torch.cuda.device_count() < needed:
            raise UsageError(f"device {device!r} with {processes} process(es) needs {needed} GPUs; "
                             f"this machine has {torch.cuda.device_count()}")


def check_writable_dir(path: str, what: str = "output folder") -> None:
    """UsageError unless `path` is a folder, or can become one, that this process may write."""
    if not path:
        raise UsageError(f"no {what} given")
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{what} {path} exists and is not a folder")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"cannot create {what} {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "is on a read-only filesystem" if _read_only_filesystem(existing) else "is not writable"
        raise UsageError(f"cannot write {what} {path}: {existing} {reason}")


def _read_only_filesystem(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_backend(cfg: CfgNode) -> None:
    """UsageError unless $MABN_D2_BACKEND names a backend that can run this config's MABN/BRN steps.

    The layers read the variable at their first training forward: a bad value would end every
    process there, after OUTPUT_DIR is written. "triton" on CPU tensors needs Triton's
    interpreter (TRITON_INTERPRET=1), which only tests use.
    """
    try:
        backend = selected_backend()
    except ValueError as error:  # names the variable, its value and the valid ones
        raise UsageError(str(error)) from None
    if backend != "triton" or not any(value in triton_step_norm_names() for _, value in norm_items(cfg)):
        return
    reason = _why_triton_cannot_run(cfg.MODEL.DEVICE)
    if reason:
        raise UsageError(f"{BACKEND_ENV_VAR}=triton: the Triton kernels cannot run this config's MABN/BRN layers: "
                         f"{reason}; unset {BACKEND_ENV_VAR} (auto) or set it to torch")


def _why_triton_cannot_run(device: str) -> Optional[str]:
    if not triton_installed():
        return "Triton is not installed"
    if torch.device(device).type == "cuda":
        return None  # check_device has made sure CUDA is there
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return None  # the interpreter runs CPU tensors (slowly)
    where = "this machine has no CUDA" if not torch.cuda.is_available() else f"MODEL.DEVICE is {device!r}"
    return f"{where}, and CPU tensors run under Triton only with TRITON_INTERPRET=1 (slow: tests only)"


def check_solver(cfg: CfgNode, processes: int = 1) -> None:
    """UsageError naming the first SOLVER key a training run would fail on, with the rule it breaks.

    detectron2 meets these values deep inside training (a ZeroDivisionError for MAX_ITER 0, an
    AssertionError for IMS_PER_BATCH 0) or not at all (STEPS out of order). They are checked as
    the trainer uses them: after SOLVER.REFERENCE_WORLD_SIZE scales them to `processes`.
    """
    solver = cfg.SOLVER
    _require(solver.REFERENCE_WORLD_SIZE >= 0, "SOLVER.REFERENCE_WORLD_SIZE", "must be >= 0 (0: no scaling)",
             solver.REFERENCE_WORLD_SIZE)
    if solver.REFERENCE_WORLD_SIZE > 0:
        _require(solver.IMS_PER_BATCH % solver.REFERENCE_WORLD_SIZE == 0, "SOLVER.IMS_PER_BATCH",
                 f"must be divisible by SOLVER.REFERENCE_WORLD_SIZE ({solver.REFERENCE_WORLD_SIZE})",
                 solver.IMS_PER_BATCH)
    from detectron2.engine import DefaultTrainer  # engine imports much; only training needs it

    scaled = DefaultTrainer.auto_scale_workers(cfg, processes).SOLVER
    note = "" if scaled is solver else f" (after SOLVER.REFERENCE_WORLD_SIZE scaled it to {processes} processes)"
    _check_schedule_lengths(scaled, processes, note)
    _check_rates(scaled, note)
    _check_lr_schedule(scaled, note)
    _check_gradient_clipping(scaled.CLIP_GRADIENTS)


def _require(ok: bool, key: str, rule: str, value: object, note: str = "") -> None:
    if not ok:
        raise UsageError(f"{key} {rule}, got {value!r}{note}")


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_schedule_lengths(solver: CfgNode, processes: int, note: str) -> None:
    _require(solver.MAX_ITER > 0, "SOLVER.MAX_ITER", "must be > 0 to train", solver.MAX_ITER, note)
    _require(solver.IMS_PER_BATCH > 0, "SOLVER.IMS_PER_BATCH", "must be > 0", solver.IMS_PER_BATCH, note)
    _require(solver.IMS_PER_BATCH % processes == 0, "SOLVER.IMS_PER_BATCH",
             f"must be divisible by the number of training processes, {processes} (--num-gpus x --num-machines)",
             solver.IMS_PER_BATCH, note)
    _require(solver.WARMUP_ITERS >= 0, "SOLVER.WARMUP_ITERS", "must be >= 0", solver.WARMUP_ITERS, note)
    _require(solver.CHECKPOINT_PERIOD > 0, "SOLVER.CHECKPOINT_PERIOD", "must be > 0", solver.CHECKPOINT_PERIOD,
             note)


def _check_rates(solver: CfgNode, note: str) -> None:
    _require(_finite(solver.BASE_LR) and solver.BASE_LR > 0, "SOLVER.BASE_LR", "must be finite and > 0",
             solver.BASE_LR, note)
    for key in ("MOMENTUM", "WEIGHT_DECAY", "WEIGHT_DECAY_NORM", "BIAS_LR_FACTOR", "WARMUP_FACTOR"):
        value = solver[key]
        _require(_finite(value) and value >= 0, f"SOLVER.{key}", "must be finite and >= 0", value)
    if solver.WEIGHT_DECAY_BIAS is not None:
        _require(_finite(solver.WEIGHT_DECAY_BIAS) and solver.WEIGHT_DECAY_BIAS >= 0, "SOLVER.WEIGHT_DECAY_BIAS",
                 "must be None (follow SOLVER.WEIGHT_DECAY) or finite and >= 0", solver.WEIGHT_DECAY_BIAS)
    if solver.NESTEROV:
        _require(solver.MOMENTUM > 0, "SOLVER.MOMENTUM", "must be > 0 with SOLVER.NESTEROV True", solver.MOMENTUM)


def _check_lr_schedule(solver: CfgNode, note: str) -> None:
    name = solver.LR_SCHEDULER_NAME
    _require(name in LR_SCHEDULERS, "SOLVER.LR_SCHEDULER_NAME", f"must be one of {', '.join(LR_SCHEDULERS)}", name)
    _require(solver.WARMUP_METHOD in ("linear", "constant"), "SOLVER.WARMUP_METHOD", "must be linear or constant",
             solver.WARMUP_METHOD)
    if name in ("WarmupMultiStepLR", "WarmupStepWithFixedGammaLR"):
        _require(_finite(solver.GAMMA) and solver.GAMMA > 0, "SOLVER.GAMMA", "must be finite and > 0",
                 solver.GAMMA)
    if name == "WarmupMultiStepLR":
        steps = tuple(solver.STEPS)
        _require(all(_finite(step) and step > 0 for step in steps), "SOLVER.STEPS", "must be iterations > 0",
                 steps, note)
        _require(all(a < b for a, b in zip(steps, steps[1:])), "SOLVER.STEPS", "must be increasing", steps, note)
    elif name == "WarmupCosineLR":
        _require(_finite(solver.BASE_LR_END) and 0 <= solver.BASE_LR_END <= solver.BASE_LR, "SOLVER.BASE_LR_END",
                 f"must be in [0, SOLVER.BASE_LR] = [0, {solver.BASE_LR}]", solver.BASE_LR_END)
    else:
        _require(solver.NUM_DECAYS > 0, "SOLVER.NUM_DECAYS", "must be > 0", solver.NUM_DECAYS)


def _check_gradient_clipping(clip: CfgNode) -> None:
    if not clip.ENABLED:
        return
    _require(clip.CLIP_TYPE in ("value", "norm"), "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "must be value or norm",
             clip.CLIP_TYPE)
    _require(_finite(clip.CLIP_VALUE) and clip.CLIP_VALUE > 0, "SOLVER.CLIP_GRADIENTS.CLIP_VALUE",
             "must be finite and > 0", clip.CLIP_VALUE)
    if clip.CLIP_TYPE == "norm":
        _require(clip.NORM_TYPE > 0, "SOLVER.CLIP_GRADIENTS.NORM_TYPE", "must be > 0 (inf: the largest value)",
                 clip.NORM_TYPE)
