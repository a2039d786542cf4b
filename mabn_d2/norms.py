"""The norm table: every NORM name mabn_d2 adds to detectron2, one entry (`NormSpec`) each.

An entry holds all the package needs to know about a norm, so adding one is its layer file
plus `add_norm(NormSpec(...))` (docs/architecture.md, "Adding a norm"). What reads the table:

- `modeling.registry`: the get_norm wrapper (NORM name -> layer) and the build contexts;
- `config`: the cfg.MODEL.<section> keys, their defaults and checks, and the
  validated hyper-parameters the layers are built from;
- `modeling.prepare`: frozen stages and per-level statistics in shared heads, for every table
  layer; `modeling.optimizer_params`: the norm weight decay of their parameters;
- `engine.preflight`: which NORM names MABN_D2_BACKEND concerns;
- `deploy`: which NORM names fold, and into which stock norm.

A table layer computes, in eval mode, BatchNorm's affine from its weight, bias, running_mean,
running_var and eps: frozen stages and the fold turn it into the FrozenBatchNorm2d computing it.
"""
import dataclasses
import re
import threading
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Type

from .layers import BatchRenorm2d, MABN2d
from .layers.hyperparams import (
    BRN_HYPERPARAMETERS, MABN_HYPERPARAMETERS, BRNHyperparameters, Hyperparameter, HyperparameterValues,
    MABNHyperparameters, failed_check, is_finite_number, values_class,
)

__all__ = ["STOCK_NORMS", "NormSpec", "add_norm", "remove_norm", "norm_spec", "norm_specs", "norm_layer_classes",
           "triton_step_norm_names", "folded_norm_names"]

# Norm names stock detectron2's get_norm knows (detectron2/layers/batch_norm.py).
STOCK_NORMS = ("", "BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN")

# (section values by argument name, values of the `reads` keys by dotted key) -> layer arguments
Resolve = Callable[[Dict[str, Any], Mapping[str, Any]], Dict[str, Any]]


@dataclasses.dataclass(frozen=True, eq=False)
class NormSpec:
    """One norm: its NORM name, layer, config section, hyper-parameters and deployment.

    name: the NORM value in configs ("MABN").
    layer: the module class, built as ``layer(channels, **hyper-parameters)``.
    section: its config section, cfg.MODEL.<section>; each hyper-parameter is a key, upper-cased.
    hyperparameters: the layer arguments, with defaults and checks (`layers.hyperparams`).
    config_only: keys of the section that are not layer arguments; `resolve` turns the section's
        values into the layer arguments, reading the cfg keys named in `reads` (dotted).
    fold: the stock NORM its layers become in a folded deployment (they fold into
        FrozenBatchNorm2d); None: the fold tool refuses configs using this norm.
    triton_step: MABN_D2_BACKEND picks its training step (a layer with Triton kernels).
    values: the class of its validated values; made from `hyperparameters` when not given.
    """

    name: str
    layer: type
    section: str
    hyperparameters: Tuple[Hyperparameter, ...]
    config_only: Tuple[Hyperparameter, ...] = ()
    reads: Tuple[str, ...] = ()
    resolve: Optional[Resolve] = None
    fold: Optional[str] = None
    triton_step: bool = False
    values: Optional[Type[HyperparameterValues]] = None

    def __post_init__(self) -> None:
        if self.values is None:
            object.__setattr__(self, "values", values_class(f"{self.layer.__name__}Hyperparameters",
                                                            self.hyperparameters))
        problem = self._problem()
        if problem:
            raise ValueError(f"NormSpec {self.name!r}: {problem}")

    def _problem(self) -> Optional[str]:
        if not (isinstance(self.name, str) and self.name) or self.name in STOCK_NORMS:
            return "the name must be a non-empty string that is not a stock detectron2 norm"
        if not re.fullmatch(r"[A-Z][A-Z0-9_]*", self.section or ""):
            return f"section must be an upper-case config key, got {self.section!r}"
        if self.values.table is not self.hyperparameters:
            return "values must be the values class of its hyperparameters"
        keys = [p.config_key for p in self.keys]
        if len(set(keys)) != len(keys):
            return f"a key appears twice in {keys}"
        bad = next((p for p in self.keys if not p.check(p.default)), None)
        if bad:
            return f"the default of {bad.name} fails its check ({bad.requirement}, got {bad.default!r})"
        if self.config_only and self.resolve is None:
            return "config_only keys need a resolve function"
        if self.fold is not None and self.fold not in STOCK_NORMS:
            return f"fold must name a stock norm {STOCK_NORMS}, got {self.fold!r}"
        return None

    @property
    def keys(self) -> Tuple[Hyperparameter, ...]:
        """Every key of the section: the layer arguments, then config-only keys."""
        return self.hyperparameters + self.config_only

    def build(self, num_features: int, values: Optional[HyperparameterValues] = None):
        """One layer with `values` (validated; the layer does not check them again), or the defaults."""
        return (self.values() if values is None else values).build(self.layer, num_features)

    def replaced(self, values: HyperparameterValues, changes: Mapping[str, Any], owner: str) -> HyperparameterValues:
        """`values` with `changes` (layer arguments) applied, after checking those changes.

        TypeError for an argument the layer does not have, ValueError for a value its check refuses,
        each naming `owner`.
        """
        known = {p.name for p in self.hyperparameters}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"{owner}: unknown {self.layer.__name__} argument(s) {unknown}; "
                            f"expected some of {sorted(known)}")
        bad = failed_check(self.hyperparameters, changes)
        if bad is not None:
            raise ValueError(f"{owner}: {bad.name} {bad.requirement}, got {changes[bad.name]!r}")
        return dataclasses.replace(values, **changes)


