"""detectron2 glue: the NORM strings "MABN" and "BRN", centralization at build, freezing, RetinaNet.

detectron2 resolves NORM strings in `get_norm`, whose name table is a literal inside the
function and which every caller binds at import. `register_norms` therefore wraps `get_norm`
once and rebinds every module attribute that still holds the original (new importers get the
wrapper from `detectron2.layers`). The hooks, each installed once:

- `get_norm`: "MABN" -> MABN2d, "BRN" -> BatchRenorm2d; every other value is delegated.
- `build_model`: runs the build inside a context holding cfg.MODEL.MABN / cfg.MODEL.BRN, since
  `get_norm` never sees the cfg (`mabn_build_context` is the same context for hand-built models).
- `Conv2d.__init__`: a detectron2 Conv2d built with an MABN norm becomes a CenteredConv2d, so
  exactly the convolutions feeding MABN are weight-centralized, before any stage is frozen.
- `FrozenBatchNorm2d.convert_frozen_batchnorm`: also freezes MABN2d / BatchRenorm2d (it only
  knows BatchNorm classes), so FREEZE_AT freezes MABN stages instead of silently training them.
- `RetinaNetHead.__init__`: per-level statistics (`CycleMABNList`) for the head shared across FPN
  levels, as detectron2 does for "BN", with centralized convolutions.
"""
import contextlib
import functools
import inspect
import logging
import sys
import threading
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

from detectron2.config import CfgNode, configurable
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.layers import batch_norm as _d2_batch_norm
from detectron2.modeling.meta_arch import build as _d2_build
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from torch import nn

from .config import brn_kwargs_from_cfg, mabn_kwargs_from_cfg, validate_mabn_config
from .cycle import CycleMABNList
from .layers import BatchRenorm2d, CenteredConv2d, MABN2d, centralize_conv_
from .layers.base import frozen_batchnorm_from

__all__ = ["register_norms", "mabn_build_context", "brn_build_context", "build_context_from_cfg", "NORMS"]

logger = logging.getLogger(__name__)

_HOOK_MARK = "_mabn_d2_hook"
_LOCK = threading.Lock()
_FREEZABLE = (MABN2d, BatchRenorm2d)

# Keyword arguments for the layers that "MABN" / "BRN" build; empty means the layer defaults.
_MABN_KWARGS: ContextVar[Mapping[str, Any]] = ContextVar("mabn_d2_mabn_kwargs", default=MappingProxyType({}))
_BRN_KWARGS: ContextVar[Mapping[str, Any]] = ContextVar("mabn_d2_brn_kwargs", default=MappingProxyType({}))


# ---------------------------------------------------------------- build contexts


def _layer_arguments(cls: type) -> set:
    params = list(inspect.signature(cls.__init__).parameters)
    return set(params[2:])  # drop self, num_features


@contextlib.contextmanager
def _layer_context(var: ContextVar, cls: type, kwargs: Dict[str, Any], context_name: str) -> Iterator[None]:
    unknown = sorted(set(kwargs) - _layer_arguments(cls))
    if unknown:
        raise TypeError(
            f"{context_name}: unknown {cls.__name__} argument(s) {unknown}; "
            f"expected some of {sorted(_layer_arguments(cls))}"
        )
    merged = {**var.get(), **kwargs}
    cls(1, **merged)  # fail here, not at the first layer deep inside a model build
    token = var.set(MappingProxyType(merged))
    try:
        yield
    finally:
        var.reset(token)


@contextlib.contextmanager
def mabn_build_context(**kwargs: Any) -> Iterator[None]:
    """MABN2d keyword arguments for every "MABN" norm built inside (e.g. ``buffer_size=8``).

    `get_norm` never sees a cfg; `build_model` enters this context from cfg.MODEL.MABN, and
    models built by hand or from a LazyConfig can use it directly. Nested contexts override
    the enclosing one key by key; outside any context the MABN2d defaults apply.
    """
    with _layer_context(_MABN_KWARGS, MABN2d, kwargs, "mabn_build_context"):
        yield


