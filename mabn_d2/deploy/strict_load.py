"""Checkpoints for deployment: strict loading (every key and shape must match the config), and saving
only the model."""
import itertools
import os
from typing import Callable, Dict, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from torch import nn

from ..utils.atomic_io import atomic_write
from ..engine.checkpoint import CheckpointError, describe_unreadable, verify_checksum
from ..utils.errors import first_line
from ..modeling.registry import build_model
from .errors import ExportError
from .frozen_config import mabn_norm_keys


class _MismatchError(ExportError):
    pass


class _RefusedError(ExportError):
    """The file loaded, but a layer refused its values (load_state_dict's error messages)."""


class _UnreadableError(ExportError):
    """The file itself did not load (unpickling, zip or format errors), or its checksum says it changed."""


class _StrictCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that raises on missing, unexpected or mis-shaped keys.

    Stock loading only warns, which would fold a model whose norms kept their initial values.
    Reading the file and fitting it to the model fail with distinct errors: only the first
    means the file is damaged.
    """

    def _load_file(self, filename):
        try:
            data = super()._load_file(filename)
        except Exception as e:  # unpickling, zip and format errors all mean the same to the user
            raise _UnreadableError(describe_unreadable(filename, e)) from e
        try:
            verify_checksum(data, filename)  # a training checkpoint whose bytes changed after it was saved
        except CheckpointError as e:
            raise _UnreadableError(str(e)) from e
        return data

    def _load_model(self, checkpoint):
        try:
            incompatible = super()._load_model(checkpoint)
        except RuntimeError as e:  # nn.Module.load_state_dict: a layer's _load_from_state_dict refused a value
            raise _RefusedError(_state_dict_errors(e)) from e
        problems = _describe_incompatible(
            incompatible.missing_keys, incompatible.unexpected_keys, incompatible.incorrect_shapes
        )
        if problems:
            raise _MismatchError(problems)
        return incompatible


def _describe_incompatible(missing: Sequence[str], unexpected: Sequence[str], shapes: Sequence) -> str:
    def some(items: Sequence, show: Callable[[object], str] = str) -> str:
        return ", ".join(show(item) for item in list(items)[:3]) + (" ..." if len(items) > 3 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} keys missing from the checkpoint ({some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({some(unexpected)})")
    if shapes:
        parts.append(
            f"{len(shapes)} keys with another shape ("
            + some(shapes, lambda s: f"{s[0]}: checkpoint {tuple(s[1])} vs model {tuple(s[2])}")
            + ")"
        )
    return "; ".join(parts)


def _state_dict_errors(error: RuntimeError, shown: int = 3) -> str:
    """load_state_dict's error list on one line: the first message whole, then the keys of the others.

    torch writes "Error(s) in loading state_dict for Model:" and one tab-indented line per
    problem, "key: why"; the first says the rule, and the others are mostly the same rule again.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    if len(lines) == 1:
        return lines[0]
    others = [line.split(": ", 1)[0] for line in lines[1:]]
    more = f", ... ({len(lines)} problems in all)" if len(others) > shown else ""
    return f"{lines[0]}; also {', '.join(others[:shown])}{more}"


def load_checkpoint_strict(model: nn.Module, path: str, config_name: str = "the config") -> None:
    """Load detectron2 checkpoint `path` into `model`; ExportError naming the file otherwise."""
    if not path:
        raise ExportError("no checkpoint given (--weights / MODEL.WEIGHTS is empty)")
    if "://" not in path and not os.path.isfile(path):
        raise ExportError(f"checkpoint not found: {path}")
    try:
        _StrictCheckpointer(model).load(path, checkpointables=[])
    except _UnreadableError as e:
        raise ExportError(str(e)) from e.__cause__
    except _MismatchError as e:
        raise ExportError(f"checkpoint {path} does not match {config_name}: {e}") from None
    except _RefusedError as e:
        raise ExportError(f"checkpoint {path} does not fit the model of {config_name}: {e}") from e.__cause__
    except Exception as e:  # the file loaded; anything else went wrong while fitting it to the model
        raise ExportError(f"cannot load checkpoint {path} into the model of {config_name}: "
                          f"{type(e).__name__}: {first_line(e)}") from e


def build_and_load(cfg: CfgNode, weights: str, config_name: str = "the config") -> nn.Module:
    """The eval-mode model of `cfg` with `weights` loaded strictly (needs NORM "MABN" somewhere)."""
    if not mabn_norm_keys(cfg):
        raise ExportError(f"{config_name} sets no NORM to \"MABN\": there is nothing to fold")
    model = build_model(cfg)
    load_checkpoint_strict(model, weights, config_name)
    check_finite(model, f"checkpoint {weights}")
    return model.eval()


def check_finite(model: nn.Module, what: str, shown: int = 3) -> None:
    """ExportError naming the parameters and buffers of `model` that hold NaN or infinity.

    A non-finite value folds and exports without complaint and makes every prediction NaN;
    `what` names where the values came from.
    """
    bad = []
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_floating_point() and not tensor.is_meta:
            count = int(torch.count_nonzero(~torch.isfinite(tensor)))
            if count:
                bad.append(f"{name} ({count} of {tensor.numel()})")
    if bad:
        more = f" ... ({len(bad)} tensors in all)" if len(bad) > shown else ""
        raise ExportError(f"{what} holds NaN or infinite values in {', '.join(bad[:shown])}{more}; "
                          "a model with non-finite weights predicts nothing usable")


def check_state_dict_matches(model: nn.Module, state_dict: Dict[str, torch.Tensor], what: str) -> None:
    """ExportError unless `state_dict` has exactly `model`'s keys and shapes."""
    expected = model.state_dict()
    shapes = [
        (k, tuple(v.shape), tuple(expected[k].shape))
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    problems = _describe_incompatible(
        sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected)), shapes
    )
    if problems:
        raise ExportError(f"{what}: {problems}")


def save_checkpoint(model: nn.Module, path: str) -> None:
    """Write `model` in detectron2's checkpoint format, {"model": state_dict}, atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: torch.save({"model": state}, f))
