"""LazyConfig (.py) configs in the tools: loading with overrides, the model, the checks before a run.

detectron2's LazyConfig conventions hold (its tools/lazyconfig_train_net.py): `cfg.model` is the
detector, built by `instantiate`; `cfg.train`, `cfg.dataloader`, `cfg.optimizer` and
`cfg.lr_multiplier` hold the rest; overrides are `key=value` (`train.max_iter=3`,
`model.roi_heads.num_classes=10`). What is added, each because a YAML run has it too:

- the model is `prepare_mabn_model(instantiate(cfg.model))` (`build_lazy_model`): weight
  centralization, frozen stages, per-level norms in shared heads; the pass leaves a prepared
  model unchanged, so a config whose model is already `L(prepare_mabn_model)(model=...)` works too;
- an override naming an argument its target does not take is refused with the key, before
  anything runs: detectron2 would store it and fail later inside `instantiate` with a TypeError
  (as `model.model.roi_heads...` paths of an older layout would);
- `check_lazy_before_start` checks a run's values before any process starts or any file is
  written, each problem in one line (`UsageError` / `CheckpointError`).
"""
import functools
import inspect
import logging
import math
import os
from typing import Any, Iterator, List, Optional, Sequence, Tuple

from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.utils.registry import locate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from ..norms import norm_layer_classes, norm_specs
from ..modeling.prepare import prepare_mabn_model
from .checkpoint import CheckpointError, read_checkpoint, read_resume_point
from .preflight import UsageError, check_backend, check_device, check_writable_dir, first_line
from .weights_fit import ModelLayout, check_resume_fits, check_weights_fit, layout_of

__all__ = [
    "LAZY_CONFIG_SUFFIX", "build_lazy_model", "check_lazy_before_start", "is_lazy_config", "lazy_dataset_names",
    "lazy_model_layout", "load_lazy_config", "moving_average_norm_keys",
]

logger = logging.getLogger(__name__)

LAZY_CONFIG_SUFFIX = ".py"
SECTIONS = ("model", "dataloader", "optimizer", "lr_multiplier", "train")  # detectron2's LazyConfig layout
# The YAML names in weights_fit's messages, and what a LazyConfig calls them.
_LAZY_NAMES = (("MODEL.WEIGHTS", "train.init_checkpoint"), ("MODEL.MABN.BUFFER_SIZE", "the MABN norms' buffer_size"),
               ("OUTPUT_DIR", "train.output_dir"))


def is_lazy_config(path: str) -> bool:
    """Whether `path` names a LazyConfig (a .py file) rather than a YAML config."""
    return str(path).endswith(LAZY_CONFIG_SUFFIX)


# ---------------------------------------------------------------- loading


def load_lazy_config(path: str, overrides: Sequence[str] = ()) -> DictConfig:
    """LazyConfig.load + LazyConfig.apply_overrides; UsageError with one line naming the file or the key."""
    if not os.path.isfile(path):
        raise UsageError(f"cannot read config {path}: no such file")
    try:
        cfg = LazyConfig.load(path)
    except Exception as error:  # a Python error in the config file or in one it imports
        raise UsageError(f"cannot read config {path}: {type(error).__name__}: {_line(error)}") from error
    for override in overrides:
        key = _override_key(override)
        _check_override_key(cfg, key, override)
        try:
            LazyConfig.apply_overrides(cfg, [override])
        except Exception as error:  # hydra's grammar, or a key below a value that is not a config
            raise UsageError(f"bad config override {override!r}: {first_line(error)}") from error
    return cfg


def _line(error: BaseException) -> str:
    """The error's first line as it is (first_line strips the quotes a TypeError ends with)."""
    return (str(error).strip().splitlines() or [""])[0] or type(error).__name__


def _override_key(override: str) -> str:
    key, sep, _ = override.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"bad config override {override!r}: a LazyConfig takes key=value "
                         "(e.g. train.max_iter=100), not YAML's KEY VALUE")
    return key.strip().lstrip("+~")  # hydra's add / delete prefixes


def _target(node: DictConfig) -> Any:
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if isinstance(target, str):
        try:
            target = locate(target)
        except Exception:  # an unknown name fails in instantiate, with detectron2's own message
            return None
    return target if callable(target) else None


def _takes_argument(target: Any, name: str) -> bool:
    """Whether calling `target` accepts the keyword `name` (True when its signature is unknown)."""
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return True
    return any(p.kind == p.VAR_KEYWORD for p in parameters) or any(
        p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in parameters)


def _target_name(target: Any) -> str:
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)


