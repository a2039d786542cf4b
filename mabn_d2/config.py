"""Config keys of the MABN and Batch Renorm norms (cfg.MODEL.MABN, cfg.MODEL.BRN) and their checks.

The keys, defaults and checks derive from the layers' table (`mabn_d2.layers.hyperparams`):
each layer argument is a key, upper-cased. On top of it, cfg.MODEL.MABN has two keys that size
the warm-ups as fractions of SOLVER.MAX_ITER, and both sections keep the old MOMENTUM key
loading (deprecated) for configs written before the EMA rates got distinct names.

detectron2 resolves a NORM string without seeing the cfg, so these values reach the layers
through `mabn_d2.modeling.registry` (which reads them while `build_model` runs).
"""
import contextlib
import warnings
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import yacs.config
from detectron2.config import CfgNode as CN

from .layers.hyperparams import BRN_HYPERPARAMETERS, MABN_HYPERPARAMETERS, Hyperparameter, is_finite_number

__all__ = [
    "add_mabn_config",
    "validate_mabn_config",
    "mabn_kwargs_from_cfg",
    "brn_kwargs_from_cfg",
    "float_keys_take_integers",
    "resolve_mabn_warmups",
    "long_renorm_warmup_message",
]

# Share of SOLVER.MAX_ITER above which the re-normalization warm-up is reported as too long:
# until it ends, training normalizes by short moving averages while inference uses running_var.
LONG_RENORM_WARMUP_SHARE = 0.1


@contextlib.contextmanager
def float_keys_take_integers() -> Iterator[None]:
    """Within the block, an integer merged into a float key (file or override list) becomes that float.

    yacs refuses `MODEL.MABN.WARMUP_FRACTION -1` or `SOLVER.BASE_LR: 1` as a type mismatch,
    although the integer stands for the same value. Both merge_from_file and merge_from_list
    check types through one yacs function, so widening it here covers every way a value comes
    in (and detectron2's upgrade of old config versions). Booleans stay refused.
    """
    strict = yacs.config._check_and_coerce_cfg_value_type

    def coerce(replacement: Any, original: Any, key: str, full_key: str) -> Any:
        if type(original) is float and type(replacement) is int:
            return float(replacement)
        return strict(replacement, original, key, full_key)

    yacs.config._check_and_coerce_cfg_value_type = coerce
    try:
        yield
    finally:
        yacs.config._check_and_coerce_cfg_value_type = strict


def _fraction_or_off(value: Any) -> bool:
    return is_finite_number(value) and (value == -1 or 0.0 <= value <= 1.0)


# Keys that exist only in the config: they size the warm-ups from the schedule and resolve into
# WARMUP_ITERS / RENORM_WARMUP_ITERS. -1 leaves the absolute key in charge.
_MABN_FRACTIONS: Tuple[Hyperparameter, ...] = (
    Hyperparameter("warmup_fraction", -1.0, _fraction_or_off, "must be -1 (off) or in [0, 1]",
                   "WARMUP_ITERS becomes round(WARMUP_FRACTION * SOLVER.MAX_ITER)"),
    Hyperparameter("renorm_warmup_fraction", -1.0, _fraction_or_off, "must be -1 (off) or in [0, 1]",
                   "RENORM_WARMUP_ITERS becomes round(RENORM_WARMUP_FRACTION * SOLVER.MAX_ITER)"),
)
_MABN_FRACTION_KEYS = {"WARMUP_FRACTION": "WARMUP_ITERS", "RENORM_WARMUP_FRACTION": "RENORM_WARMUP_ITERS"}
# Deprecated key -> its new name, per section. "MOMENTUM" meant opposite things in the two sections.
_RENAMED = {"MABN": {"MOMENTUM": "EMA_DECAY"}, "BRN": {"MOMENTUM": "EMA_UPDATE_RATE"}}


class _Section:
    """One cfg.MODEL section: the layer's table plus the keys only the config has."""

    def __init__(self, name: str, layer_table: Tuple[Hyperparameter, ...], config_only=()):
        self.name = name
        self.layer_table = layer_table
        self.table = layer_table + tuple(config_only)
        self.rules: Dict[str, Tuple[Callable[[Any], bool], str]] = {
            p.config_key: (p.check, p.requirement) for p in self.table}
        self.renamed = _RENAMED[name]

    def defaults(self) -> CN:
        node = CN({p.config_key: p.default for p in self.table})
        for old in self.renamed:
            node[old] = None  # None: unset; a None default also lets yacs merge a number into it
        return node

    def known_keys(self):
        return sorted(list(self.rules) + list(self.renamed))


_SECTIONS = {"MABN": _Section("MABN", MABN_HYPERPARAMETERS, _MABN_FRACTIONS), "BRN": _Section("BRN", BRN_HYPERPARAMETERS)}


def add_mabn_config(cfg: CN) -> None:
    """Add cfg.MODEL.MABN and cfg.MODEL.BRN; keys already present keep their values."""
    for name, section in _SECTIONS.items():
        defaults = section.defaults()
        if name not in cfg.MODEL:
            cfg.MODEL[name] = defaults
            continue
        for key, value in defaults.items():
            if key not in cfg.MODEL[name]:
                cfg.MODEL[name][key] = value


def _section(cfg: Any, name: str) -> Optional[CN]:
    model = getattr(cfg, "MODEL", None)
    if model is None or name not in model:
        return None
    return model[name]


