"""The detectron2 integration: NORM "MABN"/"BRN" in the stock builders (`registry`), weight
centralization and per-level RetinaNet norms for built models (`prepare`, `cycle`), and the
PreciseBN counterpart for MABN (`precise_stats`)."""
from .prepare import allow_uncentered, prepare_mabn_model
from .registry import build_model, mabn_build_context, register_norms

__all__ = ["allow_uncentered", "build_model", "mabn_build_context", "prepare_mabn_model", "register_norms"]
