"""Fold trained MABN layers into the layers stock detectron2 runs at inference.

In eval mode an MABN layer is the frozen affine ``weight * x / sqrt(running_var + eps) + bias``
and a centered convolution is a plain convolution whose weight happens to be centered. Folding
makes that explicit, in the spirit of ``torch.nn.utils.fusion``: pure functions on tensors,
and a model pass that refuses training-mode models and never mutates its input.

Two forms:

* ``"frozen"``: every ``MABN2d`` becomes detectron2's ``FrozenBatchNorm2d`` (running_mean 0),
  as does every layer of another norm of the table that folds (`mabn_d2.norms.NormSpec.fold`),
  and every ``CenteredConv2d`` a detectron2 ``Conv2d`` holding the centered weight. The
  state_dict loads into a stock model built with NORM "FrozenBN" and, under torch.no_grad,
  gives the same outputs bit for bit (the same ops run on the same numbers).
* ``"fused"``: the affine also goes into the weight and bias of the convolution feeding it, so
  the norm costs nothing (export and deployment; not loadable into a stock config). Only MABN2d
  is fused; the layers of other table norms stay a frozen affine (listed as unfused).

Per-level norms (a module list of MABN2d applied in turn to the FPN levels of a RetinaNet head,
after an optional shared affine as in detectron2's ``CycleBatchNormList``): stock RetinaNetHead
with NORM "FrozenBN" has one norm shared by all levels, so a list is collapsed into one
``FrozenBatchNorm2d`` when every level folds to the same affine. Trained levels differ; then
the list is kept per level as detectron2's own ``CycleBatchNormList`` of eval-mode
``BatchNorm2d`` (running_mean 0, running_var of the level), which is exactly what stock
detectron2 builds for RETINANET.NORM "BN". Both forms compute the same per-level affine; the
report says which was used so the config can name the matching norm. A per-level list cannot be
fused into its convolution, which all levels share; it stays a frozen per-level affine.
"""
import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.layers import Conv2d, CycleBatchNormList, FrozenBatchNorm2d
from torch import nn

from ..layers import CenteredConv2d, MABN2d, centered_weight
from ..layers.base import frozen_batchnorm_from
from ..norms import folded_norm_names, norm_spec

__all__ = [
    "FOLD_MODES",
    "FoldReport",
    "centered_weight",
    "fold_affine_into_conv",
    "fold_mabn",
    "is_per_level_mabn",
    "mabn_to_affine",
]

FOLD_MODES = ("frozen", "fused")


def mabn_to_affine(
    running_var: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) such that eval-mode MABN is ``scale * x + shift`` per channel."""
    scale = weight * torch.rsqrt(running_var + eps)
    return scale, bias.clone()


def fold_affine_into_conv(
    conv_w: torch.Tensor, conv_b: Optional[torch.Tensor], scale: torch.Tensor, shift: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(w, b) with ``conv(x, w, b) == scale * conv(x, conv_w, conv_b) + shift`` per output channel.

    Computed in float64 and rounded once to conv_w's dtype, so folding adds one rounding
    per weight rather than one per operation.
    """
    shape = (-1,) + (1,) * (conv_w.dim() - 1)
    scale64, shift64 = scale.double(), shift.double()
    w = conv_w.double() * scale64.reshape(shape)
    b = shift64 if conv_b is None else shift64 + scale64 * conv_b.double()
    return w.to(conv_w.dtype), b.to(conv_w.dtype)


