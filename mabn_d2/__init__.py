"""MABN for detectron2: importing it makes "MABN" and "BRN" valid NORM strings, and makes
`build_model` finish every model with `prepare_mabn_model` (call it on models built by hand)."""
from .config import add_mabn_config
from .layers import BatchRenorm2d, CenteredConv2d, MABN2d
from .deploy.fold import FoldReport, fold_mabn
from .prepare import prepare_mabn_model
from .registry import mabn_build_context, register_norms

register_norms()

__all__ = [
    "MABN2d", "BatchRenorm2d", "CenteredConv2d", "add_mabn_config", "mabn_build_context",
    "prepare_mabn_model", "register_norms", "fold_mabn", "FoldReport",
]
