"""MABN for detectron2: importing it makes "MABN" and "BRN" valid NORM strings."""
from .config import add_mabn_config
from .layers import BatchRenorm2d, CenteredConv2d, MABN2d
from .fold import FoldReport, fold_mabn
from .registry import mabn_build_context, register_norms

register_norms()

__all__ = [
    "MABN2d", "BatchRenorm2d", "CenteredConv2d", "add_mabn_config", "mabn_build_context",
    "register_norms", "fold_mabn", "FoldReport",
]