@dataclass
class FoldReport:
    """What `fold_mabn` changed, by module name (names in the folded model)."""

    mode: str
    frozen_norms: List[str] = field(default_factory=list)  # MABN2d (a table norm that folds) -> FrozenBatchNorm2d
    plain_convs: List[str] = field(default_factory=list)  # CenteredConv2d -> Conv2d
    fused_convs: List[str] = field(default_factory=list)  # conv absorbed the MABN affine
    per_level_norms: List[str] = field(default_factory=list)  # kept per level (CycleBatchNormList)
    collapsed_norms: List[str] = field(default_factory=list)  # per-level list -> one FrozenBatchNorm2d
    unfused_norms: Dict[str, str] = field(default_factory=dict)  # fused mode: name -> why not fused

    def summary(self) -> str:
        parts = [
            f"{len(self.frozen_norms)} MABN -> FrozenBatchNorm2d",
            f"{len(self.plain_convs)} centered convs -> Conv2d",
            f"{len(self.fused_convs)} fused convs",
        ]
        if self.per_level_norms:
            parts.append(f"{len(self.per_level_norms)} per-level norms kept per level")
        if self.collapsed_norms:
            parts.append(f"{len(self.collapsed_norms)} per-level norms collapsed")
        if self.unfused_norms:
            parts.append(f"{len(self.unfused_norms)} norms left unfused")
        return f"fold_mabn({self.mode}): " + ", ".join(parts)


def is_per_level_mabn(module: nn.Module) -> bool:
    """A module list of MABN2d cycled over input levels (one statistic set per level)."""
    return isinstance(module, nn.ModuleList) and len(module) > 0 and all(isinstance(m, MABN2d) for m in module)


def fold_mabn(model: nn.Module, mode: str = "frozen", strict: bool = False) -> Tuple[nn.Module, FoldReport]:
    """A folded deep copy of eval-mode `model` and a report of what was folded.

    mode "frozen" keeps one frozen affine per norm; "fused" folds each norm into the conv
    feeding it. In fused mode a norm with no foldable conv right before it stays a frozen
    affine and is listed in ``report.unfused_norms``; ``strict=True`` raises instead.
    """
    if mode not in FOLD_MODES:
        raise ValueError(f"fold_mabn: mode must be one of {FOLD_MODES}, got {mode!r}")
    _require_eval(model)
    # A parent for every module to be replaced, `model` itself included (a bare MABN2d).
    root = nn.Sequential(copy.deepcopy(model))
    report = FoldReport(mode=mode)
    with torch.no_grad():
        _fold_per_level_lists(root, report)
        if mode == "fused":
            _fuse_convs(root, report)
        _freeze_norms(root, report)
        _uncenter_convs(root, report)
    report = _without_root_prefix(report)
    if strict and report.unfused_norms:
        raise ValueError(
            "fold_mabn(fused, strict=True): no foldable convolution before "
            + "; ".join(f"{name or type(model).__name__} ({why})" for name, why in report.unfused_norms.items())
        )
    return root[0], report


def _without_root_prefix(report: FoldReport) -> FoldReport:
    def strip(name: str) -> str:
        return "" if name == "0" else name[2:]

    return FoldReport(
        mode=report.mode,
        frozen_norms=[strip(n) for n in report.frozen_norms],
        plain_convs=[strip(n) for n in report.plain_convs],
        fused_convs=[strip(n) for n in report.fused_convs],
        per_level_norms=[strip(n) for n in report.per_level_norms],
        collapsed_norms=[strip(n) for n in report.collapsed_norms],
        unfused_norms={strip(n): why for n, why in report.unfused_norms.items()},
    )