def _check_override_key(cfg: DictConfig, key: str, override: str) -> None:
    """UsageError when `key` creates an argument its LazyCall target does not take, or a new section.

    New keys in plain dicts (train.seed, train.cudnn_benchmark) and arguments a target has but the
    config does not set are detectron2's conventions and pass.
    """
    parts = key.split(".")
    if parts[0] not in cfg:
        raise UsageError(f"bad config override {override!r}: the config has no {parts[0]!r} "
                         f"(it has {', '.join(str(k) for k in cfg.keys())})")
    node: Any = cfg
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return  # lists, and values that are not configs: detectron2's apply_overrides judges them
        if part in node:
            node = node._get_node(part)  # without resolving interpolations
            node = node if isinstance(node, (DictConfig, ListConfig)) else None
            continue
        target = _target(node)
        if target is not None and not _takes_argument(target, part):
            where = ".".join(parts[:depth]) or "the config"
            raise UsageError(f"bad config override {override!r}: {where} builds {_target_name(target)}, which takes "
                             f"no argument {part!r}{_hint(cfg, parts, depth)}")
        return


def _hint(cfg: DictConfig, parts: List[str], depth: int) -> str:
    if parts[:2] == ["model", "model"] and depth == 1 and "model" not in cfg.model:
        return f" (`model` is the detector itself: write {'.'.join(['model'] + parts[2:])})"
    return ""


# ---------------------------------------------------------------- the model


def build_lazy_model(cfg: DictConfig, device: Optional[str] = None) -> nn.Module:
    """`instantiate(cfg.model)`, then the MABN pass, on `device` (default cfg.train.device).

    The pass (`prepare_mabn_model`) is what `mabn_d2.build_model` runs for YAML configs; a model
    built without it refuses its first training step if it has MABN layers behind raw convolutions.
    """
    model = prepare_mabn_model(instantiate(cfg.model))
    device = device or OmegaConf.select(cfg, "train.device", default=None) or "cpu"
    return model.to(device)


def lazy_model_layout(model: nn.Module) -> ModelLayout:
    """What `weights_fit` compares a checkpoint with, for a model built from a LazyConfig."""
    return layout_of(model)


def _norm_class(key: str, value: Any) -> Optional[type]:
    """The moving-average norm class `value` builds (a name, a partial, the class itself), or None."""
    if isinstance(value, str):
        names = {spec.name: spec.layer for spec in norm_specs()}
        return names.get(value) if "norm" in key.rsplit(".", 1)[-1].lower() else None
    while isinstance(value, functools.partial):
        value = value.func
    if isinstance(value, type) and issubclass(value, norm_layer_classes()):
        return value
    return None


def _leaves(node: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, f"{prefix}{index}.")
    else:
        yield prefix[:-1], node


def moving_average_norm_keys(cfg: DictConfig) -> List[Tuple[str, type]]:
    """(dotted key, MABN2d or BatchRenorm2d) for every norm of the config that builds one."""
    container = OmegaConf.to_container(cfg, resolve=False)
    found = []
    for key, value in _leaves(container):
        cls = _norm_class(key, value)
        if cls is not None:
            found.append((key, cls))
    return found


# ---------------------------------------------------------------- the demo datasets


def lazy_dataset_names(cfg: DictConfig) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """(train, test) dataset names of dataloader.train / dataloader.test (detectron2's common/data layout)."""
    def names(key: str) -> Tuple[str, ...]:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            return ()
        return (value,) if isinstance(value, str) else tuple(value)

    return names("dataloader.train.dataset.names"), names("dataloader.test.dataset.names")



# ---------------------------------------------------------------- checks before a run


def _select(cfg: DictConfig, key: str) -> Any:
    """cfg's value at `key` (None when absent); UsageError naming the key when it does not resolve."""
    try:
        return OmegaConf.select(cfg, key, default=None, throw_on_missing=True)
    except Exception as error:  # an interpolation to nowhere, a missing value (???)
        raise UsageError(f"{key} does not resolve: {first_line(error)}") from error


