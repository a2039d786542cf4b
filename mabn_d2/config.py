"""Config keys of the MABN and Batch Renorm norms (cfg.MODEL.MABN, cfg.MODEL.BRN) and their checks.

detectron2 resolves a NORM string without seeing the cfg, so these values reach the layers
through `mabn_d2.registry` (which reads them while `build_model` runs).
"""
import math
from typing import Any, Callable, Dict, Optional, Tuple

from detectron2.config import CfgNode as CN

__all__ = [
    "add_mabn_config",
    "validate_mabn_config",
    "mabn_kwargs_from_cfg",
    "brn_kwargs_from_cfg",
    "resolve_mabn_warmups",
    "long_renorm_warmup_message",
]

# Share of SOLVER.MAX_ITER above which the re-normalization warm-up is reported as too long:
# until it ends, training normalizes by short moving averages while inference uses running_var.
LONG_RENORM_WARMUP_SHARE = 0.1


def _mabn_defaults() -> CN:
    node = CN()
    # Iterations averaged by the simple moving averages of chi2_B and Psi_B (the ring-buffer length m).
    node.BUFFER_SIZE = 16
    # Decay of the running_var EMA used at inference and for re-normalization (0.98 keeps 98% of the old value).
    node.MOMENTUM = 0.98
    # Iterations that use the batch statistics themselves before switching to the moving averages.
    node.WARMUP_ITERS = 100
    # Iterations before the re-normalization factor r (clipped ratio to running_var) is applied.
    node.RENORM_WARMUP_ITERS = 1000
    # In [0, 1]: WARMUP_ITERS becomes round(WARMUP_FRACTION * SOLVER.MAX_ITER); -1: WARMUP_ITERS applies.
    node.WARMUP_FRACTION = -1.0
    # In [0, 1]: RENORM_WARMUP_ITERS becomes round(RENORM_WARMUP_FRACTION * SOLVER.MAX_ITER); -1: off.
    node.RENORM_WARMUP_FRACTION = -1.0
    # r is clipped to [1 / RENORM_CLIP, RENORM_CLIP].
    node.RENORM_CLIP = 5.0
    # Added to the second moment before the square root.
    node.EPS = 1e-5
    return node


def _brn_defaults() -> CN:
    node = CN()
    # Added to the variance before the square root.
    node.EPS = 1e-5
    # Weight of the new batch statistic in the running averages (torch's BatchNorm convention).
    node.MOMENTUM = 0.01
    # Final clip of the std correction r to [1 / R_MAX, R_MAX].
    node.R_MAX = 3.0
    # Final clip of the mean correction d to [-D_MAX, D_MAX].
    node.D_MAX = 5.0
    # Iterations of plain BN (r = 1, d = 0) before the limits start to ramp up.
    node.WARMUP_ITERS = 5000
    # Iterations over which the r limit ramps linearly from 1 to R_MAX.
    node.R_MAX_RAMP_ITERS = 35000
    # Iterations over which the d limit ramps linearly from 0 to D_MAX.
    node.D_MAX_RAMP_ITERS = 20000
    return node


