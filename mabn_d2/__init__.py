"""MABN for detectron2: importing it makes "MABN" and "BRN" valid NORM strings in every detectron2
builder. Build models with `mabn_d2.build_model(cfg)` (or detectron2's own entry points, which
it points at the same function); models built by hand get `prepare_mabn_model`."""
__version__ = "0.1.0"  # the package's one version number (pyproject.toml reads it)

from .install_help import require_detectron2

require_detectron2()  # before any detectron2 import: say how to install it when it is missing

from .config import add_mabn_config  # noqa: E402
from .layers import BatchRenorm2d, CenteredConv2d, MABN2d
from .deploy.fold import FoldReport, fold_mabn
from .modeling.prepare import allow_uncentered, prepare_mabn_model
from .modeling.registry import build_model, mabn_build_context, register_norms

register_norms()

__all__ = [
    "__version__",
    "MABN2d", "BatchRenorm2d", "CenteredConv2d", "add_mabn_config", "build_model", "mabn_build_context",
    "prepare_mabn_model", "allow_uncentered", "register_norms", "fold_mabn", "FoldReport",
]
