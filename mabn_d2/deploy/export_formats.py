"""TorchScript and ONNX export of a detectron2 model through TracingAdapter, each checked against
eager execution."""
import contextlib
import io
import logging
from typing import Iterator, Optional, Tuple

import torch
from detectron2.export import TracingAdapter
from detectron2.modeling import GeneralizedRCNN
from torch import nn

from ..engine.atomic_io import atomic_write
from .verify import PredictionDiff, compare_predictions

logger = logging.getLogger(__name__)


EXPORT_FORMATS = ("torchscript", "onnx")
# ONNX Runtime uses its own conv kernels and reduction order: looser bounds on probabilities.
ONNXRUNTIME_TOLERANCES = {"boxes": 5e-2, "scores": 1e-3, "masks": 1e-3}


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