def add_mabn_config(cfg: CN) -> None:
    """Add cfg.MODEL.MABN and cfg.MODEL.BRN; keys already present keep their values."""
    for name, defaults in (("MABN", _mabn_defaults()), ("BRN", _brn_defaults())):
        if name not in cfg.MODEL:
            cfg.MODEL[name] = defaults
            continue
        for key, value in defaults.items():
            if key not in cfg.MODEL[name]:
                cfg.MODEL[name][key] = value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _non_negative_int(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _fraction_or_off(value: Any) -> bool:
    return _is_number(value) and (value == -1 or 0.0 <= value <= 1.0)


# key -> (check, what the check requires), per section
_Rule = Dict[str, Tuple[Callable[[Any], bool], str]]
_MABN_RULES: _Rule = {
    "BUFFER_SIZE": (lambda v: _is_int(v) and v >= 1, "must be an integer >= 1"),
    "MOMENTUM": (lambda v: _is_number(v) and 0.0 <= v < 1.0, "must be in [0, 1)"),
    "WARMUP_ITERS": (_non_negative_int, "must be an integer >= 0"),
    "RENORM_WARMUP_ITERS": (_non_negative_int, "must be an integer >= 0"),
    "WARMUP_FRACTION": (_fraction_or_off, "must be -1 (off) or in [0, 1]"),
    "RENORM_WARMUP_FRACTION": (_fraction_or_off, "must be -1 (off) or in [0, 1]"),
    "RENORM_CLIP": (lambda v: _is_number(v) and v >= 1.0, "must be >= 1"),
    "EPS": (lambda v: _is_number(v) and v > 0.0, "must be > 0"),
}
# Keys that size the warm-ups from the schedule; they resolve into WARMUP_ITERS / RENORM_WARMUP_ITERS.
_MABN_FRACTION_KEYS = {"WARMUP_FRACTION": "WARMUP_ITERS", "RENORM_WARMUP_FRACTION": "RENORM_WARMUP_ITERS"}
_BRN_RULES: _Rule = {
    "EPS": (lambda v: _is_number(v) and v > 0.0, "must be > 0"),
    "MOMENTUM": (lambda v: _is_number(v) and 0.0 < v <= 1.0, "must be in (0, 1]"),
    "R_MAX": (lambda v: _is_number(v) and v >= 1.0, "must be >= 1"),
    "D_MAX": (lambda v: _is_number(v) and v >= 0.0, "must be >= 0"),
    "WARMUP_ITERS": (_non_negative_int, "must be an integer >= 0"),
    "R_MAX_RAMP_ITERS": (_non_negative_int, "must be an integer >= 0"),
    "D_MAX_RAMP_ITERS": (_non_negative_int, "must be an integer >= 0"),
}
_SECTIONS = {"MABN": (_MABN_RULES, _mabn_defaults), "BRN": (_BRN_RULES, _brn_defaults)}


def _section(cfg: Any, name: str) -> Optional[CN]:
    model = getattr(cfg, "MODEL", None)
    if model is None or name not in model:
        return None
    return model[name]


def validate_mabn_config(cfg: CN) -> None:
    """Raise ValueError naming the first bad key of cfg.MODEL.MABN / cfg.MODEL.BRN.

    Sections or keys that are absent are not errors (the layer defaults apply); unknown
    keys are, since they are most likely misspellings.
    """
    for name, (rules, _) in _SECTIONS.items():
        section = _section(cfg, name)
        if section is None:
            continue
        for key in section:
            if key not in rules:
                raise ValueError(f"cfg.MODEL.{name}.{key} is not a known key; expected one of {sorted(rules)}")
        for key, (check, requirement) in rules.items():
            if key in section and not check(section[key]):
                raise ValueError(f"cfg.MODEL.{name}.{key} {requirement}, got {section[key]!r}")


def _kwargs_from_section(cfg: CN, name: str) -> Dict[str, Any]:
    rules, defaults = _SECTIONS[name]
    section = _section(cfg, name)
    values = defaults()
    if section is not None:
        values.update({key: section[key] for key in rules if key in section})
    return {key.lower(): values[key] for key in rules}


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
        f"SOLVER.MAX_ITER={max_iter} (more than {100 * LONG_RENORM_WARMUP_SHARE:.0f}%): until then training and "
        "evaluation normalize with different statistics. Size the warm-ups to the schedule with "
        "MODEL.MABN.WARMUP_FRACTION and MODEL.MABN.RENORM_WARMUP_FRACTION (e.g. 0.02 and 0.1)."
    )


def brn_kwargs_from_cfg(cfg: CN) -> Dict[str, Any]:
    """BatchRenorm2d keyword arguments from cfg.MODEL.BRN (defaults for anything absent)."""
    return _kwargs_from_section(cfg, "BRN")