def _require(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise UsageError(f"{key} {rule}, got {value!r}")


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_sections(cfg: DictConfig, path: str, eval_only: bool) -> None:
    needed = ["model", "train", "dataloader.test", "dataloader.evaluator"] if eval_only else \
        ["model", "train", "dataloader.train", "optimizer", "lr_multiplier"]
    for key in needed:
        if _select(cfg, key) is None:
            raise UsageError(f"config {path} has no {key} ({'evaluation' if eval_only else 'training'} needs it; "
                             "detectron2's LazyConfig layout: model, dataloader, optimizer, lr_multiplier, train)")
    for key in ("train.output_dir", "train.device"):
        value = _select(cfg, key)
        _require(isinstance(value, str) and bool(value), key, "must be a non-empty string", value)


def _check_solver(cfg: DictConfig, processes: int) -> None:
    """The values detectron2's lazy training would divide by or assert on, as UsageError naming the key."""
    max_iter = _select(cfg, "train.max_iter")
    _require(_integer(max_iter) and max_iter > 0, "train.max_iter", "must be an integer > 0", max_iter)
    batch = _select(cfg, "dataloader.train.total_batch_size")
    if batch is not None:
        _require(_integer(batch) and batch > 0, "dataloader.train.total_batch_size", "must be an integer > 0", batch)
        _require(batch % processes == 0, "dataloader.train.total_batch_size",
                 f"must be divisible by the number of training processes, {processes} (--num-gpus x --num-machines)",
                 batch)
    for key, low in (("train.checkpointer.period", 1), ("train.log_period", 1), ("train.eval_period", 0)):
        value = _select(cfg, key)
        if value is not None:
            _require(_integer(value) and value >= low, key, f"must be an integer >= {low}", value)
    lr = _select(cfg, "optimizer.lr")
    if lr is not None:
        _require(_finite(lr) and lr > 0, "optimizer.lr", "must be finite and > 0", lr)
    clip = _select(cfg, "train.clip_gradients")
    if clip is not None and clip.get("enabled", False):
        _require(clip.get("clip_type") in ("value", "norm"), "train.clip_gradients.clip_type", "must be value or norm",
                 clip.get("clip_type"))
        value = clip.get("clip_value")
        _require(_finite(value) and value > 0, "train.clip_gradients.clip_value", "must be finite and > 0", value)


def _check_backend(cfg: DictConfig, device: str) -> None:
    """preflight.check_backend for the moving-average norms the config builds."""
    uses = bool(moving_average_norm_keys(cfg))
    check_backend(CfgNode({"MODEL": CfgNode({"DEVICE": device, "NORM": "MABN" if uses else ""})}))


def _quiet_cpu_model(cfg: DictConfig, path: str) -> nn.Module:
    """The config's model on the CPU, built once to check it builds; UsageError with the reason otherwise."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # a throw-away model; instantiate's error log would be a second line
    try:
        return build_lazy_model(cfg, device="cpu")
    except Exception as error:
        raise UsageError(f"cannot build the model of {path}: {type(error).__name__}: {_line(error)}") from error
    finally:
        logging.disable(previous)


def _lazy_names(error: CheckpointError) -> CheckpointError:
    message = str(error)
    for yaml_name, lazy_name in _LAZY_NAMES:
        message = message.replace(yaml_name, lazy_name)
    return CheckpointError(message)


def _check_init_checkpoint(weights: str) -> None:
    """CheckpointError unless train.init_checkpoint is empty, a URL, or a local file that loads."""
    if not weights or "://" in weights:
        return
    weights = weights.split("?", 1)[0]
    if weights.endswith(".pkl"):  # Detectron/Caffe2 pickles: detectron2 reads them itself
        if not os.path.isfile(weights):
            raise CheckpointError(f"checkpoint not found: {weights} (train.init_checkpoint)")
        return
    read_checkpoint(weights, mmap=True)


def check_lazy_before_start(path: str, overrides: Sequence[str], processes: int = 1, *,
                            eval_only: bool = False, resume: bool = False) -> DictConfig:
    """tools/train_net.py's checks for a LazyConfig, once, before any process starts or any file is written.

    The config loads and takes the overrides; the sections the run needs are there; train.device
    exists for `processes` processes; $MABN_D2_BACKEND can run its norms; train.output_dir can be
    written; the solver values train (unless `eval_only`); the model builds; and the checkpoint to
    start from (the one `resume` continues, or train.init_checkpoint) loads and fits that model.
    Returns the config; raises UsageError or CheckpointError with one line.
    """
    cfg = load_lazy_config(path, overrides)
    _check_sections(cfg, path, eval_only)
    device = _select(cfg, "train.device")
    check_device(device, processes if device.startswith("cuda") else 1)
    _check_backend(cfg, device)
    output_dir = _select(cfg, "train.output_dir")
    check_writable_dir(output_dir, "train.output_dir")
    if not eval_only:
        _check_solver(cfg, processes)
    layout = lazy_model_layout(_quiet_cpu_model(cfg, path))
    try:
        resume_point = read_resume_point(output_dir) if resume else None
        if resume_point:  # train.init_checkpoint is not used; the checkpoint is read once
            resume_path, contents = resume_point
            check_resume_fits(None, resume_path, layout=layout, contents=contents)
            return cfg
        weights = _select(cfg, "train.init_checkpoint") or ""
        _check_init_checkpoint(weights)
        check_weights_fit(None, weights, eval_only=eval_only, layout=layout)
    except CheckpointError as error:
        raise _lazy_names(error) from error
    return cfg
