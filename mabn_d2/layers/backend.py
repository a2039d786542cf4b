"""Which implementation runs a moving-average norm's training step.

Two implementations compute the same step: Triton kernels (four launches per step, CUDA) and
public PyTorch operations (every device). The switch, read at every training forward:

  MABN_D2_BACKEND=auto    Triton for CUDA tensors it supports, public operations otherwise (default)
  MABN_D2_BACKEND=triton  Triton, and an error where it cannot run; CPU tensors run under
                          Triton's interpreter when TRITON_INTERPRET=1 (slow: tests only)
  MABN_D2_BACKEND=torch   public operations everywhere

`set_backend(name)` or `with use_backend(name):` override the environment from code.

Before the kernels serve a (layer type, device, dtype, layout, state dtype) for the first time,
they run a first-use check (triton/first_use_check.py): every kernel variant on a tiny input, compared with
the public path, with none of the layer's state touched. If it raises or disagrees, "auto" logs
one warning naming the cause and uses the public path for that key from then on; "triton"
raises with the cause.
"""
import contextlib
import functools
import importlib.util
import logging
import os
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

__all__ = ["BACKENDS", "BACKEND_ENV_VAR", "selected_backend", "set_backend", "use_backend", "use_triton",
           "first_use_verdicts", "forget_first_use_checks", "refuse_graph_capture"]

logger = logging.getLogger(__name__)

BACKEND_ENV_VAR = "MABN_D2_BACKEND"
BACKENDS = ("auto", "triton", "torch")

_override: Optional[str] = None


def _checked(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r}: choose one of {', '.join(BACKENDS)}")
    return name


_environment_choice: Tuple[Optional[str], str] = (None, "auto")  # the variable's last value, its backend


def selected_backend() -> str:
    """The backend in force: `set_backend`'s choice, else $MABN_D2_BACKEND, else "auto"."""
    global _environment_choice
    if _override is not None:
        return _override
    raw = os.environ.get(BACKEND_ENV_VAR)
    seen, backend = _environment_choice
    if raw != seen:  # parsed once per value, not per training step
        backend = "auto" if raw is None else _checked(raw.strip().lower() or "auto", BACKEND_ENV_VAR)
        _environment_choice = (raw, backend)
    return backend


def set_backend(name: Optional[str]) -> None:
    """Force a backend from code ("auto", "triton", "torch"); None returns to the environment."""
    global _override
    _override = None if name is None else _checked(name, "backend")


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """`set_backend(name)` for the duration of a block."""
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def refuse_graph_capture(x: torch.Tensor, owner: str) -> None:
    """Raise if a training step is being captured into a CUDA graph.

    A step's phase, ring-buffer slot and warm-up ramps are decided on the host per iteration;
    a replayed graph would repeat the captured iteration's decisions, and the first-use check
    reads results back. Eval mode (a frozen per-channel affine) captures fine.
    """
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"{owner}: a training step cannot be captured into a CUDA graph: its phase and ring-buffer slot are "
            "decided on the host at every iteration, so a replay would repeat one iteration. Capture the model in "
            "eval mode (a frozen affine), or train without CUDA graphs.")


def _device_reason(x: torch.Tensor, backend: str) -> Optional[str]:
    """Why the kernels cannot run on x's device, or None: CUDA, or the CPU under the interpreter for "triton"."""
    if x.device.type == "cuda" or (backend == "triton" and x.device.type == "cpu" and _interpreting()):
        return None
    return f"tensors on {x.device.type} (CUDA needed, or TRITON_INTERPRET=1 for CPU tests)"


# (owner, device, dtype, channels_last, state dtype) -> None (the kernels passed) or the failure
_verdicts: Dict[Tuple, Optional[str]] = {}


def first_use_verdicts() -> Dict[Tuple, Optional[str]]:
    """The first-use checks run so far: key -> None when the kernels passed, else the cause."""
    return dict(_verdicts)


def forget_first_use_checks() -> None:
    """Run the first-use checks again on next use (tests, or after fixing the environment)."""
    _verdicts.clear()


def _first_use_failure(key: Tuple, first_use_check: Callable[[], Optional[str]]) -> Optional[str]:
    if key not in _verdicts:
        try:
            verdict = first_use_check()
        except Exception as error:  # a compile, driver or launch failure: anything the kernels raise
            verdict = f"{type(error).__name__}: {error}"
        _verdicts[key] = verdict
        if verdict is not None and selected_backend() == "auto":
            owner, device, dtype, channels_last, state_dtype = key
            logger.warning(
                "%s: the Triton kernels failed their first-use check on %s %s%s input (%s state): %s. "
                "Using the public PyTorch operations for these tensors from now on (%s=torch skips the check, "
                "%s=triton makes it an error).", owner, device, dtype, " channels_last" if channels_last else "",
                state_dtype, verdict, BACKEND_ENV_VAR, BACKEND_ENV_VAR)
    return _verdicts[key]


def use_triton(x: torch.Tensor, unsupported_reason: Callable[[], Optional[str]], owner: str,
               first_use_check: Optional[Callable[[torch.Tensor, torch.dtype], Optional[str]]] = None,
               state_dtype: Optional[torch.dtype] = None, decisions: Optional[Dict[Tuple, bool]] = None) -> bool:
    """Whether this training step runs on the Triton kernels.

    `unsupported_reason()` says why the kernels cannot take these tensors (None: they can).
    `first_use_check(x, state_dtype)` is the check for the key of these tensors (run once per key).
    Under "triton" every refusal or failed check is an error naming the reason, so a comparison
    of the two paths never silently times the same one twice. `decisions` (a dict the layer owns)
    remembers the answer per backend and input geometry (channels, spatial size, strides, dtype,
    device, state dtype), so a training step does not re-check what cannot have changed.
    """
    backend = selected_backend()
    if backend == "torch":
        return False
    key = None
    if decisions is not None:  # the layer's own cache: one check per input geometry, not per step
        key = (backend, x.shape[1:], x.stride(), x.dtype, x.device, state_dtype, x.numel() < 2**31)
        decided = decisions.get(key)
        if decided is not None:
            return decided
    decided = _decide(x, unsupported_reason, owner, first_use_check, state_dtype, backend)
    if key is not None:
        if len(decisions) >= 64:
            decisions.clear()
        decisions[key] = decided
    return decided


def _decide(x: torch.Tensor, unsupported_reason: Callable[[], Optional[str]], owner: str,
            first_use_check: Optional[Callable[[torch.Tensor, torch.dtype], Optional[str]]],
            state_dtype: Optional[torch.dtype], backend: str) -> bool:
    reason = None
    if not triton_installed():
        reason = "Triton is not installed"
    else:
        reason = _device_reason(x, backend) or unsupported_reason()
    if reason is None and first_use_check is not None:
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        key = (owner, x.device, x.dtype, channels_last, state_dtype)
        failure = _first_use_failure(key, lambda: first_use_check(x, state_dtype))
        if failure is not None:
            reason = f"the first-use check against the public path failed: {failure}"
    if reason is None:
        return True
    if backend == "triton":
        raise RuntimeError(f"{owner}: {BACKEND_ENV_VAR}=triton, but the Triton kernels cannot run this step: {reason}")
    return False
