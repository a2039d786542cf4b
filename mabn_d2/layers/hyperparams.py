"""The tables of MABN's and Batch Renorm's hyper-parameters: name, default, check, meaning.

The layers validate their arguments against them; the norm table (`mabn_d2.norms`) gives each
NORM name its table, from which `mabn_d2.config` derives the keys of its cfg.MODEL section
(argument name upper-cased); the classification study takes its defaults from them. So a
default or a limit is written exactly once.

The two running-average rates run in opposite directions and say so in their names:
MABN's `ema_decay` is the share of the old running_var kept at each step (0.98), Batch
Renorm's `ema_update_rate` the share taken from the new batch statistic (0.01, the meaning
of `momentum` in torch's BatchNorm).

A validated set of values is a frozen dataclass made from a table (`values_class`:
`MABNHyperparameters`, `BRNHyperparameters`). The config and the build contexts check values
once, into such an object; `HyperparameterValues.build` then makes layers from it without the
layers checking the same values again (their own check is for direct callers).
"""
import dataclasses
import math
from contextvars import ContextVar
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Tuple, Type

__all__ = ["Hyperparameter", "MABN_HYPERPARAMETERS", "BRN_HYPERPARAMETERS", "HyperparameterValues",
           "MABNHyperparameters", "BRNHyperparameters", "values_class", "failed_check", "defaults",
           "check_arguments", "check_num_features"]


@dataclasses.dataclass(frozen=True)
class Hyperparameter:
    """A layer argument: its default, the check a value must pass and what that check requires."""

    name: str
    default: Any
    check: Callable[[Any], bool]
    requirement: str
    meaning: str

    @property
    def config_key(self) -> str:
        return self.name.upper()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _non_negative_int(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _positive(value: Any) -> bool:
    return is_finite_number(value) and value > 0.0


def _at_least_one(value: Any) -> bool:
    return is_finite_number(value) and value >= 1.0


MABN_HYPERPARAMETERS: Tuple[Hyperparameter, ...] = (
    Hyperparameter("buffer_size", 16, lambda v: _is_int(v) and v >= 1, "must be an integer >= 1",
                   "iterations averaged by the simple moving averages of chi2_B and Psi_B (ring-buffer length m)"),
    Hyperparameter("ema_decay", 0.98, lambda v: is_finite_number(v) and 0.0 <= v < 1.0, "must be in [0, 1)",
                   "share of the old running_var kept at each update of its EMA"),
    Hyperparameter("warmup_iters", 100, _non_negative_int, "must be an integer >= 0",
                   "iterations normalized by the batch statistics themselves before the moving averages take over"),
    Hyperparameter("renorm_warmup_iters", 1000, _non_negative_int, "must be an integer >= 0",
                   "iterations before the re-normalization factor r (clipped ratio to running_var) applies"),
    Hyperparameter("renorm_clip", 5.0, _at_least_one, "must be >= 1",
                   "r is clipped to [1 / renorm_clip, renorm_clip]"),
    Hyperparameter("eps", 1e-5, _positive, "must be > 0", "added to the second moment before the square root"),
)

BRN_HYPERPARAMETERS: Tuple[Hyperparameter, ...] = (
    Hyperparameter("eps", 1e-5, _positive, "must be > 0", "added to the variance before the square root"),
    Hyperparameter("ema_update_rate", 0.01, lambda v: is_finite_number(v) and 0.0 < v <= 1.0, "must be in (0, 1]",
                   "share of the new batch statistic in each update of the running averages (torch's momentum)"),
    Hyperparameter("r_max", 3.0, _at_least_one, "must be >= 1", "final clip of the std correction r to [1/r_max, r_max]"),
    Hyperparameter("d_max", 5.0, lambda v: is_finite_number(v) and v >= 0.0, "must be >= 0",
                   "final clip of the mean correction d to [-d_max, d_max]"),
    Hyperparameter("warmup_iters", 5000, _non_negative_int, "must be an integer >= 0",
                   "iterations of plain BN (r = 1, d = 0) before the limits start to ramp up"),
    Hyperparameter("r_max_ramp_iters", 35000, _non_negative_int, "must be an integer >= 0",
                   "iterations over which the r limit ramps linearly from 1 to r_max"),
    Hyperparameter("d_max_ramp_iters", 20000, _non_negative_int, "must be an integer >= 0",
                   "iterations over which the d limit ramps linearly from 0 to d_max"),
)


def defaults(table: Tuple[Hyperparameter, ...]) -> Dict[str, Any]:
    """{argument name: default} of a table."""
    return {p.name: p.default for p in table}


def failed_check(table: Tuple[Hyperparameter, ...], values: Mapping[str, Any]) -> Optional[Hyperparameter]:
    """The first parameter of `table` whose value in `values` fails its check; absent ones pass."""
    return next((p for p in table if p.name in values and not p.check(values[p.name])), None)


# The table whose values the layer being built right now come from an already validated
# HyperparameterValues (see `HyperparameterValues.build`); None: check every argument.
_VALIDATED_TABLE: ContextVar[Optional[Tuple[Hyperparameter, ...]]] = ContextVar(
    "mabn_d2_validated_table", default=None)


def check_arguments(owner: str, table: Tuple[Hyperparameter, ...], values: Mapping[str, Any]) -> None:
    """ValueError naming the first argument of `values` that fails its check (before any allocation).

    A layer built by `HyperparameterValues.build` skips it: those values were checked once, where
    they were read (the config or a build context), and errors there name the config key.
    """
    if _VALIDATED_TABLE.get() is table:
        return
    parameter = failed_check(table, values)
    if parameter is not None:
        raise ValueError(f"{owner}: {parameter.name} {parameter.requirement}, got {values[parameter.name]!r}")


def check_num_features(owner: str, num_features: Any) -> None:
    if not (_is_int(num_features) and num_features >= 1):
        raise ValueError(f"{owner}: num_features must be a positive int, got {num_features!r}")


class HyperparameterValues:
    """A validated, immutable set of a table's values; the classes come from `values_class`.

    Make one only from values that passed the table's checks (`failed_check`): `build` trusts it.
    """

    table: ClassVar[Tuple[Hyperparameter, ...]] = ()

    def as_kwargs(self) -> Dict[str, Any]:
        """{argument name: value}, the layer's keyword arguments."""
        return {p.name: getattr(self, p.name) for p in self.table}

    def build(self, layer: Callable[..., Any], num_features: int) -> Any:
        """``layer(num_features, **self.as_kwargs())``, its argument check skipped (already done)."""
        token = _VALIDATED_TABLE.set(self.table)
        try:
            return layer(num_features, **self.as_kwargs())
        finally:
            _VALIDATED_TABLE.reset(token)


def values_class(name: str, table: Tuple[Hyperparameter, ...]) -> Type[HyperparameterValues]:
    """A frozen dataclass with one field per parameter of `table`, its default the table's."""
    fields = [(p.name, Any, dataclasses.field(default=p.default)) for p in table]
    cls = dataclasses.make_dataclass(name, fields, bases=(HyperparameterValues,), frozen=True)
    cls.table = table
    cls.__module__ = __name__
    cls.__doc__ = f"Validated values of {', '.join(p.name for p in table)} (see `HyperparameterValues`)."
    return cls


MABNHyperparameters = values_class("MABNHyperparameters", MABN_HYPERPARAMETERS)
BRNHyperparameters = values_class("BRNHyperparameters", BRN_HYPERPARAMETERS)
