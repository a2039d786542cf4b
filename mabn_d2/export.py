"""Deploy an MABN model: load it strictly, fold it, rewrite its config, verify and export it.

The folded checkpoint and config are meant for stock detectron2 (no mabn_d2 installed), so
everything a user could get subtly wrong is checked loudly: a checkpoint that is missing,
unreadable or does not match the config, a config without MABN, predictions that drift. All
files appear at once or not at all, and the output folder then holds exactly this run's files
(`staged_output_dir`): a folder that is not empty is refused unless `overwrite` is set, and
then replaced as a whole, never mixed with an earlier run's files.
"""
import contextlib
import io
import logging
import os
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import build_detection_test_loader
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.export import TracingAdapter
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.structures import Instances
from torch import nn

from .atomic_io import atomic_write, replace_directory, staged_directory
from .checkpoint import describe_unreadable
from .fold import FoldReport, fold_mabn
from .preflight import STOCK_NORMS, UsageError, check_device, check_writable_dir

__all__ = [
    "EXPORT_FORMATS",
    "ONNXRUNTIME_TOLERANCES",
    "ExportError",
    "FoldResult",
    "PredictionDiff",
    "TOLERANCES",
    "build_and_load",
    "check_output_dir",
    "check_state_dict_matches",
    "compare_predictions",
    "export_onnx",
    "export_torchscript",
    "fold_checkpoint",
    "frozen_config",
    "load_checkpoint_strict",
    "mabn_norm_keys",
    "raw_predictions",
    "save_checkpoint",
    "staged_output_dir",
    "verification_inputs",
]

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("torchscript", "onnx")
# Largest max-abs differences accepted between the eval-mode MABN model and a folded form.
# The frozen form runs the same ops on the same numbers: measured difference exactly 0. The fused
# form rounds each folded weight once in float32 and ~70 layers compound it. Measured on Mask
# R-CNN R50-FPN at 800x1333 (box coordinates up to 1333 px, where float32 resolves 1.2e-4 px):
# 4.9e-4 px, scores 1.5e-6, mask probabilities 9e-7 with MABN statistics matched to the data
# (as training leaves them); 1.3e-2 px, 2.2e-5, 3.4e-5 with statistics 2x off, which inflates the
# activations. The bounds sit above the worse case, and far below what any folding mistake
# gives (a missed centering or affine moves boxes by pixels and scores by 1e-2 and more);
# 0.05 px is invisible to IoU-based evaluation.
TOLERANCES = {"boxes": 5e-2, "scores": 1e-4, "masks": 1e-4}
# ONNX Runtime uses its own conv kernels and reduction order: looser bounds on probabilities.
ONNXRUNTIME_TOLERANCES = {"boxes": 5e-2, "scores": 1e-3, "masks": 1e-3}


class ExportError(RuntimeError):
    """A problem with the user's inputs or a failed check; the message says which file or key."""


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------


def mabn_norm_keys(cfg: CfgNode) -> List[str]:
    """Dotted names of the NORM keys set to "MABN" (e.g. "MODEL.RESNETS.NORM")."""
    return [key for key, value in _norm_items(cfg) if value == "MABN"]


def _norm_items(node: CfgNode, prefix: str = "") -> Iterator[Tuple[str, object]]:
    for key, value in node.items():
        if isinstance(value, CfgNode):
            yield from _norm_items(value, f"{prefix}{key}.")
        elif key == "NORM":
            yield f"{prefix}{key}", value


