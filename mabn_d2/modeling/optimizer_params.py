"""MABN's and BRN's affine parameters get from detectron2's optimizer what BatchNorm2d's get.

`detectron2.solver.get_default_optimizer_params` gives SOLVER.WEIGHT_DECAY_NORM to the
parameters of the norm classes listed inside the function (an isinstance check with no hook),
so without help MABN2d / BatchRenorm2d parameters would take SOLVER.WEIGHT_DECAY. The hook
installed by `register_norms` wraps that function: it runs the original, then gives every
parameter owned by a norm of the norm table (or a per-level list's shared affine) the norm weight
decay, unless an override by parameter name (WEIGHT_DECAY_BIAS for "bias") sets one, exactly
the order detectron2 applies to BN. The learning rate (BIAS_LR_FACTOR by name,
lr_factor_func) is already the same as BN's and is left untouched.
"""
import functools
import inspect
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from detectron2.solver.build import reduce_param_groups
from torch import nn

from ..norms import norm_layer_classes
from .cycle import CycleMABNList

__all__ = ["norm_parameter_owners", "extend_get_default_optimizer_params", "norm_weight_decay"]


def norm_parameter_owners() -> Tuple[type, ...]:
    """Modules whose own parameters are a norm's affine (detectron2 would call them norm parameters):
    the norm table's layers and the per-level lists' shared affine."""
    return norm_layer_classes() + (CycleMABNList,)


def _norm_parameter_names(model: nn.Module) -> Dict[int, str]:
    """id(parameter) -> its name in its norm module ("weight", "bias")."""
    owners = norm_parameter_owners()
    return {
        id(p): name for module in model.modules() if isinstance(module, owners)
        for name, p in module.named_parameters(recurse=False)
    }


def _per_parameter(groups: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    items = []
    for group in groups:
        settings = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        names = group.get("param_names")
        for index, param in enumerate(group["params"]):
            item = {**settings, "params": [param]}
            if names is not None:
                item["param_names"] = [names[index]]
            items.append(item)
    return items


def norm_weight_decay(
    groups: List[Dict[str, Any]], model: nn.Module, weight_decay_norm: Optional[float],
    overrides: Mapping[str, Mapping[str, float]],
) -> List[Dict[str, Any]]:
    """`groups` with the moving-average norms' parameters given `weight_decay_norm`, as BN's are."""
    owners = _norm_parameter_names(model)
    if weight_decay_norm is None or not owners:
        return groups
    items = _per_parameter(groups)
    for item in items:
        name = owners.get(id(item["params"][0]))
        if name is not None and "weight_decay" not in overrides.get(name, {}):
            item["weight_decay"] = weight_decay_norm
    return reduce_param_groups(items)


def extend_get_default_optimizer_params(original: Callable) -> Callable:
    """Wrap detectron2's `get_default_optimizer_params` (see the module docstring)."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def get_default_optimizer_params(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if bound.arguments["overrides"] is None:
            bound.arguments["overrides"] = {}  # the original adds the "bias" override to it: read it after
        groups = original(*bound.args, **bound.kwargs)
        arguments = bound.arguments
        return norm_weight_decay(groups, arguments["model"], arguments["weight_decay_norm"], arguments["overrides"])

    return get_default_optimizer_params
