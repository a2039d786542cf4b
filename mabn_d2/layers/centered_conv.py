"""Weight centralization: convolutions feeding an MABN layer use zero-mean filters.

MABN normalizes by the second moment only, which is valid when its input has (nearly) zero
mean; subtracting each output channel's filter mean makes that so. The stored parameter stays
the raw weight (same state_dict keys as detectron2's Conv2d), gradients flow through the
subtraction.
"""
import torch
from detectron2.layers import Conv2d
from torch import nn

__all__ = ["CenteredConv2d", "centered_weight", "centralize_conv_"]


def centered_weight(weight: torch.Tensor) -> torch.Tensor:
    """W - mean(W over in_channels, kh, kw), per output channel."""
    return weight - weight.mean(dim=tuple(range(1, weight.dim())), keepdim=True)


class CenteredConv2d(Conv2d):
    """detectron2 `Conv2d` (optional norm and activation) whose forward uses `centered_weight`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._conv_forward(x, centered_weight(self.weight), self.bias)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def centralize_conv_(conv: nn.Conv2d) -> CenteredConv2d:
    """Turn `conv` (an nn.Conv2d or detectron2 Conv2d) into a CenteredConv2d in place.

    Parameters, buffers and hooks are kept, so state_dict keys and optimizer references
    are unchanged. Returns the same object.
    """
    if isinstance(conv, CenteredConv2d):
        return conv
    if type(conv) not in (nn.Conv2d, Conv2d):
        raise TypeError(
            f"centralize_conv_ supports torch.nn.Conv2d and detectron2 Conv2d, got {type(conv).__name__}"
        )
    if not hasattr(conv, "norm"):
        conv.norm = None
    if not hasattr(conv, "activation"):
        conv.activation = None
    conv.__class__ = CenteredConv2d
    return conv
