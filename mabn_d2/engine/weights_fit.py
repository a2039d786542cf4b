"""Whether a checkpoint fits the model a config builds, checked before a run starts.

When detectron2 loads weights, a tensor of another shape is skipped with a warning (that part
of the model keeps its initialization), and MABN2d refuses a BatchNorm running_mean with a
traceback; both happen in every training process, after OUTPUT_DIR is written. Here the
checkpoint is read once, memory-mapped, and verified against the checksum saved with it (a file
damaged after it was written is named as such, not compared), then compared with the model built
from the config on the CPU, once, before anything starts.

What must fit:
- a resume point, and weights to evaluate: every tensor the model and the file share;
- weights to train from: the backbone and every MABN layer's state (a layer that loads its
  iteration count but not its ring buffers would normalize by empty averages). Heads of
  another shape are detectron2's fine-tuning case (another NUM_CLASSES): they start anew, as
  detectron2 warns.
Keys on one side only are not problems: converted backbones lack the FPN and the heads, and
BatchNorm weights lack MABN's ring buffers (MABNCheckpointer reports both as expected). A file
that shares no key at all with the model is one.
"""
import logging
import os
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple
from urllib.parse import parse_qs, urlparse

import torch
from torch import nn
from detectron2.config import CfgNode

from ..layers import MABN2d
from ..layers.base import MovingAverageNorm
from .checkpoint import CheckpointError, read_checkpoint

__all__ = ["ModelLayout", "check_resume_fits", "check_weights_fit", "model_layout"]

_DDP_PREFIX = "module."
KeyFilter = Optional[Callable[[str], bool]]  # which keys must have the model's shape (None: all)


class ModelLayout(NamedTuple):
    """What a checkpoint is compared with: the shapes of a model's state and its MABN keys."""

    shapes: Dict[str, Tuple[int, ...]]
    mabn_state: frozenset  # every state key of a moving-average norm (MABN2d)
    ring_buffers: frozenset  # the keys of the ring buffers ([buffer_size, C])
    zero_means: Tuple[str, ...]  # running_mean keys of MABN2d layers: zero by definition


def model_layout(cfg: CfgNode) -> ModelLayout:
    """The layout of the model `cfg` builds, built on the CPU whatever MODEL.DEVICE says."""
    from ..modeling.registry import build_model

    cpu = cfg.clone()
    cpu.defrost()
    cpu.MODEL.DEVICE = "cpu"
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)  # a throw-away model: its build says nothing before the run starts
    try:
        model = build_model(cpu)
    finally:
        logging.disable(previous)
    return layout_of(model)


def layout_of(model: nn.Module) -> ModelLayout:
    """What a checkpoint is compared with: the state's shapes, the moving-average norms' state, their
    ring buffers and MABN's running_mean keys (zero by definition)."""
    mabn_state, rings, means = set(), set(), []
    for prefix, module in model.named_modules():
        if not isinstance(module, MovingAverageNorm):
            continue
        mabn_state.update(module.state_dict(prefix=f"{prefix}."))
        rings.update(f"{prefix}.{name}" for name in module.ring_buffers)
        if isinstance(module, MABN2d):
            means.append(f"{prefix}.running_mean")
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    return ModelLayout(shapes, frozenset(mabn_state), frozenset(rings), tuple(means))


def check_weights_fit(cfg: CfgNode, weights: str, *, eval_only: bool = False,
                      layout: Optional[ModelLayout] = None) -> None:
    """CheckpointError naming what of MODEL.WEIGHTS `weights` cannot serve the model `cfg` builds.

    The file is read once: it must load (and match the checksum it was saved with); then, unless
    detectron2 matches its names by heuristics (`?matching_heuristics=True`, .pyth), it must fit.
    Nothing is read for an empty value or a URL; a .pkl (Detectron / Caffe2 pickles, which
    detectron2 renames by heuristics) must only exist.
    """
    weights_file = _weights_file(weights)
    if weights_file is None:
        return
    path = weights_file.path
    if path.endswith(".pkl"):
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint not found: {path} (MODEL.WEIGHTS)")
        return
    state = _model_state(path)
    if state is None or not weights_file.by_name:
        return
    layout = layout or model_layout(cfg)
    mabn_state = layout.mabn_state
    checked = None if eval_only else (lambda key: key.startswith("backbone.") or key in mabn_state)
    _check_state_fits(state, layout, checked, f"MODEL.WEIGHTS {path}",
                      buffer_size_remedy="train with MODEL.MABN.BUFFER_SIZE {size}")


def check_resume_fits(cfg: CfgNode, path: str, layout: Optional[ModelLayout] = None,
                      contents: Optional[Mapping[str, Any]] = None) -> None:
    """CheckpointError when the checkpoint `--resume` continues from does not fit the model `cfg` builds.

    A change of MODEL.MABN.BUFFER_SIZE is named as such: the ring buffers hold that many iterations.
    `contents`: the file as `checkpoint.read_resume_point` read it (else it is read here).
    """
    state = _model_state(path, contents)
    if state is None:
        return
    config = os.path.join(os.path.dirname(path), "config.yaml")
    _check_state_fits(state, layout or model_layout(cfg), None, f"cannot resume from {path}",
                      buffer_size_remedy="resume with MODEL.MABN.BUFFER_SIZE {size}, or train anew in another "
                                         "OUTPUT_DIR",
                      fit_remedy=f"resume with the config it was trained with ({config}), or train anew in "
                                 "another OUTPUT_DIR")