@contextlib.contextmanager
def brn_build_context(**kwargs: Any) -> Iterator[None]:
    """Like `mabn_build_context`, for the BatchRenorm2d layers that "BRN" builds."""
    with _layer_context(_BRN_KWARGS, BatchRenorm2d, kwargs, "brn_build_context"):
        yield


def _has_section(cfg: Any, name: str) -> bool:
    model = getattr(cfg, "MODEL", None)
    return model is not None and name in model


@contextlib.contextmanager
def build_context_from_cfg(cfg: CfgNode) -> Iterator[None]:
    """Enter the MABN / BRN contexts from cfg.MODEL.MABN / cfg.MODEL.BRN, after validating them.

    A cfg without those sections (add_mabn_config not called) changes nothing: the enclosing
    context, or the layer defaults, apply.
    """
    validate_mabn_config(cfg)
    with contextlib.ExitStack() as stack:
        if _has_section(cfg, "MABN"):
            stack.enter_context(mabn_build_context(**mabn_kwargs_from_cfg(cfg)))
        if _has_section(cfg, "BRN"):
            stack.enter_context(brn_build_context(**brn_kwargs_from_cfg(cfg)))
        yield


# ---------------------------------------------------------------- the norm names


def _build_mabn(channels: int) -> MABN2d:
    return MABN2d(channels, **_MABN_KWARGS.get())


def _build_brn(channels: int) -> BatchRenorm2d:
    return BatchRenorm2d(channels, **_BRN_KWARGS.get())


NORMS: Mapping[str, Callable[[int], nn.Module]] = MappingProxyType({"MABN": _build_mabn, "BRN": _build_brn})


def _feeds_mabn(norm: Optional[nn.Module]) -> bool:
    """Whether a convolution followed by `norm` must be weight-centralized."""
    if isinstance(norm, CycleMABNList):
        return isinstance(norm[0], MABN2d)
    return isinstance(norm, MABN2d)


# ---------------------------------------------------------------- hooks (each wraps the original)


def _mark(fn: Callable) -> Callable:
    setattr(fn, _HOOK_MARK, True)
    return fn


def _is_hooked(fn: Any) -> bool:
    """Whether our hook is `fn` or anywhere in its __wrapped__ chain (another wrapper on top)."""
    seen = 0
    while fn is not None and seen < 32:
        if getattr(fn, _HOOK_MARK, False):
            return True
        fn, seen = getattr(fn, "__wrapped__", None), seen + 1
    return False