_TABLE: Dict[str, NormSpec] = {}
_LOCK = threading.Lock()


def add_norm(spec: NormSpec) -> NormSpec:
    """Make `spec.name` a NORM value everywhere (configs, builders, the model pass, the fold); returns `spec`.

    A name or section already in the table is a ValueError. Takes effect at once for everything
    that reads the table; a cfg gets the new section from `add_mabn_config`.
    """
    with _LOCK:
        taken = next((s for s in _TABLE.values() if s.name == spec.name or s.section == spec.section), None)
        if taken is not None:
            raise ValueError(f"add_norm: NORM {spec.name!r} / section MODEL.{spec.section} collides with "
                             f"NORM {taken.name!r} (MODEL.{taken.section})")
        _TABLE[spec.name] = spec
    return spec


def remove_norm(name: str) -> NormSpec:
    """Take NORM `name` out of the table (the inverse of `add_norm`); returns its entry."""
    with _LOCK:
        return _TABLE.pop(name)


def norm_spec(name: str) -> NormSpec:
    """The entry of NORM `name`; KeyError when the table has none."""
    return _TABLE[name]


def norm_specs() -> Tuple[NormSpec, ...]:
    """Every entry, in the order they were added (MABN, BRN, then others)."""
    return tuple(_TABLE.values())


def norm_layer_classes() -> Tuple[type, ...]:
    """The layer classes of the table: the norms the model pass freezes in frozen stages and gives
    per-level statistics in shared heads, and whose parameters get the norm weight decay."""
    return tuple(spec.layer for spec in _TABLE.values())


def triton_step_norm_names() -> Tuple[str, ...]:
    """The NORM names whose training step MABN_D2_BACKEND picks."""
    return tuple(spec.name for spec in _TABLE.values() if spec.triton_step)


def folded_norm_names() -> Dict[str, str]:
    """{NORM name: the stock NORM it becomes in a folded deployment}, for the norms that fold."""
    return {spec.name: spec.fold for spec in _TABLE.values() if spec.fold is not None}


# ---------------------------------------------------------------- the two norms of the package


def _fraction_or_off(value: Any) -> bool:
    return is_finite_number(value) and (value == -1 or 0.0 <= value <= 1.0)


# Keys only cfg.MODEL.MABN has: they size the warm-ups from the schedule and resolve into
# WARMUP_ITERS / RENORM_WARMUP_ITERS. -1 leaves the absolute key in charge.
MABN_FRACTIONS: Tuple[Hyperparameter, ...] = (
    Hyperparameter("warmup_fraction", -1.0, _fraction_or_off, "must be -1 (off) or in [0, 1]",
                   "WARMUP_ITERS becomes round(WARMUP_FRACTION * SOLVER.MAX_ITER)"),
    Hyperparameter("renorm_warmup_fraction", -1.0, _fraction_or_off, "must be -1 (off) or in [0, 1]",
                   "RENORM_WARMUP_ITERS becomes round(RENORM_WARMUP_FRACTION * SOLVER.MAX_ITER)"),
)
_ITERS_OF_FRACTION = {"warmup_fraction": "warmup_iters", "renorm_warmup_fraction": "renorm_warmup_iters"}


def _mabn_warmups_from_fractions(values: Dict[str, Any], reads: Mapping[str, Any]) -> Dict[str, Any]:
    """MABN2d's arguments: each *_FRACTION other than -1 replaces its *_ITERS, sized by SOLVER.MAX_ITER."""
    arguments = {name: value for name, value in values.items() if name not in _ITERS_OF_FRACTION}
    for fraction_name, iters_name in _ITERS_OF_FRACTION.items():
        fraction = values[fraction_name]
        if fraction == -1:
            continue
        key, max_iter = f"cfg.MODEL.MABN.{fraction_name.upper()}", reads.get("SOLVER.MAX_ITER")
        if max_iter is None:
            raise ValueError(f"{key} needs cfg.SOLVER.MAX_ITER to size the warm-up")
        if int(max_iter) < 0:
            raise ValueError(f"{key} needs cfg.SOLVER.MAX_ITER >= 0 to size the warm-up, got {max_iter!r}")
        arguments[iters_name] = int(round(fraction * int(max_iter)))
    return arguments


MABN = add_norm(NormSpec(
    "MABN", MABN2d, "MABN", MABN_HYPERPARAMETERS,
    config_only=MABN_FRACTIONS, reads=("SOLVER.MAX_ITER",), resolve=_mabn_warmups_from_fractions,
    fold="FrozenBN", triton_step=True, values=MABNHyperparameters,
))
BRN = add_norm(NormSpec(
    "BRN", BatchRenorm2d, "BRN", BRN_HYPERPARAMETERS,
    triton_step=True, values=BRNHyperparameters,
))