def _require_eval(model: nn.Module) -> None:
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        shown = ", ".join(training[:5]) + (" ..." if len(training) > 5 else "")
        raise ValueError(
            f"fold_mabn: {type(model).__name__} is in training mode ({shown}); folding uses the "
            "eval-mode form of MABN, call model.eval() first"
        )


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where submodule `name` is, also in plain lists/tuples/dicts of any module.

    Some detectron2 modules keep a second, unregistered reference to their children (FPN's
    `lateral_convs` / `output_convs` lists); replacing only the registered one would leave
    forward() running the old layer.
    """
    old = root.get_submodule(name)
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
    for module in root.modules():
        for key, value in list(vars(module).items()):
            if key in ("_modules", "_parameters", "_buffers"):
                continue
            if isinstance(value, list):
                value[:] = [new if item is old else item for item in value]
            elif type(value) is tuple and any(item is old for item in value):
                object.__setattr__(module, key, tuple(new if item is old else item for item in value))
            elif isinstance(value, dict):
                for k, item in value.items():
                    if item is old:
                        value[k] = new


def _make_plain_(conv: nn.Conv2d, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """Give `conv` (in place, so every reference sees it) `weight` and `bias`; a CenteredConv2d
    becomes a detectron2 Conv2d, the inverse of `centralize_conv_`."""
    if isinstance(conv, CenteredConv2d):
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"fold_mabn: padding_mode {conv.padding_mode!r} is not supported (detectron2 Conv2d pads with zeros)"
            )
        conv.__class__ = Conv2d
    conv.weight.copy_(weight)
    if bias is None:
        return
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(bias)


def _conv_weight(conv: nn.Conv2d) -> torch.Tensor:
    return centered_weight(conv.weight) if isinstance(conv, CenteredConv2d) else conv.weight


def _level_affines(levels: nn.ModuleList) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per-level (scale, shift) of a per-level list, its shared affine (if any) applied last."""
    shared_w, shared_b = getattr(levels, "weight", None), getattr(levels, "bias", None)
    affines = []
    for norm in levels:
        scale, shift = mabn_to_affine(norm.running_var, norm.weight, norm.bias, norm.eps)
        if shared_w is not None:
            scale, shift = scale * shared_w, shift * shared_w + shared_b
        affines.append((scale, shift))
    return affines


def _fold_per_level_lists(model: nn.Module, report: FoldReport) -> None:
    lists = [(name, m) for name, m in model.named_modules() if is_per_level_mabn(m)]
    if not lists:
        return
    collapsible = all(
        all(torch.equal(a[0], affines[0][0]) and torch.equal(a[1], affines[0][1]) for a in affines)
        for affines in (_level_affines(m) for _, m in lists)
    )
    # One decision for all lists: the config names a single RETINANET.NORM for the whole head.
    for name, levels in lists:
        if collapsible:
            _replace(model, name, _collapsed(levels))
            report.collapsed_norms.append(name)
        else:
            _replace(model, name, _cycle_list(levels))
            report.per_level_norms.append(name)


def _collapsed(levels: nn.ModuleList) -> FrozenBatchNorm2d:
    """One FrozenBatchNorm2d holding the (common) affine of every level."""
    first = levels[0]
    if getattr(levels, "weight", None) is None:
        return frozen_batchnorm_from(first)
    # shared_w * (w * x / s + b) + shared_b, with the level's running_var kept as it is.
    frozen = frozen_batchnorm_from(first)
    frozen.weight.copy_(first.weight * levels.weight)
    frozen.bias.copy_(first.bias * levels.weight + levels.bias)
    return frozen


def _cycle_list(levels: nn.ModuleList) -> CycleBatchNormList:
    """detectron2's CycleBatchNormList (eval-mode BN per level, shared affine), same outputs."""
    first = levels[0]
    shared_w, shared_b = getattr(levels, "weight", None), getattr(levels, "bias", None)
    per_level_affine = any(
        not (torch.all(norm.weight == 1) and torch.all(norm.bias == 0)) for norm in levels
    )
    if per_level_affine and shared_w is not None:
        raise ValueError(
            "fold_mabn: a per-level MABN list with both per-level and shared affine parameters "
            "has no CycleBatchNormList form"
        )
    if per_level_affine and not all(
        torch.equal(norm.weight, first.weight) and torch.equal(norm.bias, first.bias) for norm in levels
    ):
        raise ValueError(
            "fold_mabn: per-level MABN layers with different affine parameters have no "
            "CycleBatchNormList form (it shares one affine across levels)"
        )
    cycle = CycleBatchNormList(len(levels), num_features=first.num_features, eps=first.eps)
    cycle.to(device=first.running_var.device, dtype=first.running_var.dtype)
    weight = shared_w if shared_w is not None else first.weight
    bias = shared_b if shared_b is not None else first.bias
    cycle.weight.requires_grad_(False).copy_(weight)
    cycle.bias.requires_grad_(False).copy_(bias)
    for bn, norm in zip(cycle, levels):
        bn.running_mean.zero_()
        bn.running_var.copy_(norm.running_var)
        bn.num_batches_tracked.copy_(norm.num_batches_tracked)
    cycle._pos = getattr(levels, "_pos", 0)
    return cycle.eval()