def validate_mabn_config(cfg: CN) -> None:
    """Raise ValueError naming the first bad key of cfg.MODEL.MABN / cfg.MODEL.BRN.

    Sections or keys that are absent are not errors (the layer defaults apply); unknown
    keys are, since they are most likely misspellings. A deprecated key is checked as the key
    that replaces it, and setting both to different values is an error.
    """
    for name, section in _SECTIONS.items():
        node = _section(cfg, name)
        if node is None:
            continue
        for key in node:
            if key not in section.rules and key not in section.renamed:
                raise ValueError(f"cfg.MODEL.{name}.{key} is not a known key; expected one of {section.known_keys()}")
        for key, (check, requirement) in section.rules.items():
            if key in node and not check(node[key]):
                raise ValueError(f"cfg.MODEL.{name}.{key} {requirement}, got {node[key]!r}")
        for old, new in section.renamed.items():
            if node.get(old) is None:
                continue
            check, requirement = section.rules[new]
            if not check(node[old]):
                raise ValueError(f"cfg.MODEL.{name}.{old} (deprecated, now {new}) {requirement}, got {node[old]!r}")
            default = _default(section, new)
            if new in node and node[new] != default and node[new] != node[old]:
                raise ValueError(f"cfg.MODEL.{name}.{old} (deprecated) and its new name {new} are both set, to "
                                 f"{node[old]!r} and {node[new]!r}; keep only {new}")


def _default(section: "_Section", key: str) -> Any:
    return next(p.default for p in section.table if p.config_key == key)


def _kwargs_from_section(cfg: CN, name: str) -> Dict[str, Any]:
    section = _SECTIONS[name]
    node = _section(cfg, name)
    values = {p.config_key: p.default for p in section.table}
    if node is not None:
        values.update({key: node[key] for key in section.rules if key in node})
        for old, new in section.renamed.items():
            if node.get(old) is not None:
                warnings.warn(f"cfg.MODEL.{name}.{old} is deprecated: it is now cfg.MODEL.{name}.{new} "
                              f"({_meaning(section, new)}); its value {node[old]!r} is used as {new}",
                              FutureWarning, stacklevel=3)
                values[new] = node[old]
    return {key.lower(): values[key] for key in section.rules}


def _meaning(section: "_Section", key: str) -> str:
    return next(p.meaning for p in section.table if p.config_key == key)


def _max_iter(cfg: Any) -> Optional[int]:
    solver = getattr(cfg, "SOLVER", None)
    return None if solver is None or "MAX_ITER" not in solver else int(solver.MAX_ITER)


def _resolve_warmups(cfg: CN, values: Dict[str, Any]) -> Tuple[int, int]:
    """Apply the *_FRACTION entries of `values` (the section's keys, lower-cased) to SOLVER.MAX_ITER."""
    resolved = []
    for fraction_key, iters_key in _MABN_FRACTION_KEYS.items():
        iters, fraction = values[iters_key.lower()], values[fraction_key.lower()]
        if fraction != -1:
            max_iter = _max_iter(cfg)
            if max_iter is None:
                raise ValueError(f"cfg.MODEL.MABN.{fraction_key} needs cfg.SOLVER.MAX_ITER to size the warm-up")
            iters = int(round(fraction * max_iter))
        resolved.append(iters)
    return resolved[0], resolved[1]


def resolve_mabn_warmups(cfg: CN) -> Tuple[int, int]:
    """(warmup_iters, renorm_warmup_iters) after applying the *_FRACTION keys to SOLVER.MAX_ITER."""
    return _resolve_warmups(cfg, _kwargs_from_section(cfg, "MABN"))


def mabn_kwargs_from_cfg(cfg: CN) -> Dict[str, Any]:
    """MABN2d keyword arguments from cfg.MODEL.MABN (defaults for anything absent).

    The *_FRACTION keys are resolved against SOLVER.MAX_ITER into warmup_iters and
    renorm_warmup_iters; they are not layer arguments themselves.
    """
    values = _kwargs_from_section(cfg, "MABN")
    kwargs = {k: v for k, v in values.items() if k.upper() not in _MABN_FRACTION_KEYS}
    kwargs["warmup_iters"], kwargs["renorm_warmup_iters"] = _resolve_warmups(cfg, values)
    return kwargs


def long_renorm_warmup_message(cfg: CN) -> Optional[str]:
    """A warning text when MABN re-normalizes only after more than 10% of SOLVER.MAX_ITER, else None.

    Until re-normalization starts, training normalizes by 16-iteration moving averages while
    evaluation uses the slower running_var, so a warm-up that covers much of a short schedule
    leaves the model with a train/eval mismatch.
    """
    max_iter = _max_iter(cfg)
    if max_iter is None or max_iter <= 0:
        return None
    warmup, renorm_warmup = resolve_mabn_warmups(cfg)
    start = max(warmup, renorm_warmup)
    if start <= LONG_RENORM_WARMUP_SHARE * max_iter:
        return None
    return (
        f"MABN re-normalization starts after iteration {start}, {100.0 * min(start, max_iter) / max_iter:.0f}% of "
        f"SOLVER.MAX_ITER={max_iter} (more than {100 * LONG_RENORM_WARMUP_SHARE:.0f}%): until then training "
        "normalizes with batch statistics or short moving averages and evaluation with running_var, a slower EMA. "
        "MODEL.MABN.WARMUP_FRACTION and MODEL.MABN.RENORM_WARMUP_FRACTION size the warm-ups to the schedule "
        "(docs/algorithm.md, 'Sizing the warm-ups to the schedule')."
    )


def brn_kwargs_from_cfg(cfg: CN) -> Dict[str, Any]:
    """BatchRenorm2d keyword arguments from cfg.MODEL.BRN (defaults for anything absent)."""
    return _kwargs_from_section(cfg, "BRN")