def _check_state_fits(state: Mapping[str, Any], layout: ModelLayout, checked: KeyFilter, subject: str, *,
                      buffer_size_remedy: str, fit_remedy: str = "") -> None:
    """CheckpointError `<subject>: <problem>; <remedy>` for the first problem of `state` against `layout`.

    A changed MODEL.MABN.BUFFER_SIZE comes first and is named as such: every ring buffer then has
    another shape, which the shape comparison would report as many unrelated keys.
    `buffer_size_remedy` is formatted with the file's buffer length as `size`.
    """
    ring = _ring_size_change(state, layout)
    if ring:
        key, shape, size = ring
        raise CheckpointError(f"{subject}: MODEL.MABN.BUFFER_SIZE changed from {shape[0]} to {size} ({key} is "
                              f"{_dims(shape)} in the file); {buffer_size_remedy.format(size=shape[0])}")
    problem = _fit_problem(state, layout, checked)
    if problem:
        raise CheckpointError(f"{subject}: {problem}" + (f"; {fit_remedy}" if fit_remedy else ""))


class _WeightsFile(NamedTuple):
    path: str  # the local file
    by_name: bool  # detectron2 loads its keys by name (no matching heuristics): they can be compared


def _weights_file(weights: str) -> Optional[_WeightsFile]:
    """MODEL.WEIGHTS as DetectionCheckpointer.load parses it (urlparse; the query, such as
    `?matching_heuristics=True`, is not part of the file name), or None for an empty value or a URL."""
    if not weights or "://" in weights:
        return None
    parsed = urlparse(weights)
    path = parsed._replace(query="").geturl()
    heuristics = parse_qs(parsed.query).get("matching_heuristics") == ["True"] or path.endswith((".pkl", ".pyth"))
    return _WeightsFile(path, not heuristics)


def _model_state(path: str, contents: Optional[Mapping[str, Any]] = None) -> Optional[Mapping[str, Any]]:
    """The model state of a checkpoint (memory-mapped, as detectron2 reads it; verified against the
    checksum saved with it) or of its `contents` already read, or None when its names are matched
    by heuristics at load."""
    data = read_checkpoint(path, mmap=True) if contents is None else contents
    if data.get("matching_heuristics", False):
        return None
    state = data["model"] if isinstance(data.get("model"), Mapping) else data
    keys = list(state)
    if keys and all(key.startswith(_DDP_PREFIX) for key in keys):  # saved from a DDP-wrapped model
        state = {key[len(_DDP_PREFIX):]: value for key, value in state.items()}
    return state


def _shape(value: Any) -> Optional[Tuple[int, ...]]:
    shape = getattr(value, "shape", None)
    return None if shape is None else tuple(shape)


def _mismatches(state: Mapping[str, Any], layout: ModelLayout, checked: KeyFilter) -> List[Tuple[str, tuple, tuple]]:
    result = []
    for key, value in state.items():
        expected, shape = layout.shapes.get(key), _shape(value)
        if expected is None or shape is None or shape == expected or (checked and not checked(key)):
            continue
        result.append((key, shape, expected))
    return result


def _fit_problem(state: Mapping[str, Any], layout: ModelLayout, checked: KeyFilter) -> Optional[str]:
    """The first reason `state` cannot serve the model (shapes of checked keys, no common key, a
    non-zero MABN mean), as one clause, or None."""
    if state and not any(key in layout.shapes for key in state):
        return (f"none of its {len(state)} keys (first: {next(iter(state))}) is a key of the model this config "
                "builds; ImageNet backbones go through tools/convert_pretrained.py")
    wrong = _mismatches(state, layout, checked)
    if wrong:
        key, shape, expected = wrong[0]
        more = f" (and {len(wrong) - 1} more keys of another shape)" if len(wrong) > 1 else ""
        return (f"it does not fit the model this config builds: {key} is {_dims(shape)} in the file and "
                f"{_dims(expected)} in the model{more}")
    return _non_zero_mean(state, layout)


def _non_zero_mean(state: Mapping[str, Any], layout: ModelLayout) -> Optional[str]:
    for key in layout.zero_means:
        mean = state.get(key)
        if mean is None or _shape(mean) != layout.shapes[key]:
            continue
        mean = torch.as_tensor(mean)
        if bool(torch.count_nonzero(mean)):
            return (f"{key} is a non-zero running_mean (largest magnitude {float(mean.abs().max()):.4g}), but an MABN "
                    "layer's mean is zero by definition: these are BatchNorm statistics; convert BatchNorm weights "
                    "with tools/convert_pretrained.py")
    return None


def _ring_size_change(state: Mapping[str, Any], layout: ModelLayout) -> Optional[Tuple[str, tuple, int]]:
    """(key, its shape in the file, the model's buffer length) for a ring buffer of the same channels
    but another length, or None: MODEL.MABN.BUFFER_SIZE differs from the file's."""
    for key in sorted(layout.ring_buffers):
        shape, expected = _shape(state.get(key)), layout.shapes[key]
        if shape is not None and len(shape) == 2 and shape[1:] == expected[1:] and shape[0] != expected[0]:
            return key, shape, expected[0]
    return None


def _dims(shape: Tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"
