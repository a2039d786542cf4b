"""`prepare_mabn_model`: the MABN-specific steps over a built model, in one explicit pass.

detectron2 builds MABN2d / BatchRenorm2d from a NORM string or a norm callable, and then
treats them like any other norm. Three things it cannot know are done here, on the model:

1. Weight centralization. MABN normalizes by the second moment only, which assumes a
   zero-mean input: every convolution feeding an MABN layer becomes a `CenteredConv2d`.
2. Frozen stages. `ResNet.freeze` (FREEZE_AT) sets requires_grad=False on a stage's parameters
   and converts the BatchNorm classes it knows to FrozenBatchNorm2d, leaving the others alone.
   A moving-average norm whose parameters are all frozen is therefore in a frozen stage and
   becomes the FrozenBatchNorm2d of its eval-mode function (iteration counter kept).
3. Shared heads. RetinaNet's head (FCOS's too) applies each norm to every FPN level in turn;
   each such norm becomes one norm per level (`CycleMABNList`), as detectron2 does for "BN"
   with CycleBatchNormList, and the convolutions before MABN ones are centralized.

The hooked `build_model` runs the pass, so DefaultTrainer, DefaultPredictor and every
`build_model` caller get it; a model built another way (by hand, `instantiate`) calls it.
"""
import logging
from typing import Dict, Iterator, List, Optional, Tuple

from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from torch import nn

from ..layers import BatchRenorm2d, CenteredConv2d, MABN2d, centralize_conv_
from ..layers.base import frozen_batchnorm_from
from .cycle import CycleMABNList

__all__ = ["prepare_mabn_model", "MOVING_AVERAGE_NORMS", "feeds_mabn"]

logger = logging.getLogger(__name__)

# The norms this pass freezes and gives per-level statistics in shared heads.
MOVING_AVERAGE_NORMS: Tuple[type, ...] = (MABN2d, BatchRenorm2d)


def prepare_mabn_model(model: nn.Module) -> nn.Module:
    """Centralize the convolutions feeding MABN, freeze the norms of frozen stages, and give
    shared heads per-level norms; in place, and a second call changes nothing.

    Call it on a model as built, before training: a moving-average norm whose parameters are
    all requires_grad=False is taken to belong to a frozen stage. Returns `model`, or, when
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


def _centralize(name: str, conv: nn.Module) -> None:
    if isinstance(conv, CenteredConv2d):
        return
    if type(conv) in (Conv2d, nn.Conv2d):
        centralize_conv_(conv)
        return
    logger.warning(
        f"{name or type(conv).__name__} ({type(conv).__name__}) feeds an MABN layer but is not a plain "
        "convolution, so its weight is not centralized; MABN assumes zero-mean filters."
    )


def _centralize_convs_feeding_mabn(model: nn.Module) -> None:
    """detectron2 Conv2d whose `.norm` is MABN (or a per-level list of MABN)."""
    for name, module in model.named_modules():
        if isinstance(module, Conv2d) and feeds_mabn(module.norm):
            _centralize(name, module)


# ---------------------------------------------------------------- 2. frozen stages


def _in_frozen_stage(module: nn.Module) -> bool:
    """A moving-average norm whose own parameters exist and are all frozen."""
    if not isinstance(module, MOVING_AVERAGE_NORMS):
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
    for sequential in head.modules():
        if isinstance(sequential, nn.Sequential):
            for index, layer in enumerate(sequential):
                if isinstance(layer, MOVING_AVERAGE_NORMS):
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
        for path, sequential in head.named_modules():
            if isinstance(sequential, nn.Sequential):
                layers = list(sequential)
                for index, (conv, norm) in enumerate(zip(layers, layers[1:])):
                    if isinstance(conv, nn.Conv2d) and feeds_mabn(norm):
                        _centralize(".".join(p for p in (name, path, str(index)) if p), conv)
