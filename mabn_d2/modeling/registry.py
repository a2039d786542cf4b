"""detectron2 glue: the NORM strings "MABN" and "BRN", and the MABN pass at every build.

detectron2 is hooked in three places, each wrapped once (the wrapper keeps the original as
`__wrapped__`):

- `get_norm`: every NORM name of the norm table (`mabn_d2.norms`: "MABN" -> MABN2d, "BRN" ->
  BatchRenorm2d, ...) builds its layer; every other value is delegated, and an unknown name
  fails with the list of valid ones. YAML configs can only name a norm, and
  `get_norm` keeps its name table inside the function, so it is wrapped, and the modules of
  detectron2 (detectron2.projects included) that bound it at import are pointed at the
  wrapper; later importers get it from `detectron2.layers`.
- `build_model`: runs the build inside the context holding the validated values of the table's
  cfg sections, cfg.MODEL.MABN, cfg.MODEL.BRN, ... (`get_norm` never sees the cfg), then
  `prepare_mabn_model`. Only detectron2's own modules are
  pointed at the wrapper, so its entry points (`DefaultTrainer`, `DefaultPredictor`, a later
  `from detectron2.modeling import build_model`) build MABN models; a user module or `__main__`
  keeps what it imported. The documented entry points are `mabn_d2.build_model(cfg)` and
  `MABNTrainer`; a reference to detectron2's `build_model` taken before `import mabn_d2` builds
  without the pass, and the model's first training step then refuses to run until
  `prepare_mabn_model` (or the `allow_uncentered` opt-out) is called on it.
- `get_default_optimizer_params`: MABN / BRN parameters get the weight decay BatchNorm2d's get
  (`optimizer_params`). `build_optimizer`, and so DefaultTrainer and MABNTrainer, look the
  function up in `detectron2.solver.build` at each call, so they all see the wrapper; a
  reference taken before `import mabn_d2` (a user's import, a LazyConfig loaded earlier) does not.

Everything else MABN needs (centralized convolutions, frozen stages, per-level statistics in
RetinaNet's head) is the explicit pass `mabn_d2.prepare_mabn_model`. Models built another way
(by hand, `instantiate` of a LazyConfig) call it themselves; `mabn_build_context` (any norm:
`norm_build_context`) gives the "MABN" strings hyper-parameters there, or the norm is a callable
building MABN2d directly.
"""
import contextlib
import functools
import logging
import re
import sys
import threading
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, Callable, ContextManager, Iterable, Iterator, List, Mapping, Tuple

from detectron2.config import CfgNode
from detectron2.layers import batch_norm as _d2_batch_norm
from detectron2.modeling.meta_arch import build as _d2_build
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.solver import build as _d2_solver_build
from torch import nn

from ..config import norm_settings
from ..layers.hyperparams import HyperparameterValues
from ..norms import STOCK_NORMS, NormSpec, norm_layer_classes, norm_spec, norm_specs
from .optimizer_params import extend_get_default_optimizer_params
from .prepare import prepare_mabn_model

__all__ = ["STOCK_NORMS", "valid_norm_names", "register_norms", "build_model", "mabn_build_context",
           "brn_build_context", "norm_build_context", "build_context_from_cfg", "NORMS"]

logger = logging.getLogger(__name__)

_HOOK_MARK = "_mabn_d2_hook"
_LOCK = threading.Lock()

# {NORM name: validated hyper-parameters} for the layers get_norm builds; a name absent: its defaults.
_BUILD_VALUES: ContextVar[Mapping[str, HyperparameterValues]] = ContextVar(
    "mabn_d2_build_values", default=MappingProxyType({}))


# ---------------------------------------------------------------- build contexts


def _current_values(spec: NormSpec) -> HyperparameterValues:
    values = _BUILD_VALUES.get().get(spec.name)
    return spec.values() if values is None else values


@contextlib.contextmanager
def _values_context(values: Mapping[str, HyperparameterValues]) -> Iterator[None]:
    token = _BUILD_VALUES.set(MappingProxyType({**_BUILD_VALUES.get(), **values}))
    try:
        yield
    finally:
        _BUILD_VALUES.reset(token)


def _norm_context(norm: str, kwargs: Mapping[str, Any], context_name: str) -> ContextManager[None]:
    """The context for NORM `norm` with `kwargs` over the enclosing values (checked here, once)."""
    spec = norm_spec(norm)
    return _values_context({norm: spec.replaced(_current_values(spec), kwargs, context_name)})


@contextlib.contextmanager
def norm_build_context(norm: str, **kwargs: Any) -> Iterator[None]:
    """Layer arguments for every NORM `norm` built inside, for any norm of the table
    (``norm_build_context("BRN", r_max=2.0)``); see `mabn_build_context`."""
    with _norm_context(norm, kwargs, f"norm_build_context({norm!r})"):
        yield


@contextlib.contextmanager
def mabn_build_context(**kwargs: Any) -> Iterator[None]:
    """MABN2d keyword arguments for every "MABN" norm built inside (e.g. ``buffer_size=8``).

    `get_norm` never sees a cfg; `build_model` enters this context from cfg.MODEL.MABN, and
    models built by hand or from a LazyConfig use it directly (then `prepare_mabn_model`).
    Nested contexts override the enclosing one key by key; outside any context the MABN2d
    defaults apply. The arguments are checked on entering, not by each layer built inside.
    """
    with _norm_context("MABN", kwargs, "mabn_build_context"):
        yield


