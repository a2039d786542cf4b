"""Which implementation runs a moving-average norm's training step.

Two implementations compute the same step: Triton kernels (four launches per step, CUDA) and
public PyTorch operations (every device). The switch, read at every training forward:

  MABN_D2_BACKEND=auto    Triton for CUDA tensors it supports, public operations otherwise (default)
  MABN_D2_BACKEND=triton  Triton, and an error where it cannot run; CPU tensors run under
                          Triton's interpreter when TRITON_INTERPRET=1 (slow: tests only)
  MABN_D2_BACKEND=torch   public operations everywhere

`set_backend(name)` or `with use_backend(name):` override the environment from code.
"""
import contextlib
import functools
import importlib.util
import os
from typing import Callable, Iterator, Optional

import torch

__all__ = ["BACKENDS", "BACKEND_ENV_VAR", "selected_backend", "set_backend", "use_backend", "use_triton"]

BACKEND_ENV_VAR = "MABN_D2_BACKEND"
BACKENDS = ("auto", "triton", "torch")

_override: Optional[str] = None


def _checked(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r}: choose one of {', '.join(BACKENDS)}")
    return name


def selected_backend() -> str:
    """The backend in force: `set_backend`'s choice, else $MABN_D2_BACKEND, else "auto"."""
    if _override is not None:
        return _override
    return _checked(os.environ.get(BACKEND_ENV_VAR, "auto").strip().lower() or "auto", BACKEND_ENV_VAR)


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


def use_triton(x: torch.Tensor, unsupported_reason: Callable[[], Optional[str]], owner: str) -> bool:
    """Whether this training step runs on the Triton kernels.

    `unsupported_reason()` says why the kernels cannot take these tensors (None: they can).
    Under "triton" every refusal is an error naming the reason, so a comparison of the two
    paths never silently times the same one twice.
    """
    backend = selected_backend()
    if backend == "torch":
        return False
    reason = None
    if not triton_installed():
        reason = "Triton is not installed"
    elif x.device.type != "cuda" and not (backend == "triton" and x.device.type == "cpu" and _interpreting()):
        reason = f"tensors on {x.device.type} (CUDA needed, or TRITON_INTERPRET=1 for CPU tests)"
    else:
        reason = unsupported_reason()
    if reason is None:
        return True
    if backend == "triton":
        raise RuntimeError(f"{owner}: {BACKEND_ENV_VAR}=triton, but the Triton kernels cannot run this step: {reason}")
    return False