def _fuse_convs(model: nn.Module, report: FoldReport) -> None:
    """Fold each MABN2d into the conv right before it: conv.norm, or the previous Sequential entry.

    A per-level list collapsed into one FrozenBatchNorm2d is one affine for all levels, so it
    folds into the shared conv before it too.
    """
    collapsed = set(report.collapsed_norms)
    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if isinstance(module, Conv2d) and isinstance(module.norm, MABN2d):
            _fuse_into(module, module.norm)
            module.norm = None
            report.fused_convs.append(name)
        elif isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
                mabn_like = isinstance(norm, MABN2d) or prefix + norm_name in collapsed
                if mabn_like and _foldable_conv(conv):
                    _fuse_into(conv, norm)
                    _replace(model, prefix + norm_name, nn.Identity())
                    report.fused_convs.append(prefix + conv_name)
    for name, module in model.named_modules():
        if isinstance(module, MABN2d):
            report.unfused_norms[name] = "no convolution feeds it directly"
        elif isinstance(module, _folded_classes()):
            report.unfused_norms[name] = f"only MABN2d is fused; {type(module).__name__} stays a frozen affine"
        elif name in collapsed and isinstance(module, FrozenBatchNorm2d):
            report.unfused_norms[name] = "collapsed per-level norm with no convolution right before it"
    for name in report.per_level_norms:
        report.unfused_norms[name] = "per-level statistics after a convolution shared by all levels"


def _fuse_into(conv: nn.Conv2d, norm: nn.Module) -> None:
    weight, bias = fold_affine_into_conv(_conv_weight(conv), conv.bias, *_affine64(norm))
    _make_plain_(conv, weight, bias)


def _affine64(norm: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of an MABN2d or FrozenBatchNorm2d, in float64."""
    scale, shift = mabn_to_affine(norm.running_var.double(), norm.weight.double(), norm.bias.double(), norm.eps)
    if isinstance(norm, FrozenBatchNorm2d):
        shift = shift - norm.running_mean.double() * scale
    return scale, shift


def _foldable_conv(module: nn.Module) -> bool:
    """A 2-D conv whose output goes straight to the next module (no norm/activation of its own)."""
    return (
        isinstance(module, nn.Conv2d)
        and getattr(module, "norm", None) is None
        and getattr(module, "activation", None) is None
    )


def _folded_classes() -> Tuple[type, ...]:
    """The layers of the table's norms that fold (MABN2d, ...): in eval mode each is a FrozenBatchNorm2d."""
    return tuple(norm_spec(name).layer for name in folded_norm_names())


def _freeze_norms(model: nn.Module, report: FoldReport) -> None:
    folded = _folded_classes()
    for name, module in list(model.named_modules()):
        if isinstance(module, folded):
            _replace(model, name, frozen_batchnorm_from(module))
            report.frozen_norms.append(name)
        elif isinstance(module, FrozenBatchNorm2d):
            # Stages frozen at build time may carry their norm's counter; stock FrozenBN has none,
            # and its state_dict must match a stock model's key for key.
            module.num_batches_tracked = None


def _uncenter_convs(model: nn.Module, report: FoldReport) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, CenteredConv2d):
            _make_plain_(module, centered_weight(module.weight), None)
            report.plain_convs.append(name)
