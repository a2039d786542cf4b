"""Config sections of the norm table (`mabn_d2.norms`): cfg.MODEL.MABN, cfg.MODEL.BRN, ..., read once.

Each norm's section holds its layer arguments as keys, upper-cased, with the table's defaults
and checks; a section may add keys only the config has (cfg.MODEL.MABN sizes the warm-ups as
fractions of SOLVER.MAX_ITER).

Reading a section validates it into the norm's immutable hyper-parameters
(`layers.hyperparams.HyperparameterValues`), remembered per section content: `setup_cfg`,
`build_model` and the warm-up warning share one validation, and the layers built from the
result do not check it again. detectron2 resolves a NORM string without seeing the cfg, so the
values reach the layers through `mabn_d2.modeling.registry` (while `build_model` runs).
"""
import contextlib
import functools
from typing import Any, Dict, Iterator, Optional, Tuple

import yacs.config
from detectron2.config import CfgNode as CN

from .layers.hyperparams import HyperparameterValues
from .norms import NormSpec, norm_spec, norm_specs

__all__ = [
    "add_mabn_config",
    "validate_mabn_config",
    "norm_settings",
    "settings_from_cfg",
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


def _section_defaults(spec: NormSpec) -> CN:
    return CN({p.config_key: p.default for p in spec.keys})


def add_mabn_config(cfg: CN) -> None:
    """Add the section of every norm in the table (cfg.MODEL.MABN, cfg.MODEL.BRN, ...); keys already
    present keep their values."""
    for spec in norm_specs():
        defaults = _section_defaults(spec)
        if spec.section not in cfg.MODEL:
            cfg.MODEL[spec.section] = defaults
            continue
        for key, value in defaults.items():
            if key not in cfg.MODEL[spec.section]:
                cfg.MODEL[spec.section][key] = value


def _section(cfg: Any, name: str) -> Optional[CN]:
    model = getattr(cfg, "MODEL", None)
    if model is None or name not in model:
        return None
    return model[name]


def _lookup(cfg: Any, dotted: str) -> Any:
    """cfg's value at a dotted key, None when absent."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _validate_section(spec: NormSpec, items: Tuple[Tuple[str, type, Any], ...], reads: Tuple[Tuple[type, Any], ...]
                      ) -> HyperparameterValues:
    """The one validation of a section: ValueError naming the first bad key and its rule.

    Absent keys take their defaults; unknown keys are errors (most likely misspellings).
    """
    node, prefix = {key: value for key, _, value in items}, f"cfg.MODEL.{spec.section}"
    by_key = {p.config_key: p for p in spec.keys}
    for key in node:
        if key not in by_key:
            raise ValueError(f"{prefix}.{key} is not a known key; expected one of {sorted(by_key)}")
    for key, parameter in by_key.items():
        if key in node and not parameter.check(node[key]):
            raise ValueError(f"{prefix}.{key} {parameter.requirement}, got {node[key]!r}")
    values = {p.name: node.get(key, p.default) for key, p in by_key.items()}
    if spec.resolve is not None:
        values = spec.resolve(values, {key: value for key, (_, value) in zip(spec.reads, reads)})
    return spec.values(**{p.name: values[p.name] for p in spec.hyperparameters})


_validate_section_once = functools.lru_cache(maxsize=64)(_validate_section)


def _read(cfg: Any, spec: NormSpec) -> HyperparameterValues:
    """A section's validated values (its defaults when cfg has no such section), validated once per
    content: the same keys and values, and the same values of the cfg keys it `reads`. Types are
    part of the content: 1, 1.0 and True are equal keys to a cache, not to a check."""
    node = _section(cfg, spec.section)
    items = () if node is None else tuple(sorted((key, type(value), value) for key, value in node.items()))
    reads = tuple((type(value), value) for value in (_lookup(cfg, key) for key in spec.reads))
    try:
        hash((items, reads))
    except TypeError:  # a list or a node where a number belongs: the check names it
        return _validate_section(spec, items, reads)
    return _validate_section_once(spec, items, reads)


def validate_mabn_config(cfg: CN) -> None:
    """Raise ValueError naming the first bad key of a norm section of cfg (cfg.MODEL.MABN, cfg.MODEL.BRN, ...).

    Sections that are absent are not errors (the layer defaults apply). The result is
    remembered, so building from the same cfg does not validate it again.
    """
    for spec in norm_specs():
        if _section(cfg, spec.section) is not None:
            _read(cfg, spec)


def settings_from_cfg(cfg: CN, norm: str) -> HyperparameterValues:
    """NORM `norm`'s validated hyper-parameters from its cfg section (defaults for anything absent)."""
    return _read(cfg, norm_spec(norm))


def norm_settings(cfg: CN) -> Dict[str, HyperparameterValues]:
    """{NORM name: validated hyper-parameters} for every norm whose section cfg has."""
    return {spec.name: settings_from_cfg(cfg, spec.name) for spec in norm_specs()
            if _section(cfg, spec.section) is not None}


def resolve_mabn_warmups(cfg: CN) -> Tuple[int, int]:
    """(warmup_iters, renorm_warmup_iters) after applying the *_FRACTION keys to SOLVER.MAX_ITER."""
    values = settings_from_cfg(cfg, "MABN")
    return values.warmup_iters, values.renorm_warmup_iters


def mabn_kwargs_from_cfg(cfg: CN) -> Dict[str, Any]:
    """MABN2d keyword arguments from cfg.MODEL.MABN (defaults for anything absent).

    The *_FRACTION keys are resolved against SOLVER.MAX_ITER into warmup_iters and
    renorm_warmup_iters; they are not layer arguments themselves.
    """
    return settings_from_cfg(cfg, "MABN").as_kwargs()


def _max_iter(cfg: Any) -> Optional[int]:
    max_iter = _lookup(cfg, "SOLVER.MAX_ITER")
    return None if max_iter is None else int(max_iter)


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
    return settings_from_cfg(cfg, "BRN").as_kwargs()
