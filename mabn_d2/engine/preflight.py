"""Checks that run before a tool writes anything, each failing with one line that names the problem.

A tool that fails halfway leaves half a result (a config.yaml overwritten with a bad value, a
log, an empty folder); these checks find the usual mistakes first: a NORM name no builder
knows, a device this machine does not have, an output folder that cannot be written.
"""
import os
from typing import Iterator, Tuple

import torch
from detectron2.config import CfgNode

from ..modeling.registry import NORMS, STOCK_NORMS, valid_norm_names

__all__ = ["STOCK_NORMS", "UsageError", "check_device", "check_norm_names", "check_writable_dir", "first_line",
           "norm_items", "valid_norm_names"]


def first_line(error: BaseException) -> str:
    """An error's first line (its type's name when it says nothing), for one-line messages."""
    text = (str(error).strip().strip("'\"").splitlines() or [""])[0]
    return text or type(error).__name__


class UsageError(ValueError):
    """An input that cannot work; the message is one line naming the key, path or device."""


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