def _extend_get_norm(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_norm(norm, out_channels):
        if isinstance(norm, str) and norm in NORMS:
            return NORMS[norm](out_channels)
        return original(norm, out_channels)

    return _mark(get_norm)


def _build_in_cfg_context(original: Callable) -> Callable:
    @functools.wraps(original)
    def build_model(cfg):
        with build_context_from_cfg(cfg):
            return original(cfg)

    return _mark(build_model)


def _centralize_at_init(original: Callable) -> Callable:
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if not _feeds_mabn(getattr(self, "norm", None)) or isinstance(self, CenteredConv2d):
            return
        if type(self) is Conv2d:
            centralize_conv_(self)
        else:
            logger.warning(
                f"{type(self).__name__} feeds an MABN layer but is not a plain detectron2 Conv2d, "
                "so its weight is not centralized; MABN assumes zero-mean filters."
            )

    return _mark(__init__)


def _frozen_from(cls: type, norm: nn.Module) -> nn.Module:
    """A FrozenBatchNorm2d computing `norm`'s eval-mode function (MABN: running_mean is 0)."""
    frozen = frozen_batchnorm_from(norm, cls)
    frozen.num_batches_tracked = norm.num_batches_tracked.detach().clone()
    return frozen


def _freeze_mabn_too(original: Callable) -> Callable:
    @functools.wraps(original)
    def convert_frozen_batchnorm(cls, module):
        if isinstance(module, _FREEZABLE):
            return _frozen_from(cls, module)
        return original(cls, module)  # recurses through cls.convert_frozen_batchnorm, i.e. here

    return _mark(convert_frozen_batchnorm)


def _per_level_factory(norm: Any) -> Optional[Callable[[int], nn.Module]]:
    """A per-level norm factory when `norm` resolves to MABN2d / BatchRenorm2d, else None."""
    if not norm or (isinstance(norm, str) and norm not in NORMS):
        return None
    get_norm = _d2_batch_norm.get_norm
    if isinstance(norm, str) or isinstance(get_norm(norm, 32), _FREEZABLE):
        return functools.partial(get_norm, norm)
    return None


def _insert_per_level_norms(subnet: nn.Sequential, levels: int, factory: Callable) -> nn.Sequential:
    """[conv, relu]* -> [conv, norm, relu]*: the module indices of the subnet built with a norm."""
    layers = []
    for layer in subnet:
        layers.append(layer)
        if isinstance(layer, nn.Conv2d):
            norm = CycleMABNList(levels, layer.out_channels, norm_class=factory)
            if _feeds_mabn(norm):
                centralize_conv_(layer)
            layers.append(norm)
    return nn.Sequential(*layers)


def _per_level_retinanet_init(configurable_init: Callable) -> Callable:
    raw_init = configurable_init.__wrapped__  # the __init__ under @configurable

    def __init__(self, *, norm="", **kwargs):
        factory = _per_level_factory(norm)
        if factory is None:
            raw_init(self, norm=norm, **kwargs)
            return
        # Built without a norm (no shared-BN warning), then given one norm list per conv.
        raw_init(self, norm="", **kwargs)
        levels = self._num_features
        logger.info(f"Using per-level {norm} in RetinaNetHead with len={levels}.")
        self.cls_subnet = _insert_per_level_norms(self.cls_subnet, levels, factory)
        self.bbox_subnet = _insert_per_level_norms(self.bbox_subnet, levels, factory)

    __init__.__doc__ = raw_init.__doc__
    __init__.__signature__ = inspect.signature(raw_init)  # keep the documented keyword arguments
    return _mark(configurable(__init__))


def _original_of(fn: Callable) -> Callable:
    """The function our hook wraps, also when another wrapper sits on top of our hook."""
    while not getattr(fn, _HOOK_MARK, False):
        fn = fn.__wrapped__
    return fn.__wrapped__


def _hook_function(module: Any, name: str, make_hook: Callable[[Callable], Callable]) -> Tuple[Callable, Callable]:
    """Hook `module.name` once; returns (original, the function now bound there)."""
    current = getattr(module, name)
    if _is_hooked(current):
        return _original_of(current), current
    hook = make_hook(current)
    setattr(module, name, hook)
    return current, hook


def _rebind_everywhere(pairs: List[Tuple[Callable, Callable]]) -> None:
    """Point every module attribute that holds an original function at its hook."""
    hooks = {id(original): (original, hook) for original, hook in pairs}
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            pair = hooks.get(id(value))
            if pair is not None and pair[0] is value:
                try:
                    setattr(module, name, pair[1])
                except (AttributeError, TypeError):  # a read-only module proxy: nothing to rebind
                    logger.debug(f"Could not rebind {name} in {module!r}")


def register_norms() -> None:
    """Install the hooks described in the module docstring; calling it again changes nothing.

    Called on ``import mabn_d2``. Every NORM string other than "MABN" / "BRN" keeps its
    detectron2 behaviour.
    """
    with _LOCK:
        _rebind_everywhere(
            [
                _hook_function(_d2_batch_norm, "get_norm", _extend_get_norm),
                _hook_function(_d2_build, "build_model", _build_in_cfg_context),
            ]
        )

        if not _is_hooked(Conv2d.__init__):
            Conv2d.__init__ = _centralize_at_init(Conv2d.__init__)
        convert = FrozenBatchNorm2d.__dict__["convert_frozen_batchnorm"].__func__
        if not _is_hooked(convert):
            FrozenBatchNorm2d.convert_frozen_batchnorm = classmethod(_freeze_mabn_too(convert))
        if not _is_hooked(RetinaNetHead.__init__):
            if hasattr(RetinaNetHead.__init__, "__wrapped__"):
                RetinaNetHead.__init__ = _per_level_retinanet_init(RetinaNetHead.__init__)
            else:
                logger.warning("RetinaNetHead.__init__ has an unexpected form; MABN there would share statistics.")
