"""TorchScript and ONNX export of a detectron2 model through TracingAdapter, each checked against
eager execution on several images: a trace records the branches and sizes of the one input it
ran on, and only other inputs show whether the file holds for them too."""
import contextlib
import io
import logging
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from detectron2.export import TracingAdapter
from detectron2.modeling import GeneralizedRCNN
from torch import nn

from ..utils.atomic_io import atomic_write
from .errors import ExportError
from .verify import PredictionDiff, compare_predictions

logger = logging.getLogger(__name__)


EXPORT_FORMATS = ("torchscript", "onnx")
# Images the export check compares when no `verify` count is given.
EXPORT_CHECK_IMAGES = 2
# torch.jit.load resolves the torchvision::roi_align and ::nms ops of the graph only once
# torchvision has registered them.
TORCHSCRIPT_LOAD_NOTE = "load it after `import torchvision` (the graph calls torchvision's roi_align and nms)"
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


def export_torchscript(model: nn.Module, inputs: Union[dict, Sequence[dict]], path: str) -> PredictionDiff:
    """Trace `model` on the first of `inputs` into TorchScript file `path`; compare the reloaded
    file with eager on every input. Loading the file needs `import torchvision` first."""
    inputs = _as_list(inputs)
    adapter = _tracing_adapter(model, inputs[0]["image"])
    with torch.no_grad():
        traced = torch.jit.trace(adapter, (inputs[0]["image"],), check_trace=False)
    atomic_write(path, lambda f: torch.jit.save(traced, f))
    loaded = torch.jit.load(path)
    return _compare_with_eager(adapter, inputs, loaded)


def _as_list(inputs: Union[dict, Sequence[dict]]) -> List[dict]:
    items = [inputs] if isinstance(inputs, dict) else list(inputs)
    if not items:
        raise ValueError("the export check needs at least one input")
    return items


def _compare_with_eager(
    adapter: TracingAdapter, inputs: Sequence[dict], run: Callable[[torch.Tensor], Sequence[torch.Tensor]]
) -> PredictionDiff:
    """Eager and exported predictions on each input; `run` maps an image to the flat outputs."""
    eager, exported = [], []
    with torch.no_grad():
        for item in inputs:
            eager.append(adapter.outputs_schema(adapter(item["image"]))[0]["instances"])
            exported.append(adapter.outputs_schema(tuple(run(item["image"])))[0]["instances"])
    return compare_predictions(eager, exported)


def export_onnx(
    model: nn.Module, inputs: Union[dict, Sequence[dict]], path: str, opset: int = 16
) -> Tuple[str, Optional[PredictionDiff]]:
    """Export `model` traced on the first of `inputs` to ONNX file `path`; returns (exporter
    used, diff over every input).

    The dynamo exporter (torch.export) is tried first. detectron2's inference has
    data-dependent shapes (NMS, top-k of a variable count, per-image loops over Instances)
    that torch.export rejects, so the TorchScript-based exporter is the fallback, as in
    detectron2's own export tools. opset 16 is the first with ROIAlign's aligned=True. The
    file is checked with onnx.checker; the diff against eager comes from onnxruntime when it
    is installed (None otherwise). The image's height and width are dynamic axes, so one file
    serves every image size.
    """
    import onnx

    inputs = _as_list(inputs)
    image = inputs[0]["image"]
    adapter = _tracing_adapter(model, image)
    exporter = "dynamo"
    try:
        with _quiet_dynamo_export():
            atomic_write(path, lambda f: _onnx_export(adapter, image, f, opset, dynamo=True))
    except Exception as e:  # noqa: BLE001  (any failure of the new exporter means: use the old one)
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        first_line = (str(root).strip().splitlines() or [""])[0]
        logger.info("dynamo ONNX export failed (%s: %s); using the TorchScript-based exporter",
                    type(root).__name__, first_line)
        exporter = "torchscript"
        atomic_write(path, lambda f: _onnx_export(adapter, image, f, opset, dynamo=False))
    onnx.checker.check_model(path)
    return exporter, _onnxruntime_diff(adapter, inputs, path)


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


# The image input of the exported graph, with height and width left open.
ONNX_INPUT = "image"
ONNX_DYNAMIC_AXES = {ONNX_INPUT: {1: "height", 2: "width"}}


def _onnx_export(adapter: TracingAdapter, image: torch.Tensor, f, opset: int, dynamo: bool) -> None:
    with torch.no_grad():
        if dynamo:
            dynamic = {axis: torch.export.Dim.DYNAMIC for axis in ONNX_DYNAMIC_AXES[ONNX_INPUT]}
            program = torch.onnx.export(adapter, (image,), dynamo=True, opset_version=max(opset, 18),
                                        input_names=[ONNX_INPUT], dynamic_shapes=((dynamic,),))
            f.write(program.model_proto.SerializeToString())
        else:
            torch.onnx.export(adapter, (image,), f, opset_version=opset, dynamo=False,
                              input_names=[ONNX_INPUT], dynamic_axes=ONNX_DYNAMIC_AXES)


def _onnxruntime_diff(adapter: TracingAdapter, inputs: Sequence[dict], path: str) -> Optional[PredictionDiff]:
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(image: torch.Tensor) -> List[torch.Tensor]:
        try:
            outputs = session.run(None, {name: image.numpy()})
        except Exception as e:  # noqa: BLE001  (onnxruntime raises its own exception types)
            first_line = (str(e).strip().splitlines() or [""])[0]
            raise ExportError(f"onnxruntime cannot run {path} on a {tuple(image.shape)} image: {first_line}") from e
        return [torch.from_numpy(x) for x in outputs]

    return _compare_with_eager(adapter, inputs, run)
