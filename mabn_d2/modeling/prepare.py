"""`prepare_mabn_model`: the MABN-specific steps over a built model, in one explicit pass.

detectron2 builds MABN2d / BatchRenorm2d from a NORM string or a norm callable, and then
treats them like any other norm. Three things it cannot know are done here, on the model:

1. Weight centralization. MABN normalizes by the second moment only, which assumes a
   zero-mean input: every convolution feeding an MABN layer becomes a `CenteredConv2d`, and
   the layer is marked CENTERED (`MABN2d.input_centering`). The pairs are read from the
   structure (a detectron2 `Conv2d` and its `.norm`; a convolution followed by the norm in an
   nn.Sequential) and, for layers still unpaired (torchvision-style models, own modules), from
   a torch.fx trace of the model when it traces. An unmarked layer checks its input at its
   first training step and refuses a raw-weight convolution; `allow_uncentered` is the opt-out.
2. Frozen stages. `ResNet.freeze` (FREEZE_AT) sets requires_grad=False on a stage's parameters
   and converts the BatchNorm classes it knows to FrozenBatchNorm2d, leaving the others alone.
   A norm of the norm table (`mabn_d2.norms`: MABN2d, BatchRenorm2d, ...) whose parameters are
   all frozen is therefore in a frozen stage and becomes the FrozenBatchNorm2d of its eval-mode
   function (iteration counter kept).
3. Shared heads. RetinaNet's head (FCOS's too) applies each norm to every FPN level in turn;
   each such norm of the table becomes one norm per level (`CycleMABNList`), as detectron2 does
   for "BN" with CycleBatchNormList (their convolutions are then centralized by step 1).

The hooked `build_model` runs the pass, so DefaultTrainer, DefaultPredictor and every
`build_model` caller get it; a model built another way (by hand, `instantiate`) calls it.
"""
import logging
from collections import defaultdict
from typing import Dict, Iterable, Iterator, List, Optional, Set, Tuple

import torch.fx
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from torch import nn

from ..layers import CenteredConv2d, MABN2d, centralize_conv_
from ..layers.base import MovingAverageNorm, frozen_batchnorm_from
from ..layers.centering_check import ALLOWED, CENTERED
from ..norms import norm_layer_classes
from .cycle import CycleMABNList

__all__ = ["prepare_mabn_model", "allow_uncentered", "feeds_mabn"]

logger = logging.getLogger(__name__)


def prepare_mabn_model(model: nn.Module) -> nn.Module:
    """Centralize the convolutions feeding MABN, freeze the norms of frozen stages, and give
    shared heads per-level norms; in place, and a second call changes nothing.

    Call it on a model as built, before training: a norm of the table whose parameters are
    all requires_grad=False is taken to belong to a frozen stage. MABN layers opted out with
    `allow_uncentered` keep their plain convolutions. Returns `model`, or, when
    `model` is itself such a norm, the FrozenBatchNorm2d replacing it (as detectron2's
    `FrozenBatchNorm2d.convert_frozen_batchnorm` returns its result).
    """
    _per_level_norms_in_shared_heads(model)
    _centralize_convs_feeding_mabn(model)
    return _freeze_frozen_norms(model)


def feeds_mabn(norm: Optional[nn.Module]) -> bool:
    """Whether a convolution followed by `norm` must be weight-centralized."""
    if isinstance(norm, CycleMABNList):
        return isinstance(norm[0], MABN2d)
    return isinstance(norm, MABN2d)


# ---------------------------------------------------------------- 1. centralization

# (norm unit, name of the convolution feeding it, that convolution)
_Pair = Tuple[nn.Module, str, nn.Module]


def _levels(unit: nn.Module) -> List[MABN2d]:
    """The MABN2d layers of a unit: the layer itself, or the levels of a per-level list."""
    return [m for m in ([unit] if isinstance(unit, MABN2d) else list(unit)) if isinstance(m, MABN2d)]


def _mabn_units(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, unit) for every MABN2d and per-level list of MABN2d; a list's levels are not listed apart."""
    in_lists = {id(level) for m in model.modules() if isinstance(m, CycleMABNList) for level in m}
    return [
        (name, m) for name, m in model.named_modules()
        if (isinstance(m, CycleMABNList) and feeds_mabn(m)) or (isinstance(m, MABN2d) and id(m) not in in_lists)
    ]


def _is_bare_conv(module: Optional[nn.Module]) -> bool:
    """A convolution whose output is the convolution itself (no norm or activation of its own)."""
    return isinstance(module, nn.Conv2d) and getattr(module, "norm", None) is None \
        and getattr(module, "activation", None) is None