@contextlib.contextmanager
def brn_build_context(**kwargs: Any) -> Iterator[None]:
    """Like `mabn_build_context`, for the BatchRenorm2d layers that "BRN" builds."""
    with _norm_context("BRN", kwargs, "brn_build_context"):
        yield


@contextlib.contextmanager
def build_context_from_cfg(cfg: CfgNode) -> Iterator[None]:
    """Enter the build context of every table norm whose section cfg has, with its validated values
    (`mabn_d2.config.norm_settings`: validated once per section content, not again here).

    A cfg without those sections (add_mabn_config not called) changes nothing: the enclosing
    context, or the layer defaults, apply.
    """
    with _values_context(norm_settings(cfg)):
        yield


# ---------------------------------------------------------------- the norm names


def _build(norm: str, channels: int) -> nn.Module:
    spec = norm_spec(norm)
    return spec.build(channels, _current_values(spec))


class _NormBuilders(Mapping):
    """NORM name -> a function building one layer, for every norm in the table at the time of the lookup."""

    def __getitem__(self, name: str) -> Callable[[int], nn.Module]:
        norm_spec(name)  # KeyError for a name the table does not have
        return functools.partial(_build, name)

    def __iter__(self) -> Iterator[str]:
        return iter([spec.name for spec in norm_specs()])

    def __len__(self) -> int:
        return len(norm_specs())


NORMS: Mapping[str, Callable[[int], nn.Module]] = _NormBuilders()


# ---------------------------------------------------------------- detectron2's shared-norm warning


class _PerLevelNormWarningFilter(logging.Filter):
    """Drops RetinaNetHead's "Shared BatchNorm ... may not work well" for the norms that
    `prepare_mabn_model` gives per-level statistics right after the build (the table's); others still warn."""

    _MESSAGE = re.compile(r"Shared BatchNorm \(type=<class '([\w.]+)'>\)")

    def filter(self, record: logging.LogRecord) -> bool:
        match = self._MESSAGE.match(record.getMessage())
        if match is None:
            return True
        module_name, _, class_name = match.group(1).rpartition(".")
        cls = getattr(sys.modules.get(module_name), class_name, None)
        return not (isinstance(cls, type) and issubclass(cls, norm_layer_classes()))


_PER_LEVEL_NORM_WARNING_FILTER = _PerLevelNormWarningFilter()


@contextlib.contextmanager
def _per_level_norm_warning_dropped() -> Iterator[None]:
    retinanet_logger = logging.getLogger(RetinaNetHead.__module__)
    added = _PER_LEVEL_NORM_WARNING_FILTER not in retinanet_logger.filters
    if added:
        retinanet_logger.addFilter(_PER_LEVEL_NORM_WARNING_FILTER)
    try:
        yield
    finally:
        if added:
            retinanet_logger.removeFilter(_PER_LEVEL_NORM_WARNING_FILTER)


# ---------------------------------------------------------------- hooks (each wraps the original)


def valid_norm_names() -> List[str]:
    """Every NORM string get_norm resolves: detectron2's and the ones mabn_d2 registers."""
    return [name for name in STOCK_NORMS if name] + sorted(NORMS)


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
        try:
            return original(norm, out_channels)
        except KeyError as error:
            if not (isinstance(norm, str) and error.args == (norm,)):
                raise
            raise ValueError(f"unknown NORM {norm!r}; valid names: {', '.join(valid_norm_names())}") from None

    return _mark(get_norm)


def _build_and_prepare(original: Callable) -> Callable:
    @functools.wraps(original)
    def build_model(cfg):
        with build_context_from_cfg(cfg), _per_level_norm_warning_dropped():
            model = original(cfg)
        return prepare_mabn_model(model)

    return _mark(build_model)


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


def _is_detectron2_module(name: str) -> bool:
    return name == "detectron2" or name.startswith("detectron2.")  # detectron2.projects.* included


def _rebind(pair: Tuple[Callable, Callable], modules: Iterable[Any]) -> None:
    """Point every attribute of `modules` that holds the original function at its hook."""
    original, hook = pair
    for module in modules:
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            if value is original:
                try:
                    setattr(module, name, hook)
                except (AttributeError, TypeError):  # a read-only module proxy: nothing to rebind
                    logger.debug(f"Could not rebind {name} in {module!r}")


def register_norms() -> None:
    """Install the three hooks described in the module docstring; calling it again changes nothing
    but pointing late bindings at them.

    Called on ``import mabn_d2``. Every NORM value not in the norm table keeps its
    detectron2 behaviour, except that an unknown name is a ValueError listing the valid ones.
    """
    hooks = (
        (_d2_batch_norm, "get_norm", _extend_get_norm),
        (_d2_build, "build_model", _build_and_prepare),
        (_d2_solver_build, "get_default_optimizer_params", lambda fn: _mark(extend_get_default_optimizer_params(fn))),
    )
    with _LOCK:
        loaded: List[Tuple[str, Any]] = list(sys.modules.items())
        for module, name, make_hook in hooks:
            pair = _hook_function(module, name, make_hook)
            _rebind(pair, (m for module_name, m in loaded if _is_detectron2_module(module_name)))


def build_model(cfg: CfgNode) -> nn.Module:
    """detectron2's build_model with the hyper-parameters of cfg's norm sections and the MABN pass
    (`prepare_mabn_model`): the documented way to build a model from a config outside a trainer."""
    register_norms()
    with build_context_from_cfg(cfg), _per_level_norm_warning_dropped():
        model = _original_of(_d2_build.build_model)(cfg)
    return prepare_mabn_model(model)