def frozen_config(cfg: CfgNode, report: Optional[FoldReport] = None, weights: str = "") -> CfgNode:
    """`cfg` for the frozen folded model, in a form stock detectron2's get_cfg() accepts.

    Every NORM "MABN" becomes "FrozenBN". The RetinaNet head norm becomes "BN" instead when
    the fold kept per-level statistics (`report.per_level_norms`): stock RetinaNetHead builds
    CycleBatchNormList for "BN", the only stock layout with one statistic set per level (in
    eval mode it is the same frozen per-level affine). Keys stock detectron2 does not define
    (cfg.MODEL.MABN, cfg.MODEL.BRN, ...) are removed; MODEL.WEIGHTS is set to `weights`.
    """
    folded = cfg.clone()
    folded.defrost()
    per_level = bool(report and report.per_level_norms)
    for key in mabn_norm_keys(folded):
        value = "BN" if per_level and key == "MODEL.RETINANET.NORM" else "FrozenBN"
        _set_key(folded, key, value)
    unknown = _remove_unknown_keys(folded, get_cfg())
    if unknown:
        logger.info("Removed keys stock detectron2 does not define: %s", ", ".join(unknown))
    odd = [f"{key}={value!r}" for key, value in _norm_items(folded) if value not in STOCK_NORMS]
    if odd:
        raise ExportError(
            f"config uses norms stock detectron2 does not know ({', '.join(odd)}); only MABN is folded"
        )
    folded.MODEL.WEIGHTS = weights
    return folded


def _set_key(cfg: CfgNode, dotted: str, value: object) -> None:
    *path, last = dotted.split(".")
    node = cfg
    for part in path:
        node = node[part]
    node[last] = value


def _remove_unknown_keys(node: CfgNode, stock: CfgNode, prefix: str = "") -> List[str]:
    removed = []
    for key in list(node.keys()):
        if key not in stock:
            del node[key]
            removed.append(prefix + key)
        elif isinstance(node[key], CfgNode) and isinstance(stock[key], CfgNode):
            removed += _remove_unknown_keys(node[key], stock[key], f"{prefix}{key}.")
    return removed


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


class _MismatchError(ExportError):
    pass


class _StrictCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that raises on missing, unexpected or mis-shaped keys.

    Stock loading only warns, which would fold a model whose norms kept their initial values.
    """

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        problems = _describe_incompatible(
            incompatible.missing_keys, incompatible.unexpected_keys, incompatible.incorrect_shapes
        )
        if problems:
            raise _MismatchError(problems)
        return incompatible


def _describe_incompatible(missing: Sequence[str], unexpected: Sequence[str], shapes: Sequence) -> str:
    def some(items: Sequence, show: Callable[[object], str] = str) -> str:
        return ", ".join(show(item) for item in list(items)[:3]) + (" ..." if len(items) > 3 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} keys missing from the checkpoint ({some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({some(unexpected)})")
    if shapes:
        parts.append(
            f"{len(shapes)} keys with another shape ("
            + some(shapes, lambda s: f"{s[0]}: checkpoint {tuple(s[1])} vs model {tuple(s[2])}")
            + ")"
        )
    return "; ".join(parts)


def load_checkpoint_strict(model: nn.Module, path: str, config_name: str = "the config") -> None:
    """Load detectron2 checkpoint `path` into `model`; ExportError naming the file otherwise."""
    if not path:
        raise ExportError("no checkpoint given (--weights / MODEL.WEIGHTS is empty)")
    if "://" not in path and not os.path.isfile(path):
        raise ExportError(f"checkpoint not found: {path}")
    try:
        _StrictCheckpointer(model).load(path, checkpointables=[])
    except _MismatchError as e:
        raise ExportError(f"checkpoint {path} does not match {config_name}: {e}") from None
    except Exception as e:  # unpickling, zip and format errors all mean the same to the user
        raise ExportError(describe_unreadable(path, e)) from e


def build_and_load(cfg: CfgNode, weights: str, config_name: str = "the config") -> nn.Module:
    """The eval-mode model of `cfg` with `weights` loaded strictly (needs NORM "MABN" somewhere)."""
    if not mabn_norm_keys(cfg):
        raise ExportError(f"{config_name} sets no NORM to \"MABN\": there is nothing to fold")
    model = build_model(cfg)
    load_checkpoint_strict(model, weights, config_name)
    return model.eval()


def check_state_dict_matches(model: nn.Module, state_dict: Dict[str, torch.Tensor], what: str) -> None:
    """ExportError unless `state_dict` has exactly `model`'s keys and shapes."""
    expected = model.state_dict()
    shapes = [
        (k, tuple(v.shape), tuple(expected[k].shape))
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    problems = _describe_incompatible(
        sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected)), shapes
    )
    if problems:
        raise ExportError(f"{what}: {problems}")