def _centralize(name: str, conv: nn.Module) -> bool:
    if isinstance(conv, CenteredConv2d):
        return True
    if type(conv) in (Conv2d, nn.Conv2d):
        centralize_conv_(conv)
        return True
    logger.warning(
        f"{name or type(conv).__name__} ({type(conv).__name__}) feeds an MABN layer but is not a plain "
        "convolution, so its weight is not centralized; MABN assumes zero-mean filters."
    )
    return False


def _norm_attribute_pairs(model: nn.Module) -> Iterator[_Pair]:
    """detectron2 Conv2d whose `.norm` is MABN (or a per-level list of MABN)."""
    for name, module in model.named_modules():
        if isinstance(module, Conv2d) and feeds_mabn(module.norm):
            yield module.norm, name, module


def _sequential_pairs(model: nn.Module) -> Iterator[_Pair]:
    """A bare convolution followed by MABN in an nn.Sequential that runs its children in order."""
    for name, sequential in model.named_modules():
        if not (isinstance(sequential, nn.Sequential) and type(sequential).forward is nn.Sequential.forward):
            continue
        children = list(sequential.named_children())
        for (conv_name, conv), (_, norm) in zip(children, children[1:]):
            if feeds_mabn(norm) and _is_bare_conv(conv):
                yield norm, ".".join(p for p in (name, conv_name) if p), conv


class _LeafTracer(torch.fx.Tracer):
    """Keeps convolutions and norms (the table's, and MABN variants) as single calls: their own
    forward is not traced."""

    _LEAVES = (nn.Conv2d, MovingAverageNorm, CycleMABNList)

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, self._LEAVES + norm_layer_classes()) or super().is_leaf_module(module, qualified_name)


def _traced_pairs(model: nn.Module, wanted: Set[int]) -> Iterator[_Pair]:
    """Pairs from the data flow of a torch.fx trace: a unit every call of which takes a bare
    convolution's output. Nothing when the model does not trace (detectron2's meta-architectures)."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception as error:  # any model code can fail on proxies; the structural pairs stand
        logger.debug(f"prepare_mabn_model: no torch.fx trace of {type(model).__name__}: {error}")
        return
    modules = dict(model.named_modules(remove_duplicate=False))
    feeders: Dict[int, List[Optional[Tuple[str, nn.Module]]]] = defaultdict(list)
    units: Dict[int, nn.Module] = {}
    for node in graph.nodes:
        unit = modules.get(node.target) if node.op == "call_module" else None
        if unit is None or id(unit) not in wanted:
            continue
        source = node.args[0] if node.args else None
        conv = modules.get(source.target) if getattr(source, "op", None) == "call_module" else None
        units[id(unit)] = unit
        feeders[id(unit)].append((source.target, conv) if _is_bare_conv(conv) else None)
    for key, convs in feeders.items():
        if all(convs):
            for conv_name, conv in convs:
                yield units[key], conv_name, conv


def _pending(unit: nn.Module) -> bool:
    """Not yet placed behind a centered convolution, and not opted out."""
    return any(layer.input_centering not in (CENTERED, ALLOWED) for layer in _levels(unit))


def _centralize_pairs(pairs: Iterable[_Pair], pending: Dict[int, Tuple[str, nn.Module]]) -> Set[int]:
    """Centralize the convolution of every pair whose unit is pending; ids of the units seen."""
    seen: Set[int] = set()
    failed: Set[int] = set()
    for unit, conv_name, conv in pairs:
        if id(unit) in pending:
            seen.add(id(unit))
            if not _centralize(conv_name, conv):
                failed.add(id(unit))
    for key in seen - failed:
        for layer in _levels(pending[key][1]):
            layer.input_centering = CENTERED
    return seen


def _centralize_convs_feeding_mabn(model: nn.Module) -> None:
    """Centralize the convolutions feeding MABN, mark those layers, and name the ones left unpaired."""
    units = _mabn_units(model)
    pending = {id(unit): (name, unit) for name, unit in units if _pending(unit)}
    seen = _centralize_pairs(_sequential_pairs(model), pending)
    seen |= _centralize_pairs(_norm_attribute_pairs(model), pending)
    unpaired = {key: entry for key, entry in pending.items() if key not in seen}
    if unpaired:
        seen |= _centralize_pairs(_traced_pairs(model, set(unpaired)), pending)
    left = [name for key, (name, unit) in unpaired.items() if key not in seen and not _in_frozen_stage(unit)]
    _log_centering(units, left)


def _log_centering(units: List[Tuple[str, nn.Module]], unpaired: List[str]) -> None:
    if not units:
        return
    layers = [layer for _, unit in units for layer in _levels(unit)]
    centered = sum(layer.input_centering == CENTERED for layer in layers)
    allowed = sum(layer.input_centering == ALLOWED for layer in layers)
    logger.info(f"prepare_mabn_model: {centered} of {len(layers)} MABN2d layers train behind weight-centralized "
                f"convolutions; {allowed} behind plain ones by choice (allow_uncentered).")
    if unpaired:
        shown = ", ".join(name or "<model>" for name in unpaired[:5]) + (", ..." if len(unpaired) > 5 else "")
        logger.warning(
            f"prepare_mabn_model: found no convolution feeding {len(unpaired)} MABN layer(s) ({shown}); a "
            "raw-weight convolution in front of one stops training at its first step. Centralize it "
            "(mabn_d2.layers.centralize_conv_) or opt out with mabn_d2.allow_uncentered(model)."
        )


def allow_uncentered(model: nn.Module) -> nn.Module:
    """Let `model`'s MABN2d layers train behind convolutions that are not weight-centralized.

    The official MABN code allows plain convolutions; this makes that choice explicit, and logs
    how many layers it covers. Layers already behind a centered convolution stay so. Called
    before `prepare_mabn_model`, the pass then leaves those layers' convolutions plain. Returns `model`.
    """
    layers = [m for m in model.modules() if isinstance(m, MABN2d) and m.input_centering != CENTERED]
    for layer in layers:
        layer.input_centering = ALLOWED
    logger.warning(f"allow_uncentered: {len(layers)} MABN2d layer(s) may train behind convolutions that are not "
                   "weight-centralized; MABN's zero-mean assumption is not enforced for them.")
    return model


# ---------------------------------------------------------------- 2. frozen stages


def _in_frozen_stage(module: nn.Module) -> bool:
    """A norm of the table whose own parameters exist and are all frozen."""
    if not isinstance(module, norm_layer_classes()):
        return False
    params = list(module.parameters(recurse=False))
    return bool(params) and not any(p.requires_grad for p in params)


def _frozen_from(norm: nn.Module) -> FrozenBatchNorm2d:
    """The FrozenBatchNorm2d computing `norm`'s eval-mode function; the counter is kept."""
    frozen = frozen_batchnorm_from(norm)
    frozen.num_batches_tracked = norm.num_batches_tracked.detach().clone()
    return frozen


