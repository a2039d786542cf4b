"""MABN layers: the norm, its weight-centralized convolution and the Batch Renorm baseline.

One module per norm for the public-operation path (autograd Function plus module); the Triton
kernels of both training steps live in `triton/`, chosen per step by `backend`.
"""
from .base import MABNPhase, mabn_phase
from .batch_renorm import BatchRenorm2d
from .centered_conv import CenteredConv2d, centered_weight, centralize_conv_
from .centering_check import UncenteredInputError
from .mabn import MABN2d, MABNFunction, mabn_inference

__all__ = [
    "MABN2d", "BatchRenorm2d", "CenteredConv2d", "centered_weight", "centralize_conv_",
    "MABNFunction", "MABNPhase", "mabn_inference", "mabn_phase", "UncenteredInputError",
]
