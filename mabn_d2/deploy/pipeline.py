"""Deploy an MABN model: load it strictly, fold it, rewrite its config, verify and export it.

The folded checkpoint and config are meant for stock detectron2 (no mabn_d2 installed), so
everything a user could get subtly wrong is checked loudly: a checkpoint that is missing,
unreadable or does not match the config, a config without MABN, predictions that drift. All
files appear at once or not at all, and the output folder then holds exactly this run's files
(`staged_output_dir`): a folder that is not empty is refused unless `overwrite` is set, and
then replaced as a whole, never mixed with an earlier run's files.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

from detectron2.config import CfgNode
from omegaconf import DictConfig
from torch import nn

from ..utils.atomic_io import atomic_write
from ..engine.preflight import UsageError, check_device
from .config_forms import config_form
from .errors import ExportError
from .fold import FoldReport, fold_mabn
from .output_dir import EXPORT_FILES, FOLDED_CONFIG, FOLDED_WEIGHTS, FUSED_WEIGHTS, check_output_dir, staged_output_dir
from .export_formats import (
    EXPORT_CHECK_IMAGES, EXPORT_FORMATS, ONNXRUNTIME_TOLERANCES, TORCHSCRIPT_LOAD_NOTE, export_onnx, export_torchscript,
)
from .strict_load import check_finite, check_state_dict_matches, save_checkpoint
from .verify import TOLERANCES, PredictionDiff, compare_predictions, raw_predictions

__all__ = ["FoldResult", "fold_checkpoint"]

logger = logging.getLogger(__name__)


@dataclass
class FoldResult:
    """What `fold_checkpoint` wrote and measured."""

    report: FoldReport
    files: List[str]  # final paths
    verified: Dict[str, PredictionDiff] = field(default_factory=dict)  # form -> diff to the original
    exported: Dict[str, str] = field(default_factory=dict)  # format -> how it was checked


def fold_checkpoint(
    cfg: Union[CfgNode, DictConfig],
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
    `cfg` is a YAML config or a LazyConfig (then the folded config is a LazyConfig saved as YAML,
    which stock `LazyConfig.load` reads; `mabn_d2.deploy.config_forms`). `verify` > 0 compares the
    original and folded predictions on that many images and raises ExportError above `tolerances`;
    the export is compared with eager on the same images (`EXPORT_CHECK_IMAGES` without `verify`).
    Every check runs before anything appears in `output_dir`, which then holds exactly this run's
    files (a non-empty one needs `overwrite`, see `check_output_dir`).
    """
    if export is not None and export not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {export!r}; expected one of {EXPORT_FORMATS}")
    check_output_dir(output_dir, overwrite)
    try:
        check_device(device)
    except UsageError as error:
        raise ExportError(str(error)) from None
    config = config_form(cfg, device)
    model = config.build_and_load(weights, config_name)
    frozen, report = fold_mabn(model, "frozen")
    logger.info(report.summary())

    final_weights = os.path.join(os.path.abspath(output_dir), FOLDED_WEIGHTS)
    folded_text = config.folded_config(report, final_weights)
    check_state_dict_matches(
        config.build_folded(), frozen.state_dict(), f"folded model vs {FOLDED_CONFIG} (stock build)"
    )
    forms = {"frozen": frozen}
    if fuse:
        forms["fused"], fused_report = fold_mabn(model, "fused")
        logger.info(fused_report.summary())
    for name, form in forms.items():  # folding divides by sqrt(running_var + eps): it must not overflow
        check_finite(form, f"the {name} model")

    num_images = verify if verify > 0 else EXPORT_CHECK_IMAGES
    inputs = config.inputs(num_images, images) if (verify > 0 or export) else []
    if export and not inputs:
        raise ExportError("cannot export: no input image (give --images, or a non-empty DATASETS.TEST / "
                          "dataloader.test)")
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
            atomic_write(os.path.join(stage, FOLDED_CONFIG), lambda f: f.write(folded_text), mode="w")
            names = [FOLDED_WEIGHTS, FOLDED_CONFIG]
            if fuse:
                save_checkpoint(forms["fused"], os.path.join(stage, FUSED_WEIGHTS))
                names.append(FUSED_WEIGHTS)
            if export:
                deployed = forms["fused" if fuse else "frozen"]
                path = os.path.join(stage, EXPORT_FILES[export])
                result.exported[export] = _export_and_check(export, deployed, inputs, path, tolerances)
                names.append(EXPORT_FILES[export])
    except OSError as error:  # disk full, permissions changed, a folder that vanished
        where = error.filename or output_dir
        raise ExportError(f"cannot write the folded model to {output_dir}: {where}: {error.strerror or error}") from error
    result.files = [os.path.join(os.path.abspath(output_dir), name) for name in names]
    return result


def _export_and_check(
    fmt: str, model: nn.Module, inputs: Sequence[dict], path: str, tolerances: Dict[str, float]
) -> str:
    if fmt == "torchscript":
        diff, how = export_torchscript(model, inputs, path), "TorchScript (TracingAdapter) vs eager"
    else:
        exporter, diff = export_onnx(model, inputs, path)
        how = f"ONNX ({exporter} exporter), onnx.checker passed"
        tolerances = ONNXRUNTIME_TOLERANCES
        if diff is None:
            return how + "; onnxruntime not installed, outputs not compared"
        how += "; onnxruntime vs eager"
    problems = diff.exceeded(tolerances)
    if problems:
        raise ExportError(f"the exported {fmt} model does not reproduce eager: {'; '.join(problems)} ({diff})")
    return f"{how}: {diff}" + (f"; {TORCHSCRIPT_LOAD_NOTE}" if fmt == "torchscript" else "")
