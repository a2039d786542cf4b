"""MABN layers: the norm, its weight-centralized convolution and the Batch Renorm baseline."""
from .batch_renorm import BatchRenorm2d
from .centered_conv import CenteredConv2d, centered_weight, centralize_conv_
from .functional import MABNFunction, MABNPhase, mabn_inference, mabn_phase
from .mabn import MABN2d

__all__ = [
    "MABN2d", "BatchRenorm2d", "CenteredConv2d", "centered_weight", "centralize_conv_",
    "MABNFunction", "MABNPhase", "mabn_inference", "mabn_phase",
]