def save_checkpoint(model: nn.Module, path: str) -> None:
    """Write `model` in detectron2's checkpoint format, {"model": state_dict}, atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: torch.save({"model": state}, f))


@contextlib.contextmanager
def staged_output_dir(output_dir: str) -> Iterator[str]:
    """A hidden folder beside `output_dir` that replaces it as a whole if the block succeeds.

    After an error, SIGTERM or SIGINT the staging folder is removed and `output_dir` is as it
    was. Whether an existing `output_dir` may be replaced is `check_output_dir`'s decision.
    """
    with staged_directory(output_dir, "staging") as stage:
        yield stage
        replace_directory(stage, output_dir)


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """ExportError unless `output_dir` can take this run's files and nothing else.

    An absent or empty folder is fine. A folder with files is refused unless `overwrite`;
    with it, only a folder holding nothing but fold outputs is replaced (never, say, a
    training folder given by mistake).
    """
    try:
        check_writable_dir(output_dir, "output folder")
    except UsageError as error:
        raise ExportError(str(error)) from None
    if not os.path.isdir(output_dir):
        return
    present = sorted(os.listdir(output_dir))
    if not present:
        return
    if not overwrite:
        raise ExportError(
            f"output folder {output_dir} is not empty ({', '.join(present)}); pass --overwrite to replace it "
            "with this run's files, or choose another --output-dir"
        )
    foreign = [name for name in present if name not in FOLD_OUTPUTS]
    if foreign:
        raise ExportError(
            f"output folder {output_dir} holds files the fold tool does not write ({', '.join(foreign)}); "
            "--overwrite replaces the whole folder, so choose another --output-dir"
        )


# ---------------------------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------------------------


def verification_inputs(cfg: CfgNode, num_images: int, image_paths: Sequence[str] = ()) -> List[dict]:
    """`num_images` model inputs: from `image_paths` (resized as DefaultPredictor does), or
    the first images of cfg.DATASETS.TEST[0] through detectron2's test loader."""
    if image_paths:
        resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        inputs = []
        for path in list(image_paths)[:num_images] if num_images > 0 else image_paths:
            if not os.path.isfile(path):
                raise ExportError(f"image not found: {path}")
            original = detection_utils.read_image(path, format=cfg.INPUT.FORMAT)
            image = resize.get_transform(original).apply_image(original)
            tensor = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
            inputs.append({"image": tensor, "height": original.shape[0], "width": original.shape[1]})
        return inputs
    if not cfg.DATASETS.TEST:
        raise ExportError("cannot verify: cfg.DATASETS.TEST is empty and no --images were given")
    name = cfg.DATASETS.TEST[0]
    try:
        loader = build_detection_test_loader(cfg, name)
    except KeyError as e:
        raise ExportError(f"cannot verify on dataset {name!r}: {e}") from e
    return [batch[0] for batch in islice(loader, num_images)]


def raw_predictions(model: nn.Module, inputs: Sequence[dict]) -> List[Instances]:
    """Per-image Instances before resizing to the original image: for R-CNN models the masks
    are the per-ROI mask probabilities, not pasted binary masks."""
    outputs = []
    with torch.no_grad():
        for item in inputs:
            if isinstance(model, GeneralizedRCNN):
                outputs.append(model.inference([item], do_postprocess=False)[0])
            else:
                outputs.append(model([item])[0]["instances"])
    return outputs


