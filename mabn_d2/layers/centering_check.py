"""Whether an MABN2d may train on its input: the check its first training step runs.

MABN normalizes by the second moment only, so the convolution feeding it must be
weight-centralized (`CenteredConv2d`). `mabn_d2.prepare_mabn_model` centralizes the
convolutions it can pair with an MABN layer and marks that layer CENTERED;
`mabn_d2.allow_uncentered` marks layers that train behind plain convolutions on purpose
(ALLOWED). An unmarked layer reads its input's autograd history once, at its first training
step with gradients enabled: an input coming straight out of a convolution whose weight is
the raw parameter (or out of a compiled graph, which hides the convolution) is refused with
`UncenteredInputError`; anything else (a standalone layer fed data, a centralized weight)
marks it CHECKED. Marked layers never look again, so later steps pay one attribute read.
"""
from typing import Any, Optional

import torch

__all__ = ["CENTERED", "ALLOWED", "CHECKED", "UncenteredInputError", "input_centering_problem",
           "uncentered_input_message"]

CENTERED = "centered"  # prepare_mabn_model placed it behind a CenteredConv2d
ALLOWED = "allowed"  # allow_uncentered: plain convolutions in front of it are the user's choice
CHECKED = "checked"  # its first training step found no raw-weight convolution feeding it

# Autograd nodes that only change dtype or copy: autocast's casts of the weight and the input.
_PASS_THROUGH = frozenset({"ToCopyBackward0", "CloneBackward0"})


class UncenteredInputError(RuntimeError):
    """An MABN2d would train behind a convolution that is not weight-centralized."""


def _node_name(node: Any) -> str:
    return type(node).__name__


def _skip_pass_through(node: Any) -> Any:
    while node is not None and _node_name(node) in _PASS_THROUGH and node.next_functions:
        node = node.next_functions[0][0]
    return node


def input_centering_problem(x: torch.Tensor) -> Optional[str]:
    """Why `x` cannot be taken as the output of a weight-centralized convolution, or None.

    Reads the autograd graph only (no device access): the node that produced `x`, and for a
    convolution the node that produced its weight.
    """
    node = _skip_pass_through(x.grad_fn)
    if node is None:
        return None  # no autograd history: fed data, or everything upstream is frozen
    name = _node_name(node)
    if name.startswith("CompiledFunction"):
        return "its input comes out of a torch.compile graph, which hides the convolution that produced it"
    if not name.startswith("ConvolutionBackward"):
        return None  # not a convolution's output: nothing to centralize
    weight = _skip_pass_through(node.next_functions[1][0])
    if weight is None:
        return "the convolution feeding it has a frozen weight, so whether that weight is centralized is unknown"
    if _node_name(weight) == "AccumulateGrad":
        return "the convolution feeding it uses its raw weight (it is not a CenteredConv2d)"
    return None  # a computed weight: centralized (CenteredConv2d) or otherwise transformed


def uncentered_input_message(layer: torch.nn.Module, problem: str) -> str:
    """The error text: what is wrong and the three ways out."""
    return (
        f"{type(layer).__name__}({layer.num_features}) refuses to train: {problem}. MABN normalizes by the "
        "second moment only and needs zero-mean input, which weight-centralized convolutions give. Build the "
        "model with mabn_d2.build_model(cfg) (or MABNTrainer), or call mabn_d2.prepare_mabn_model(model) on "
        "it before training (detectron2's build_model imported before `import mabn_d2`, instantiate of a "
        "LazyConfig and hand-built models skip that pass). To train MABN behind plain convolutions on "
        "purpose, call mabn_d2.allow_uncentered(model)."
    )
