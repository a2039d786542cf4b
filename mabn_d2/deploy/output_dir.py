"""The fold tool's output folder: what it may replace, and a staged write that replaces it whole or not
at all."""
import contextlib
import os
from typing import Iterator


from ..utils.atomic_io import replace_directory, staged_directory
from ..engine.preflight import UsageError, check_writable_dir
from .errors import ExportError


FOLDED_WEIGHTS = "model_folded.pth"
FOLDED_CONFIG = "config_folded.yaml"
FUSED_WEIGHTS = "model_fused.pth"
EXPORT_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
FOLD_OUTPUTS = frozenset({FOLDED_WEIGHTS, FOLDED_CONFIG, FUSED_WEIGHTS, *EXPORT_FILES.values()})


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