@dataclass
class PredictionDiff:
    """Max absolute differences between two models' predictions over the same images."""

    boxes: float = 0.0  # pixels
    scores: float = 0.0
    masks: float = 0.0  # mask probabilities
    images: int = 0
    detections: int = 0
    mismatches: List[str] = field(default_factory=list)  # images whose detections differ in number or class

    def exceeded(self, tolerances: Dict[str, float] = TOLERANCES) -> List[str]:
        """Human-readable reasons the difference is too large (empty when within tolerances)."""
        reasons = list(self.mismatches)
        for key, bound in tolerances.items():
            value = getattr(self, key)
            if not value <= bound:
                reasons.append(f"max |{key} difference| {value:.3g} > {bound:g}")
        return reasons

    def __str__(self) -> str:
        text = (
            f"{self.images} images, {self.detections} detections: max abs difference "
            f"boxes {self.boxes:.3g} px, scores {self.scores:.3g}, mask probabilities {self.masks:.3g}"
        )
        return text + (f"; {'; '.join(self.mismatches)}" if self.mismatches else "")


def compare_predictions(reference: Sequence[Instances], candidate: Sequence[Instances]) -> PredictionDiff:
    """Compare per-image predictions detection by detection.

    Each reference detection is paired with the candidate of the same class whose box is
    closest, so two near-equal scores that swap places do not count as a difference. A
    different number of detections per class is a mismatch.
    """
    diff = PredictionDiff(images=len(reference))
    for index, (ref, cand) in enumerate(zip(reference, candidate)):
        pairs = _pair_detections(ref, cand)
        if pairs is None:
            diff.mismatches.append(f"image {index}: detections differ ({len(ref)} vs {len(cand)}, or other classes)")
            continue
        diff.detections += len(ref)
        if len(ref) == 0:
            continue
        cand = cand[pairs]
        diff.boxes = max(diff.boxes, _max_abs(ref.pred_boxes.tensor, cand.pred_boxes.tensor))
        diff.scores = max(diff.scores, _max_abs(ref.scores, cand.scores))
        if ref.has("pred_masks"):
            diff.masks = max(diff.masks, _max_abs(ref.pred_masks, cand.pred_masks))
    return diff


def _pair_detections(ref: Instances, cand: Instances) -> Optional[torch.Tensor]:
    """For each detection of `ref`, the index of its counterpart in `cand`; None if the
    per-class counts differ."""
    if len(ref) != len(cand) or not torch.equal(ref.pred_classes.sort().values, cand.pred_classes.sort().values):
        return None
    if len(ref) == 0:
        return torch.zeros(0, dtype=torch.long)
    distance = torch.cdist(ref.pred_boxes.tensor.double(), cand.pred_boxes.tensor.double(), p=float("inf"))
    other_class = ref.pred_classes[:, None] != cand.pred_classes[None, :]
    return distance.masked_fill(other_class, float("inf")).argmin(dim=1)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


def _tracing_adapter(model: nn.Module, image: torch.Tensor) -> TracingAdapter:
    """TracingAdapter over `model` taking one CHW image (R-CNN: ROI mask probabilities out)."""
    inference = None
    if isinstance(model, GeneralizedRCNN):

        def inference(model, inputs):
            return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]

    # eval(): the ONNX exporter restores the adapter's mode afterwards, recursively.
    return TracingAdapter(model, [{"image": image}], inference).eval()


def export_torchscript(model: nn.Module, item: dict, path: str) -> PredictionDiff:
    """Trace `model` on `item` into TorchScript file `path`; compare the reloaded file with eager."""
    adapter = _tracing_adapter(model, item["image"])
    with torch.no_grad():
        traced = torch.jit.trace(adapter, (item["image"],), check_trace=False)
    atomic_write(path, lambda f: torch.jit.save(traced, f))
    loaded = torch.jit.load(path)
    with torch.no_grad():
        return _compare_with_eager(adapter, item["image"], loaded(item["image"]))


def _compare_with_eager(adapter: TracingAdapter, image: torch.Tensor, flat_outputs) -> PredictionDiff:
    with torch.no_grad():
        eager = adapter.outputs_schema(adapter(image))[0]["instances"]
    exported = adapter.outputs_schema(tuple(flat_outputs))[0]["instances"]
    return compare_predictions([eager], [exported])


