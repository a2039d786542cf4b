"""MABN for detectron2: importing it makes "MABN" and "BRN" valid NORM strings in every detectron2
builder. Build models with `mabn_d2.build_model(cfg)` (or detectron2's own entry points, which
it points at the same function); models built by hand get `prepare_mabn_model`."""
from .config import add_mabn_config
from .layers import BatchRenorm2d, CenteredConv2d, MABN2d
from .deploy.fold import FoldReport, fold_mabn
from .modeling.prepare import prepare_mabn_model
from .modeling.registry import build_model, mabn_build_context, register_norms

register_norms()

__all__ = [
    "MABN2d", "BatchRenorm2d", "CenteredConv2d", "add_mabn_config", "build_model", "mabn_build_context",
    "prepare_mabn_model", "register_norms", "fold_mabn", "FoldReport",
]