def _freeze_frozen_norms(model: nn.Module) -> nn.Module:
    if _in_frozen_stage(model):
        return _frozen_from(model)
    targets = [
        (parent, child_name, child)
        for parent in model.modules()
        for child_name, child in parent.named_children()
        if _in_frozen_stage(child)
    ]
    replacements: Dict[int, FrozenBatchNorm2d] = {}  # a norm registered twice stays one module
    for parent, child_name, child in targets:
        frozen = replacements.setdefault(id(child), _frozen_from(child))
        setattr(parent, child_name, frozen)
    return model


# ---------------------------------------------------------------- 3. shared heads


def _levels_by_head(model: nn.Module) -> Dict[int, int]:
    """id(head) -> how many feature levels its detector feeds it (DenseDetector.head_in_features)."""
    levels = {}
    for module in model.modules():
        head, features = getattr(module, "head", None), getattr(module, "head_in_features", None)
        if isinstance(head, RetinaNetHead) and features is not None:
            levels[id(head)] = len(features)
    return levels


def _level_count(name: str, head: RetinaNetHead, levels_by_head: Dict[int, int]) -> int:
    levels = levels_by_head.get(id(head))
    if levels is None:
        # A head prepared on its own, outside its detector: detectron2 keeps the count only here.
        levels = getattr(head, "_num_features", None)
    if not levels:
        raise ValueError(
            f"prepare_mabn_model: cannot tell how many feature levels share {name or 'the head'}; "
            "prepare the detector that owns it"
        )
    return levels


def _shared_norm_slots(head: nn.Module) -> Iterator[Tuple[nn.Sequential, int, nn.Module]]:
    table_norms = norm_layer_classes()
    for sequential in head.modules():
        if isinstance(sequential, nn.Sequential):
            for index, layer in enumerate(sequential):
                if isinstance(layer, table_norms):
                    yield sequential, index, layer


def _per_level_norms_in_shared_heads(model: nn.Module) -> None:
    levels_by_head = _levels_by_head(model)
    heads: List[Tuple[str, RetinaNetHead]] = [
        (name, m) for name, m in model.named_modules() if isinstance(m, RetinaNetHead)
    ]
    for name, head in heads:
        slots = list(_shared_norm_slots(head))
        if slots:
            levels = _level_count(name, head, levels_by_head)
            logger.info(f"Using per-level {type(slots[0][2]).__name__} in {type(head).__name__} with len={levels}.")
        for sequential, index, norm in slots:
            sequential[index] = CycleMABNList.from_shared(norm, levels)