def export_onnx(model: nn.Module, item: dict, path: str, opset: int = 16) -> Tuple[str, Optional[PredictionDiff]]:
    """Export `model` traced on `item` to ONNX file `path`; returns (exporter used, diff).

    The dynamo exporter (torch.export) is tried first. detectron2's inference has
    data-dependent shapes (NMS, top-k of a variable count, per-image loops over Instances)
    that torch.export rejects, so the TorchScript-based exporter is the fallback, as in
    detectron2's own export tools. opset 16 is the first with ROIAlign's aligned=True. The
    file is checked with onnx.checker; the diff against eager comes from onnxruntime when it
    is installed (None otherwise).
    """
    import onnx

    adapter = _tracing_adapter(model, item["image"])
    exporter = "dynamo"
    try:
        with _quiet_dynamo_export():
            atomic_write(path, lambda f: _onnx_export(adapter, item["image"], f, opset, dynamo=True))
    except Exception as e:  # noqa: BLE001  (any failure of the new exporter means: use the old one)
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        first_line = (str(root).strip().splitlines() or [""])[0]
        logger.info("dynamo ONNX export failed (%s: %s); using the TorchScript-based exporter",
                    type(root).__name__, first_line)
        exporter = "torchscript"
        atomic_write(path, lambda f: _onnx_export(adapter, item["image"], f, opset, dynamo=False))
    onnx.checker.check_model(path)
    return exporter, _onnxruntime_diff(adapter, item["image"], path)


@contextlib.contextmanager
def _quiet_dynamo_export() -> Iterator[None]:
    """Silence the progress lines and the partial graph torch.export prints when it gives up
    on a data-dependent branch; the failure itself is logged by the caller."""
    names = ("torch.fx.experimental.symbolic_shapes", "torch.export", "torch._dynamo", "torch.onnx")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _onnx_export(adapter: TracingAdapter, image: torch.Tensor, f, opset: int, dynamo: bool) -> None:
    with torch.no_grad():
        if dynamo:
            program = torch.onnx.export(adapter, (image,), dynamo=True, opset_version=max(opset, 18))
            f.write(program.model_proto.SerializeToString())
        else:
            torch.onnx.export(adapter, (image,), f, opset_version=opset, dynamo=False)


def _onnxruntime_diff(adapter: TracingAdapter, image: torch.Tensor, path: str) -> Optional[PredictionDiff]:
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    flat = [torch.from_numpy(x) for x in session.run(None, {name: image.numpy()})]
    return _compare_with_eager(adapter, image, flat)


# ---------------------------------------------------------------------------------------------
# the whole job
# ---------------------------------------------------------------------------------------------

FOLDED_WEIGHTS = "model_folded.pth"
FOLDED_CONFIG = "config_folded.yaml"
FUSED_WEIGHTS = "model_fused.pth"
EXPORT_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
FOLD_OUTPUTS = frozenset({FOLDED_WEIGHTS, FOLDED_CONFIG, FUSED_WEIGHTS, *EXPORT_FILES.values()})


@dataclass
class FoldResult:
    """What `fold_checkpoint` wrote and measured."""

    report: FoldReport
    files: List[str]  # final paths
    verified: Dict[str, PredictionDiff] = field(default_factory=dict)  # form -> diff to the original
    exported: Dict[str, str] = field(default_factory=dict)  # format -> how it was checked


