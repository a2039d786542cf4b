"""Checkpoints for deployment: strict loading (every key and shape must match the config), and saving
only the model."""
import os
from typing import Callable, Dict, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from torch import nn

from ..engine.atomic_io import atomic_write
from ..engine.checkpoint import describe_unreadable
from ..modeling.registry import build_model
from .errors import ExportError
from .frozen_config import mabn_norm_keys


class _MismatchError(ExportError):
    pass


class _StrictCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that raises on missing, unexpected or mis-shaped keys.

    Stock loading only warns, which would fold a model whose norms kept their initial values.
    """

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
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


def load_checkpoint_strict(model: nn.Module, path: str, config_name: str = "the config") -> None:
    """Load detectron2 checkpoint `path` into `model`; ExportError naming the file otherwise."""
    if not path:
        raise ExportError("no checkpoint given (--weights / MODEL.WEIGHTS is empty)")
    if "://" not in path and not os.path.isfile(path):
        raise ExportError(f"checkpoint not found: {path}")
    try:
        _StrictCheckpointer(model).load(path, checkpointables=[])
    except _MismatchError as e:
        raise ExportError(f"checkpoint {path} does not match {config_name}: {e}") from None
    except Exception as e:  # unpickling, zip and format errors all mean the same to the user
        raise ExportError(describe_unreadable(path, e)) from e


def build_and_load(cfg: CfgNode, weights: str, config_name: str = "the config") -> nn.Module:
    """The eval-mode model of `cfg` with `weights` loaded strictly (needs NORM "MABN" somewhere)."""
    if not mabn_norm_keys(cfg):
        raise ExportError(f"{config_name} sets no NORM to \"MABN\": there is nothing to fold")
    model = build_model(cfg)
    load_checkpoint_strict(model, weights, config_name)
    return model.eval()


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