def fold_checkpoint(
    cfg: CfgNode,
    weights: str,
    output_dir: str,
    *,
    fuse: bool = False,
    export: Optional[str] = None,
    verify: int = 0,
    images: Sequence[str] = (),
    device: str = "cpu",
    config_name: str = "the config",
    tolerances: Dict[str, float] = TOLERANCES,
    overwrite: bool = False,
) -> FoldResult:
    """Fold the MABN model (`cfg`, `weights`) and write it to `output_dir` for stock detectron2.

    Writes model_folded.pth + config_folded.yaml (the frozen form, loadable with stock
    get_cfg/build_model/DetectionCheckpointer). With `fuse`, also model_fused.pth (norms folded
    into convs; only for export, it matches no config) and the export uses the fused form.
    `verify` > 0 compares the original and folded predictions on that many images and raises
    ExportError above `tolerances`. Every check runs before anything appears in `output_dir`,
    which then holds exactly this run's files (a non-empty one needs `overwrite`, see
    `check_output_dir`).
    """
    if export is not None and export not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {export!r}; expected one of {EXPORT_FORMATS}")
    check_output_dir(output_dir, overwrite)
    try:
        check_device(device)
    except UsageError as error:
        raise ExportError(str(error)) from None
    build_cfg = cfg.clone()
    build_cfg.defrost()
    build_cfg.MODEL.DEVICE = device
    model = build_and_load(build_cfg, weights, config_name)
    frozen, report = fold_mabn(model, "frozen")
    logger.info(report.summary())

    final_weights = os.path.join(os.path.abspath(output_dir), FOLDED_WEIGHTS)
    folded_cfg = frozen_config(cfg, report, weights=final_weights)
    stock_cfg = folded_cfg.clone()
    stock_cfg.MODEL.DEVICE = device
    check_state_dict_matches(
        build_model(stock_cfg), frozen.state_dict(), f"folded model vs {FOLDED_CONFIG} (stock build)"
    )
    forms = {"frozen": frozen}
    if fuse:
        forms["fused"], fused_report = fold_mabn(model, "fused")
        logger.info(fused_report.summary())

    inputs = verification_inputs(build_cfg, max(verify, 1), images) if (verify > 0 or export) else []
    if export and not inputs:
        raise ExportError("cannot export: no input image (give --images or a non-empty DATASETS.TEST)")
    result = FoldResult(report=report, files=[])
    if verify > 0:
        reference = raw_predictions(model, inputs[:verify])
        for name, form in forms.items():
            diff = compare_predictions(reference, raw_predictions(form, inputs[:verify]))
            result.verified[name] = diff
            logger.info("%s vs original: %s", name, diff)
            if diff.detections == 0 and not diff.mismatches:
                logger.warning("no detections on the verification images: only their absence was compared")
            problems = diff.exceeded(tolerances)
            if problems:
                raise ExportError(f"the {name} model does not reproduce the original: {'; '.join(problems)} ({diff})")

    check_output_dir(output_dir, overwrite)  # again: the folder may have changed while we verified
    try:
        with staged_output_dir(output_dir) as stage:
            save_checkpoint(frozen, os.path.join(stage, FOLDED_WEIGHTS))
            atomic_write(os.path.join(stage, FOLDED_CONFIG), lambda f: f.write(folded_cfg.dump()), mode="w")
            names = [FOLDED_WEIGHTS, FOLDED_CONFIG]
            if fuse:
                save_checkpoint(forms["fused"], os.path.join(stage, FUSED_WEIGHTS))
                names.append(FUSED_WEIGHTS)
            if export:
                deployed = forms["fused" if fuse else "frozen"]
                path = os.path.join(stage, EXPORT_FILES[export])
                result.exported[export] = _export_and_check(export, deployed, inputs[0], path, tolerances)
                names.append(EXPORT_FILES[export])
    except OSError as error:  # disk full, permissions changed, a folder that vanished
        where = error.filename or output_dir
        raise ExportError(f"cannot write the folded model to {output_dir}: {where}: {error.strerror or error}") from error
    result.files = [os.path.join(os.path.abspath(output_dir), name) for name in names]
    return result


def _export_and_check(fmt: str, model: nn.Module, item: dict, path: str, tolerances: Dict[str, float]) -> str:
    if fmt == "torchscript":
        diff, how = export_torchscript(model, item, path), "TorchScript (TracingAdapter) vs eager"
    else:
        exporter, diff = export_onnx(model, item, path)
        how = f"ONNX ({exporter} exporter), onnx.checker passed"
        tolerances = ONNXRUNTIME_TOLERANCES
        if diff is None:
            return how + "; onnxruntime not installed, outputs not compared"
        how += "; onnxruntime vs eager"
    problems = diff.exceeded(tolerances)
    if problems:
        raise ExportError(f"the exported {fmt} model does not reproduce eager: {'; '.join(problems)} ({diff})")
    return f"{how}: {diff}"
